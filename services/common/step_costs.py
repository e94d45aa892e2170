"""Step costs learned from the steps engines actually run.

An engine step over `decode_seqs` decoding sequences that read
`context_kv_bytes` of KV, and `prefill_tokens` prompt tokens of
`prefill_seqs` prompts, is priced (as the simulator's profile and the
scheduler's compute model price it) as

    decode_base + decode_per_seq * decode_seqs + context_kv_bytes / attention_rate
    + [prefill_tokens > 0] * (prefill_base + prefill_per_seq * prefill_seqs
                              + prefill_per_token * prefill_tokens)

which is linear in six coefficients. An engine keeps the least-squares
sums of its steps (StepTimeAccumulator: X'X and X'y, older steps fading
with a half-life) and reports them; the scheduler adds the sums of the
engines of one model size and fits the coefficients (fit_coefficients),
pulled towards its card's profile by a prior worth a few steps, so
that a coefficient the steps do not tell apart (no prefill seen yet, every
step at batch 1) stays at the profile's value instead of going wild, and
the measurements take over as they accumulate.

Only steps that ran alone on their device are summed (the agent's step
board, services/gpu_agent/engine/step_board.py): the compute model adds the
loads of the engines sharing a GPU itself, and a step timed beside a
neighbour's already holds the neighbour's interference."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# The built-in engine's step token budget (decode tokens plus prefill chunks) by device kind: its
# batch scheduler's (services/gpu_agent/engine/batch_scheduler.py says why CUDA's is larger), and the
# compute model's: it counts a model's prefill steps as its prompt tokens over the budget.
DEFAULT_STEP_TOKENS = 512
CUDA_STEP_TOKENS = 2048


def step_tokens_for(device_kinds: Iterable[str]) -> int:
    """The step budget the engines on these devices run with: CUDA's where any is a CUDA device."""
    return CUDA_STEP_TOKENS if "cuda" in set(device_kinds) else DEFAULT_STEP_TOKENS


# The coefficients, in the features' units (scaled so that the sums stay well conditioned).
COEFFICIENTS = (
    "decode_base_s",
    "decode_per_seq_s",
    "s_per_kv_gb",
    "prefill_base_s",
    "prefill_per_ktoken_s",
    "prefill_per_seq_s",
)
N = len(COEFFICIENTS)
# A typical step's feature values: the prior's weight per coefficient (PRIOR_STEPS steps of these).
TYPICAL = (1.0, 16.0, 0.5, 0.3, 0.5, 1.0)
PRIOR_STEPS = 3.0
DEFAULT_HALF_LIFE_STEPS = 20_000


def step_features(decode_seqs: int, context_kv_bytes: int, prefill_tokens: int, prefill_seqs: int) -> tuple[float, ...]:
    prefill = 1.0 if prefill_tokens else 0.0
    return (
        1.0,
        float(decode_seqs),
        context_kv_bytes / 1e9,
        prefill,
        prefill_tokens / 1000.0,
        float(prefill_seqs) * prefill,
    )


def _index(i: int, j: int) -> int:
    """Where X'X[i][j] (i <= j) sits in the packed upper triangle, row by row."""
    return i * N - i * (i - 1) // 2 + (j - i)


@dataclass(frozen=True)
class StepTimeSums:
    """An engine's least-squares sums over its timed steps (older ones faded):
    `steps` their weight, `xtx` X'X's upper triangle row by row, `xty` X'y."""

    steps: float = 0.0
    xtx: tuple[float, ...] = (0.0,) * (N * (N + 1) // 2)
    xty: tuple[float, ...] = (0.0,) * N

    def __add__(self, other: StepTimeSums) -> StepTimeSums:
        return StepTimeSums(
            self.steps + other.steps,
            tuple(a + b for a, b in zip(self.xtx, other.xtx)),
            tuple(a + b for a, b in zip(self.xty, other.xty)),
        )

    @classmethod
    def from_values(cls, steps: float, xtx: Sequence[float], xty: Sequence[float]) -> StepTimeSums:
        """From a report's numbers; ValueError if their counts are not the sums'."""
        if len(xtx) != N * (N + 1) // 2 or len(xty) != N:
            raise ValueError(
                f"step time sums need {N * (N + 1) // 2} X'X and {N} X'y values, got {len(xtx)} and {len(xty)}"
            )
        return cls(float(steps), tuple(map(float, xtx)), tuple(map(float, xty)))


class StepTimeAccumulator:
    """The sums an engine keeps (one per engine, updated by its step loop)."""

    def __init__(self, half_life_steps: float = DEFAULT_HALF_LIFE_STEPS):
        self._keep = 0.5 ** (1.0 / half_life_steps)
        self._steps = 0.0
        self._xtx = [0.0] * (N * (N + 1) // 2)
        self._xty = [0.0] * N

    def record(self, features: Sequence[float], seconds: float) -> None:
        keep = self._keep
        self._steps = self._steps * keep + 1.0
        k = 0
        for i in range(N):
            xi = features[i]
            self._xty[i] = self._xty[i] * keep + xi * seconds
            for j in range(i, N):
                self._xtx[k] = self._xtx[k] * keep + xi * features[j]
                k += 1

    def sums(self) -> StepTimeSums:
        return StepTimeSums(self._steps, tuple(self._xtx), tuple(self._xty))


def fit_coefficients(sums: StepTimeSums, prior: Sequence[float], prior_steps: float = PRIOR_STEPS) -> tuple[float, ...]:
    """The coefficients (COEFFICIENTS' order and units) that fit the steps
    best, each pulled towards `prior` as if `prior_steps` typical steps had
    cost what the prior says: (X'X + L) b = X'y + L prior, L diagonal, then
    clamped at zero (a cost is never negative)."""
    a = [[0.0] * N for _ in range(N)]
    for i in range(N):
        for j in range(i, N):
            a[i][j] = a[j][i] = sums.xtx[_index(i, j)]
    b = list(sums.xty)
    for i in range(N):
        weight = prior_steps * TYPICAL[i] ** 2
        a[i][i] += weight
        b[i] += weight * prior[i]
    return tuple(max(0.0, v) for v in _solve(a, b))


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """a x = b by Gaussian elimination with partial pivoting (a is symmetric positive definite here)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x
