"""The simulator's engine latency model and its JSON file.

Times are functions of a model's weight bytes (its size class), fitted per
measured model and interpolated linearly in weight bytes between them (the
smallest measured model's numbers below it, the last two points' slope above
the largest):

    step_s = decode_base_s + decode_per_seq_s * decode_seqs
             + context_kv_bytes / attention_bytes_per_s
             + (prefill_base_s + prefill_per_seq_s * prefill_seqs + prefill_per_token_s * prefill_tokens
                if the step has prefill tokens)

where context_kv_bytes is the KV the decoding sequences read this step (their
cached tokens times the model's KV bytes per token), plus graph_capture_s for a
decode step of a shape its engine has not captured since it was switched on
(the built-in engine captures a CUDA graph per batch and context bucket on
first use, and drops them all when it is switched off). Activation is weight
bytes over the host-to-device copy bandwidth plus an overhead; loading (an
engine created by the scheduler) is a fit of the same kind.

`fit_profile(results_dir)` makes a profile from the committed benchmark
results (bench/results/*.json); `bench/fit_profile.py` writes it to a file.
The file records its sources, the device and, for every number, whether it
was measured or is an assumption."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from services.common.step_costs import CUDA_STEP_TOKENS, DEFAULT_STEP_TOKENS
from services.scheduler.policies import ComputeCosts, StepCost, by_weight
from services.scheduler.policies.compute import SAME_SIZE


@dataclass(frozen=True)
class SizePoint:
    """The step-time constants of one measured model size."""

    model: str
    weight_bytes: int
    decode_base_s: float  # a decode step's fixed cost (reading the weights, launches)
    decode_per_seq_s: float  # each decoding sequence in the batch, beyond its attention
    prefill_base_s: float  # what a step with prefill tokens costs beyond a decode step's base
    prefill_per_token_s: float
    # each prompt (or prompt chunk) in a prefill step: its own work beside its tokens' (0 where unmeasured,
    # its cost then sits in prefill_per_token_s)
    prefill_per_seq_s: float = 0.0
    # With n engines busy on the device, a step of this size takes max(1, n / parallelism) times its alone
    # time: a larger model's kernels take a larger share of the GPU beside others (0: not measured, the
    # device's device_parallelism)
    parallelism: float = 0.0
    # The same for its steps with prompt tokens (eager, mixed with decoding sequences or not), which share
    # the GPU better than its CUDA-graph decode steps (0: not measured, `parallelism` for them too)
    prefill_parallelism: float = 0.0


@dataclass(frozen=True)
class LatencyProfile:
    device: str
    points: tuple[SizePoint, ...]  # ascending weight bytes
    attention_bytes_per_s: float  # decode attention's KV read rate
    copy_bytes_per_s: float  # host-to-device weight copy (activation)
    activation_overhead_s: float
    deactivation_s: float
    load_base_s: float  # an engine's creation with weights in host memory
    load_bytes_per_s: float
    # How many engines' steps the device runs at once, in alone-step equivalents: a step with n engines
    # busy on the device takes max(1, n / device_parallelism) times its alone time (1: fully serialized).
    # Where every size point has its own `parallelism`, those instead (parallelism_at).
    device_parallelism: float = 1.0
    # One CUDA-graph capture of a decode step (0: not measured, or no graphs, as on the CPU).
    graph_capture_s: float = 0.0
    metadata: dict = field(default_factory=dict, compare=False)

    @property
    def step_tokens(self) -> int:
        """The step budget of the engine this profile was measured for (the built-in engine's
        default on that device): CPU profiles are named "CPU: ..." (bench/profile_cpu.py)."""
        return DEFAULT_STEP_TOKENS if self.device.startswith("CPU") else CUDA_STEP_TOKENS

    # ---- the model --------------------------------------------------------------

    def _at(self, weight_bytes: int, name: str) -> float:
        return by_weight(self.points, weight_bytes, name)

    def step_s(
        self, weight_bytes: int, decode_seqs: int, context_kv_bytes: int, prefill_tokens: int, prefill_seqs: int = 1
    ) -> float:
        """One engine step over `decode_seqs` decoding sequences (reading
        `context_kv_bytes` of KV) and `prefill_tokens` prompt tokens of
        `prefill_seqs` prompts."""
        if decode_seqs == 0 and prefill_tokens == 0:
            return 0.0
        t = (
            self._at(weight_bytes, "decode_base_s")
            + self._at(weight_bytes, "decode_per_seq_s") * decode_seqs
            + context_kv_bytes / self.attention_bytes_per_s
        )
        if prefill_tokens:
            t += (
                self._at(weight_bytes, "prefill_base_s")
                + self._at(weight_bytes, "prefill_per_seq_s") * prefill_seqs
                + self._at(weight_bytes, "prefill_per_token_s") * prefill_tokens
            )
        return t

    def parallelism_at(self, weight_bytes: int, prefill: bool = False) -> float:
        """The parallelism a step of this size sees beside other engines' (SizePoint.parallelism; with
        prefill, a step with prompt tokens: SizePoint.prefill_parallelism where every size has one):
        linear in weight bytes between the measured sizes, the nearest one's beyond them; the device's
        where a size point has none."""
        if not self.points or any(p.parallelism <= 0 for p in self.points):
            return self.device_parallelism
        name = (
            "prefill_parallelism" if prefill and all(p.prefill_parallelism > 0 for p in self.points) else "parallelism"
        )
        values = [getattr(p, name) for p in self.points]
        return min(max(self._at(weight_bytes, name), min(values)), max(values))

    def compute_costs(self) -> ComputeCosts:
        """The step costs as the placement policy prices compute (PolicyParams.compute)."""
        return ComputeCosts(
            points=tuple(
                StepCost(
                    p.weight_bytes,
                    p.decode_base_s,
                    p.decode_per_seq_s,
                    p.prefill_base_s,
                    p.prefill_per_token_s,
                    p.prefill_per_seq_s,
                )
                for p in self.points
            ),
            attention_bytes_per_s=self.attention_bytes_per_s,
        )

    def prefill_s(self, weight_bytes: int, tokens: int) -> float:
        """A step that only prefills one prompt of `tokens` tokens."""
        return self.step_s(weight_bytes, 0, 0, tokens)

    def activation_s(self, weight_bytes: int) -> float:
        return self.activation_overhead_s + weight_bytes / self.copy_bytes_per_s

    def load_s(self, weight_bytes: int) -> float:
        return self.load_base_s + weight_bytes / self.load_bytes_per_s

    # ---- the file ---------------------------------------------------------------

    def to_json(self) -> dict:
        out = asdict(self)
        out["points"] = [asdict(p) for p in self.points]
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, data: dict) -> LatencyProfile:
        points = tuple(sorted((SizePoint(**p) for p in data["points"]), key=lambda p: p.weight_bytes))
        return cls(
            device=data["device"],
            points=points,
            attention_bytes_per_s=data["attention_bytes_per_s"],
            copy_bytes_per_s=data["copy_bytes_per_s"],
            activation_overhead_s=data["activation_overhead_s"],
            deactivation_s=data["deactivation_s"],
            load_base_s=data["load_base_s"],
            load_bytes_per_s=data["load_bytes_per_s"],
            device_parallelism=data.get("device_parallelism", 1.0),
            graph_capture_s=data.get("graph_capture_s", 0.0),
            metadata=data.get("metadata", {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        return cls.from_json(json.loads(Path(path).read_text()))


DEFAULT_PROFILE = Path(__file__).resolve().parents[2] / "bench" / "results" / "sim-profile-h200.json"


# ---- fitting ----------------------------------------------------------------------


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def fit_prefill(rows: list[dict]) -> tuple[float, float, float]:
    """(intercept_s, per_seq_s, per_token_s) of the time to first token of
    one prefill step, t = intercept + per_seq * prompts + per_token * tokens,
    from bench/prefill_steps.py's rows of one model (batch, prompt_tokens,
    first_token_ms): the single prompts' line over their lengths gives
    intercept + per_seq and per_token; the batches' time beyond that line,
    per extra prompt, gives per_seq (least squares through zero)."""
    singles = [r for r in rows if r["batch"] == 1]
    batches = [r for r in rows if r["batch"] > 1]
    if len({r["prompt_tokens"] for r in singles}) < 2 or not batches:
        raise ValueError("fit_prefill needs single prompts of two lengths or more and one batch of several")
    one_prompt, per_token = _line([r["prompt_tokens"] for r in singles], [r["first_token_ms"] / 1e3 for r in singles])
    extra = [
        (r["batch"] - 1, r["first_token_ms"] / 1e3 - one_prompt - per_token * r["batch"] * r["prompt_tokens"])
        for r in batches
    ]
    per_seq = sum(x * y for x, y in extra) / sum(x * x for x, _ in extra)
    return one_prompt - per_seq, per_seq, per_token


def provenance(raw: float, kept: float, how: str) -> dict:
    """A profile value's record: how it was had, and the fit it replaced where it was clamped."""
    return {"how": how} if kept == raw else {"how": "clamped", "from": how, "fitted": raw}


# A step log's contention bins (bench/step_log_summary.py) from this many engines stepping at once on: beside
# fewer, a step's slowdown is mostly its own noise, and its parallelism reads as its concurrency.
SHARED_FROM_CONCURRENCY = 2.0


def shared_parallelism(*tables: dict[str, dict]) -> float | None:
    """The steps-weighted mean parallelism over contention tables' bins of at least SHARED_FROM_CONCURRENCY
    engines stepping at once; None where they have no such steps."""
    shared = [b for bins in tables for name, b in bins.items() if float(name.split("-")[0]) >= SHARED_FROM_CONCURRENCY]
    steps = sum(b["steps"] for b in shared)
    return sum(b["steps"] * b["parallelism_p50"] for b in shared) / steps if steps else None


def with_parallelism(point: SizePoint, contention: dict[str, dict], values: dict[str, dict]) -> SizePoint:
    """The point with the parallelism its size's steps saw in a cluster run (a step log's contention
    tables, bench/step_log_summary.py: per kind of step and bin of concurrency, the steps and their median
    concurrency over slowdown): its CUDA-graph decode steps' (the table named for its model), and its
    steps with prompt tokens' (" mixed" and " prefill" pooled), each the steps-weighted mean over the bins
    of at least SHARED_FROM_CONCURRENCY engines, kept at 1 or more (a step cannot beat its alone time by
    sharing), recorded in `values`. On the H100 showdown the 8B's decode steps were slowed less than the 1B's
    and 3B's beside the same neighbours (2.2 against 1.4-1.5 alone-steps at once), where one device-wide
    parallelism of 1.25 gave the 8B a simulated TPOT p99 of 87-142 ms against 28-32 ms live; the steps with
    prompt tokens shared better still (3-4)."""
    decode = shared_parallelism(contention.get(point.model, {}))
    if decode is None:
        return point
    kept = max(1.0, decode)
    values[f"{point.model}.parallelism"] = provenance(decode, kept, "fitted")
    point = replace(point, parallelism=kept)
    prefill = shared_parallelism(*(contention.get(point.model + kind, {}) for kind in (" mixed", " prefill")))
    if prefill is not None:
        kept = max(1.0, prefill)
        values[f"{point.model}.prefill_parallelism"] = provenance(prefill, kept, "fitted")
        point = replace(point, prefill_parallelism=kept)
    return point


LIVE_FIELDS = ("prefill_base_s", "prefill_per_token_s", "prefill_per_seq_s")


def with_live_prefill(point: SizePoint, sizes: list[dict], values: dict[str, dict]) -> SizePoint:
    """The point with the prefill costs a live cluster fitted for its size (bench/step_costs.py's `sizes`,
    the one within SAME_SIZE of its weight bytes, as the scheduler matches measured sizes to a profile's),
    recorded in `values`; as it was where none was measured."""
    live = next(
        (r for r in sizes if abs(r["weight_gb"] * 1e9 - point.weight_bytes) <= SAME_SIZE * point.weight_bytes), None
    )
    if live is None:
        return point
    for name in LIVE_FIELDS:
        values[f"{point.model}.{name}"] = {
            "how": "fitted",
            "live": f"{live['steps']:.0f} alone steps",
            **(
                {
                    "note": "0: the live fit keeps each cost at 0 or more "
                    "(services/common/step_costs.py), so it may be clamped"
                }
                if live[name] == 0.0
                else {}
            ),
        }
    return replace(point, **{name: live[name] for name in LIVE_FIELDS})


def kv_bytes_per_token(config: dict) -> int:
    """K and V of every layer for one token, from a Hugging Face config.json."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim", int(config["hidden_size"]) // heads))
    element = {"float32": 4}.get(str(config.get("torch_dtype", "bfloat16")), 2)
    return int(config["num_hidden_layers"]) * 2 * int(config.get("num_key_value_heads", heads)) * head_dim * element


def fit_profile(
    results_dir: str | Path,
    configs_dir: str | Path,
    *,
    decode_file: str = "decode_throughput-h200-fused.json",
    attention_file: str = "decode_attention-h200.json",
    activation_file: str = "activation-h200.json",
    colocated_file: str | None = None,
    prefill_file: str | None = None,
    step_log_file: str | None = None,
    step_costs_file: str | None = None,
    parallelism_by_size: bool = False,
) -> LatencyProfile:
    """Fits the profile from three benchmark results:
    - decode_file (bench/decode_throughput.py): per model, the decode step
      time at two batch sizes and the one-step prefill of the whole batch's
      prompts, which give the decode base and per-sequence costs and the
      prefill intercept and per-token cost;
    - attention_file (bench/decode_attention.py): the Triton decode kernel's
      time against the KV it reads, whose slope is the attention read rate
      (taken out of the decode fit at the benchmark's mean context);
    - activation_file (bench/activation.py): activation and load seconds
      against weight bytes;
    - colocated_file (bench/colocated_steps.py), if given: two engines'
      decode steps alone and together on one device; the device's
      parallelism is the sum of their alone/together ratios (the share of
      the device each gets while both are busy; 1 when fully serialized),
      kept within [1, 2]. Without it, 1;
    - prefill_file (bench/prefill_steps.py), if given: per model, the time to
      first token of single prompts of several lengths and of batches of
      short ones, which give the prefill intercept, per-prompt and per-token
      costs (fit_prefill) in place of decode_file's two batch prefills (whose
      slope is mostly the per-prompt cost: 32 prompts of 128 tokens);
    - step_log_file (bench/step_log_summary.py --json), if given: a cluster
      run's CUDA-graph captures, whose mean time is graph_capture_s. Without
      it, 0;
    - step_costs_file (bench/step_costs.py), if given: the costs a live
      cluster's scheduler fitted from its engines' alone steps; their prefill
      costs (base, per token, per prompt) replace the ones above for the sizes
      it measured. A cluster's prefill steps are eager and host-bound: on the
      H100 they cost 1.5-2x what single-prompt TTFTs give, and with them the
      simulator's attainment on two live showdowns neither fit saw came
      within 2.1 and 2.6 points of live on average (3.0 and 3.1 before).
    parallelism_by_size: each size's parallelism from the step log's contention table (with_parallelism) in
    place of the device's one, for decode steps and for steps with prompt tokens apart. On for the committed
    H100 profile since 2026-12-08: fitted on the live showdown at 17 req/s
    (bench/results/one_gpu-h100-live-17-steps.json), the simulator came within 0.3-0.6 points of the
    22 req/s showdown it did not see (30-33 points below with the one parallelism of 1.25), its TPOT p50
    within 8-15% of live and p99 within 3-11% (p99 3.8-4.6x live before; 1.2-1.5x with the decode steps'
    parallelism for every step). On older showdowns whose live points still had
    cold-start TTFT tails (p99 2-6 s) it is further off (8.0 points on average over 28, against 6.3): those
    tails, fixed since, are not modelled, and the old profile's TPOT misses stood in for them."""
    results_dir, configs_dir = Path(results_dir), Path(configs_dir)
    decode = json.loads((results_dir / decode_file).read_text())
    attention = json.loads((results_dir / attention_file).read_text())
    activation = json.loads((results_dir / activation_file).read_text())
    prefill = json.loads((results_dir / prefill_file).read_text()) if prefill_file else None
    step_log = json.loads((results_dir / step_log_file).read_text()) if step_log_file else None
    captures = step_log["graph_captures"] if step_log else None
    contention = step_log.get("contention") if step_log else None
    graph_capture_s = captures["seconds"] / captures["n"] if captures and captures["n"] else 0.0
    parallelism = 1.0
    if colocated_file:
        colocated = json.loads((results_dir / colocated_file).read_text())
        decode_rows = [r for r in colocated["rows"] if r["step"] == "decode_step"]
        measured_parallelism = sum(r["alone_ms"] / r["together_ms"] for r in decode_rows)
        parallelism = min(2.0, max(1.0, measured_parallelism))

    # Attention: ms = t0 + MiB / rate per layer call; the slope is what scales with context.
    geometry = attention["geometry"]
    xs = [r["kv_mib"] * (1 << 20) for r in attention["results"]]
    ys = [r["triton_ms"] / 1e3 for r in attention["results"]]
    _, seconds_per_byte = _line(xs, ys)
    attention_rate = 1 / seconds_per_byte

    # How each number came to be: measured (a mean of measurements), fitted (a line through them),
    # clamped (a fit that came out negative, or out of range, kept at the bound), or assumed.
    values: dict[str, dict] = {"attention_bytes_per_s": provenance(attention_rate, attention_rate, "fitted")}
    settings = decode["settings"]
    prompt, new = settings["prompt_tokens"], settings["new_tokens"]
    mean_context = prompt + new / 2  # the timed decode steps' mean context
    points = []
    for model in sorted({r["model"] for r in decode["results"]}):
        rows = sorted((r for r in decode["results"] if r["model"] == model), key=lambda r: r["batch"])
        small, large = rows[0], rows[-1]
        config = json.loads((configs_dir / model / "config.json").read_text())
        kv = kv_bytes_per_token(config)

        def without_attention(row: dict) -> float:
            return row["step_ms"] / 1e3 - row["batch"] * mean_context * kv / attention_rate

        per_seq = (without_attention(large) - without_attention(small)) / (large["batch"] - small["batch"])
        base = without_attention(small) - per_seq * small["batch"]
        if prefill is None:
            # The prefill step of b prompts: intercept + slope * b * prompt tokens.
            p_small, p_large = small["prefill_ms"] / 1e3, large["prefill_ms"] / 1e3
            per_token = (p_large - p_small) / ((large["batch"] - small["batch"]) * prompt)
            intercept, per_prompt = p_small - per_token * small["batch"] * prompt, 0.0
        else:
            prefill_rows = [r for r in prefill["results"] if r["model"] == model]
            if not prefill_rows:
                raise ValueError(f"{prefill_file} has no rows of {model}, which {decode_file} has")
            intercept, per_prompt, per_token = fit_prefill(prefill_rows)
        point = SizePoint(
            model=model,
            weight_bytes=round(small["weight_gb"] * 1e9),
            decode_base_s=base,
            decode_per_seq_s=max(0.0, per_seq),
            prefill_base_s=max(0.0, intercept - base),
            prefill_per_token_s=max(0.0, per_token),
            prefill_per_seq_s=max(0.0, per_prompt),
        )
        points.append(point)
        fitted = {
            "decode_base_s": base,
            "decode_per_seq_s": per_seq,
            "prefill_base_s": intercept - base,
            "prefill_per_token_s": per_token,
            "prefill_per_seq_s": per_prompt,
        }
        for name, raw in fitted.items():
            assumed = name == "prefill_per_seq_s" and prefill is None
            values[f"{model}.{name}"] = provenance(raw, getattr(point, name), "assumed" if assumed else "fitted")
    points.sort(key=lambda p: p.weight_bytes)
    if parallelism_by_size and contention and all(p.model in contention for p in points):
        points = [with_parallelism(point, contention, values) for point in points]
    step_costs = json.loads((results_dir / step_costs_file).read_text()) if step_costs_file else None
    if step_costs is not None:
        points = [with_live_prefill(point, step_costs["sizes"], values) for point in points]

    rows = activation["results"]
    weights = [r["weight_gb"] * 1e9 for r in rows]
    act_overhead, act_slope = _line(weights, [r["activate_s"] for r in rows])
    load_base, load_slope = _line(weights, [r["load_s"] for r in rows])
    deactivation_s = sum(r["deactivate_s"] for r in rows) / len(rows)
    values.update(
        {
            "copy_bytes_per_s": provenance(1 / act_slope, 1 / act_slope, "fitted"),
            "activation_overhead_s": provenance(act_overhead, max(0.0, act_overhead), "fitted"),
            "deactivation_s": provenance(deactivation_s, deactivation_s, "measured"),
            "load_base_s": provenance(load_base, max(0.0, load_base), "fitted"),
            "load_bytes_per_s": (
                provenance(1 / load_slope, 1 / load_slope, "fitted")
                if load_slope > 0
                else {"how": "assumed", "why": "the load times do not grow with weight bytes: infinite"}
            ),
            "device_parallelism": (
                provenance(measured_parallelism, parallelism, "measured")
                if colocated_file
                else {"how": "assumed", "why": "no colocated steps measured: steps one at a time"}
            ),
            "graph_capture_s": (
                provenance(graph_capture_s, graph_capture_s, "measured")
                if captures
                else {"how": "assumed", "why": "no captures measured: 0"}
            ),
        }
    )
    device = decode["environment"]["device"]
    metadata = {
        "device": device,
        "activation_device": activation["environment"]["device"],
        "sources": {
            "decode": f"bench/results/{decode_file}",
            "attention": f"bench/results/{attention_file}",
            "activation": f"bench/results/{activation_file}",
            **({"colocated": f"bench/results/{colocated_file}"} if colocated_file else {}),
            **({"prefill": f"bench/results/{prefill_file}"} if prefill_file else {}),
            **({"step_log": f"bench/results/{step_log_file}"} if step_log_file else {}),
            **({"step_costs": f"bench/results/{step_costs_file}"} if step_costs_file else {}),
        },
        "source_dates": {
            "decode": decode["environment"]["date"],
            "attention": attention["environment"]["date"],
            "activation": activation["environment"]["date"],
        },
        "measured": [
            f"decode step time at batch {small['batch']} and {large['batch']} ({prompt}-token prompts, {new} new "
            f"tokens) for {', '.join(p.model for p in points)}: decode_base_s, decode_per_seq_s",
            (
                f"time to first token of single prompts of {sorted({r['prompt_tokens'] for r in prefill['results']})} "
                f"tokens and batches of {sorted({r['batch'] for r in prefill['results']} - {1})} prompts: "
                "prefill_base_s, "
                "prefill_per_seq_s, prefill_per_token_s (the intercept includes the client's submission overhead)"
                if prefill
                else f"one-step prefill of {small['batch']} and {large['batch']} prompts of {prompt} tokens: "
                "prefill_base_s, "
                "prefill_per_token_s (the prefill intercept includes the client's submission overhead)"
            ),
            f"Triton decode attention on the {geometry['kv_heads']}-KV-head geometry: attention_bytes_per_s",
            "activation (weights host to device) and engine load (dummy weights) of the 1B, 3B and 8B configs: "
            "copy_bytes_per_s, activation_overhead_s, load_base_s, load_bytes_per_s, deactivation_s",
            *(
                [
                    "prefill costs of "
                    f"{', '.join(p.model for p in points if values[p.model + '.prefill_base_s'].get('live'))}"
                    f" from a live cluster's alone steps, {step_costs['date']}: prefill_base_s, prefill_per_token_s, "
                    "prefill_per_seq_s"
                ]
                if step_costs
                else []
            ),
            *(
                [
                    f"{captures['n']} CUDA-graph captures of decode steps in a cluster run's engine step log, "
                    f"{captures['seconds']:.2f} s in all: graph_capture_s (their mean)"
                ]
                if captures
                else []
            ),
            *(
                [
                    f"the same step log's steps beside other engines' steps, per model: parallelism (its CUDA-graph "
                    "decode steps) and prefill_parallelism (its steps with prompt tokens), each the steps-weighted "
                    f"mean of concurrency over slowdown where {SHARED_FROM_CONCURRENCY:g} or more engines stepped at "
                    "once"
                ]
                if any(p.parallelism for p in points)
                else []
            ),
        ],
        "values": values,
        "assumptions": [
            "linear in weight bytes between the measured sizes, the last slope beyond the largest, the smallest's "
            "numbers below it; tensor parallelism is not modeled",
            (
                "prefill cost is linear in prompt tokens (no quadratic attention term) up to the step budget, and a "
                "chunk's attention over earlier context is not charged"
                if prefill
                else "prefill cost is linear in prompt tokens (no quadratic attention term; measured on 128-token "
                "prompts "
                "only), and a chunk's attention over earlier context is not charged"
            ),
            "decode attention cost is the kernel's per-byte slope applied to all layers' KV (measured on one layer)",
            (
                "colocated engines' steps are slowed by how many engines step at once over their size's parallelism "
                "for their kind of step (processor sharing), whatever the sizes and steps beside them, and a size "
                "between the measured ones interpolated"
                if any(p.parallelism for p in points)
                else f"colocated engines share a GPU as {parallelism:.2f} alone-steps at once (measured with two "
                "engines' decode "
                "steps; more engines assumed to share it the same way)"
                if colocated_file
                else "colocated engines on a GPU run their steps one at a time (no overlap of their kernels)"
            ),
            "a load reads weights as fast as the benchmark's dummy-weight load (no disk or network time)",
            "KV slots are placed on pages as kvcached places them (best fit; a page is unmapped with its last "
            "slot: the simulator's CountingPool), not checked against a GPU's page counts",
            (
                "every CUDA-graph capture takes the mean one's time, whatever the model and shape"
                if captures
                else "no CUDA-graph capture time (not measured: graph_capture_s 0)"
            ),
        ],
    }
    return LatencyProfile(
        device=device,
        points=tuple(points),
        attention_bytes_per_s=attention_rate,
        copy_bytes_per_s=1 / act_slope,
        activation_overhead_s=max(0.0, act_overhead),
        deactivation_s=deactivation_s,
        load_base_s=max(0.0, load_base),
        load_bytes_per_s=1 / load_slope if load_slope > 0 else float("inf"),
        device_parallelism=parallelism,
        graph_capture_s=graph_capture_s,
        metadata=metadata,
    )
