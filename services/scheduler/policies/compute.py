"""The compute-cost model: what an engine step costs on the cluster's GPUs, and
`compute_load`, the share of a GPU's time a model needs to keep its TPOT SLO
beside others (the prism policy sums these per GPU)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.step_costs import StepTimeSums, fit_coefficients

if TYPE_CHECKING:  # compute_load's types; the snapshot module imports this one for its default costs
    from services.common.placement_config import ModelConfig
    from services.scheduler.policies.snapshot import ClusterSnapshot, PolicyParams


@dataclass(frozen=True)
class StepCost:
    """The engine step-time constants of one model size (as the simulator's profile has them)."""

    weight_bytes: int
    decode_base_s: float  # a decode step's fixed cost
    decode_per_seq_s: float  # each decoding sequence, beyond its attention
    prefill_base_s: float  # a step with prefill tokens, beyond a decode step's base
    prefill_per_token_s: float
    prefill_per_seq_s: float = 0.0  # each prompt in a prefill step


@dataclass(frozen=True)
class ComputeCosts:
    """What an engine step costs on the cluster's GPUs, by model size (linear
    in weight bytes between the sizes, the smallest's below them, the last
    slope above), and decode attention's KV read rate."""

    points: tuple[StepCost, ...]  # ascending weight bytes
    attention_bytes_per_s: float

    def at(self, weight_bytes: int, name: str) -> float:
        return by_weight(self.points, weight_bytes, name)


def by_weight(points: tuple, weight_bytes: int, name: str) -> float:
    """Field `name` of points (ascending weight_bytes) at weight_bytes: linear
    between the two points around it, the first's value below them, the last
    two's slope above; never negative."""
    if len(points) == 1 or weight_bytes <= points[0].weight_bytes:
        return getattr(points[0], name)
    lo, hi = points[-2], points[-1]
    for a, b in zip(points, points[1:]):
        if weight_bytes <= b.weight_bytes:
            lo, hi = a, b
            break
    x = (weight_bytes - lo.weight_bytes) / (hi.weight_bytes - lo.weight_bytes)
    return max(0.0, getattr(lo, name) + x * (getattr(hi, name) - getattr(lo, name)))


# The H200 fit in bench/results/sim-profile-h200.json (Llama 3.2 1B and 3.1 8B, bf16,
# the built-in engine), rounded; a cluster of other GPUs passes its own (the
# simulator passes its profile's: LatencyProfile.compute_costs()).
H200_COMPUTE_COSTS = ComputeCosts(
    points=(
        StepCost(2_471_628_800, 1.48e-3, 3.79e-5, 1.149e-2, 1.328e-5),
        StepCost(16_060_522_496, 5.07e-3, 4.13e-5, 1.671e-2, 2.227e-5),
    ),
    attention_bytes_per_s=4.61e12,
)
# The H100 fit in bench/results/sim-profile-h100.json (Llama 3.2 1B and 3B, 3.1 8B, bf16, the
# built-in engine on kvcached), rounded: a decode step costs about a third more than on the H200;
# the prefill costs are a live cluster's (bench/results/step_costs-h100.json).
H100_COMPUTE_COSTS = ComputeCosts(
    points=(
        StepCost(2_471_628_800, 1.92e-3, 3.74e-5, 1.563e-2, 1.70e-6),
        StepCost(6_425_499_648, 3.84e-3, 5.87e-5, 1.650e-2, 5.58e-6),
        StepCost(16_060_522_496, 6.88e-3, 6.31e-5, 1.208e-2, 1.585e-5),
    ),
    attention_bytes_per_s=3.02e12,
)
# Costs by a word in the device's name, as torch names it ("NVIDIA H100 80GB HBM3").
COSTS_BY_CARD = {"H100": H100_COMPUTE_COSTS, "H200": H200_COMPUTE_COSTS}
# A CUDA card named in none: the slower of the fitted ones, so compute is not over-promised.
UNKNOWN_CARD_COSTS = H100_COMPUTE_COSTS


def card_of(device_name: str) -> str | None:
    """The COSTS_BY_CARD key a device name holds, if any."""
    return next((card for card in COSTS_BY_CARD if card in device_name.upper()), None)


def compute_costs_for(devices: list[tuple[str, str]]) -> ComputeCosts:
    """The step costs the policies price compute with, from the cluster's devices as (kind, name):
    the fitted costs of the card they name; on a mix of cards, the slowest card's (its 8B-sized
    decode step the longest), since one cost model prices every GPU; a CUDA card named in none,
    UNKNOWN_CARD_COSTS. A cluster of CPU devices alone keeps the H200 constants it always had (its
    placement tests were written against them; no CPU fit prices compute here)."""
    cuda = [name for kind, name in devices if kind == "cuda"]
    if not cuda:
        return H200_COMPUTE_COSTS
    costs = {COSTS_BY_CARD.get(card_of(name) or "", UNKNOWN_CARD_COSTS) for name in cuda}
    return max(costs, key=lambda c: c.at(16_060_522_496, "decode_base_s"))


def compute_costs_from_profile(data: dict) -> ComputeCosts:
    """Step costs from a latency profile's JSON (bench/results/sim-profile-*.json: `points`, each with
    weight_bytes, decode_base_s, decode_per_seq_s, prefill_base_s, prefill_per_token_s and optionally
    prefill_per_seq_s; `attention_bytes_per_s`): an operator's own fit. ValueError says what is wrong."""
    try:
        points = tuple(
            sorted(
                (
                    StepCost(
                        int(p["weight_bytes"]),
                        float(p["decode_base_s"]),
                        float(p["decode_per_seq_s"]),
                        float(p["prefill_base_s"]),
                        float(p["prefill_per_token_s"]),
                        float(p.get("prefill_per_seq_s", 0.0)),
                    )
                    for p in data["points"]
                ),
                key=lambda c: c.weight_bytes,
            )
        )
        attention = float(data["attention_bytes_per_s"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"not a latency profile (points with weight_bytes, decode_base_s, decode_per_seq_s, "
            f"prefill_base_s, prefill_per_token_s; attention_bytes_per_s): {exc!r}"
        ) from None
    if not points:
        raise ValueError("a latency profile needs at least one point")
    if attention <= 0 or any(v < 0 for c in points for v in vars(c).values()):
        raise ValueError("a latency profile's costs must not be negative and its attention rate must be positive")
    return ComputeCosts(points=points, attention_bytes_per_s=attention)


# Engines of one size must have run this many steps (faded sums) before their fit prices compute.
MIN_MEASURED_STEPS = 200.0
SAME_SIZE = 0.02  # a profile point this close in weight bytes to a measured size is replaced by it


@dataclass(frozen=True)
class MeasuredSize:
    """The costs fitted for one model size from its engines' steps (prism status shows these)."""

    cost: StepCost
    attention_bytes_per_s: float
    steps: float  # the steps behind it (faded sums of every engine of this size)


def coefficients_at(costs: ComputeCosts, weight_bytes: int) -> tuple[float, ...]:
    """The costs at a size as services.common.step_costs' coefficients (its order and units)."""

    def at(name: str) -> float:
        return costs.at(weight_bytes, name)

    return (
        at("decode_base_s"),
        at("decode_per_seq_s"),
        1e9 / costs.attention_bytes_per_s,
        at("prefill_base_s"),
        1000 * at("prefill_per_token_s"),
        at("prefill_per_seq_s"),
    )


def measured_sizes(
    costs: ComputeCosts, sums_by_weight: Mapping[int, StepTimeSums], min_steps: float = MIN_MEASURED_STEPS
) -> dict[int, MeasuredSize]:
    """Each model size whose engines ran `min_steps` steps, fitted with `costs` as the prior."""
    out = {}
    for weight_bytes, sums in sorted(sums_by_weight.items()):
        if sums.steps < min_steps:
            continue
        base, per_seq, s_per_gb, prefill_base, per_ktoken, prefill_per_seq = fit_coefficients(
            sums, coefficients_at(costs, weight_bytes)
        )
        out[weight_bytes] = MeasuredSize(
            StepCost(weight_bytes, base, per_seq, prefill_base, per_ktoken / 1000, prefill_per_seq),
            1e9 / s_per_gb if s_per_gb > 0 else float("inf"),
            sums.steps,
        )
    return out


def with_measured(costs: ComputeCosts, measured: Mapping[int, MeasuredSize]) -> ComputeCosts:
    """`costs` with each measured size's fitted point in place of (or beside) the profile's points, and
    the attention rate the measured sizes' fits give (weighted by their steps) where they give one."""
    if not measured:
        return costs
    kept = [p for p in costs.points if all(abs(p.weight_bytes - w) > SAME_SIZE * w for w in measured)]
    points = tuple(sorted(kept + [m.cost for m in measured.values()], key=lambda c: c.weight_bytes))
    finite = [m for m in measured.values() if m.attention_bytes_per_s != float("inf")]
    attention = costs.attention_bytes_per_s
    if finite:  # the steps' mean seconds per KV byte
        attention = sum(m.steps for m in finite) / sum(m.steps / m.attention_bytes_per_s for m in finite)
    return ComputeCosts(points=points, attention_bytes_per_s=attention)


DEFAULT_TPOT_S = 0.1  # the agent's default TPOT SLO (services/gpu_agent/slo.py)


def compute_load(
    snapshot: ClusterSnapshot, model: ModelConfig, params: PolicyParams, rate: float | None = None
) -> float:
    """The share of one GPU's time (each of its GPUs, for tensor parallelism)
    that the model needs to keep its TPOT SLO while it shares the GPU.

    Colocated engines run their steps one at a time, so a GPU's busy engines
    take turns in a round whose length is every step summed; a decoding
    request gets one token per round, so the round must stay within the TPOT
    SLO (times `cycle_fraction`, for bursts): the cycle C. Per second, a model
    then costs its fixed step cost once per round while it has requests in
    flight (busy), a prefill step's extra base per new request (at most once
    per round), and per-token work for its prompts and outputs:

        load = busy * decode_base / C + min(rate, 1/C) * prefill_base
               + rate * (prompt * prefill_per_token
                         + output * (decode_per_seq + context * kv_per_token / attention_rate))

    busy is the measured busy fraction, capped by what the rate implies at
    the cycle (1 - exp(-rate * T), T a request's time in flight: its output
    at one token per round), since a model that waited behind others looks
    busier than it would be; prompt and output are the reported means
    (defaults until a request finished). The loads of models on one GPU add
    up: they fit while the sum stays under `compute_capacity`. rate: in place
    of the reported arrival rate."""
    demand = snapshot.demand_of(model.model_name)
    rate = demand.arrival_rate if rate is None else rate
    weights = snapshot.weight_bytes.get(model.model_name, 0)
    costs = params.compute
    cycle = params.cycle_fraction * ((model.tpot_slo_ms / 1000) if model.tpot_slo_ms else DEFAULT_TPOT_S)
    prompt = demand.mean_prompt_tokens or params.default_prompt_tokens
    output = demand.mean_output_tokens or params.default_output_tokens
    kv_per_token = snapshot.kv_bytes_per_token.get(model.model_name) or weights * params.kv_bytes_per_weight_byte
    busy = 1 - math.exp(-rate * output * cycle)
    if demand.busy_fraction > 0:
        busy = min(busy, demand.busy_fraction)
    if demand.queued or demand.running:
        busy = max(busy, min(1.0, demand.busy_fraction) if demand.busy_fraction else 1.0)
    base = costs.at(weights, "decode_base_s")
    # Steps with prefill: a prompt is cut into chunks of the step's token budget; small ones share a step.
    prefill_steps = max(rate * prompt / params.step_tokens, min(rate, 1 / cycle))
    per_token = (
        costs.at(weights, "decode_per_seq_s") + (prompt + output / 2) * kv_per_token / costs.attention_bytes_per_s
    )
    load = (
        busy * base / cycle
        + max(0.0, prefill_steps - busy / cycle) * base
        + prefill_steps * costs.at(weights, "prefill_base_s")
        + rate
        * (
            costs.at(weights, "prefill_per_seq_s")
            + prompt * costs.at(weights, "prefill_per_token_s")
            + output * per_token
        )
    )
    return load / model.tp_size
