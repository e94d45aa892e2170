"""The bursty-group workload: many models, a few groups of them active at a
time (the groups take turns), popularity skewed within the active ones, and
bursty arrivals. Every parameter is explicit and the generator is seeded, so
a trace is reproducible from its metadata.

The model: time is cut into windows of `shift_s`; in each window
`active_groups` of the `num_groups` groups are active (drawn afresh, seeded).
Within the window, the active models share `rate` requests/s by Zipf
popularity (weight 1/rank^`zipf_alpha`, ranks fixed per model), and every
other model gets `idle_fraction` of its active share. Each model's arrivals
in a window form a renewal process with Gamma inter-arrival times of
coefficient of variation `burstiness_cv` (1: Poisson; above 1: bursts).
Prompt and output lengths are log-normal with the given means and standard
deviations, clipped to [1, max]. The groups and the windows' draws come from
the seed alone, and each model's arrivals and lengths in a window from a
stream of their own, so traces that differ only in `rate` share every
window's groups and, scaled, every model's arrivals and lengths."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from prism.workload.trace import Trace, TraceRequest


@dataclass(frozen=True)
class BurstyGroupParams:
    num_models: int = 18
    num_groups: int = 3
    active_groups: int = 1
    shift_s: float = 60.0
    rate: float = 10.0  # requests/s over all active models
    idle_fraction: float = 0.02
    zipf_alpha: float = 1.0
    burstiness_cv: float = 2.0
    prompt_mean: float = 512.0
    prompt_std: float = 256.0
    output_mean: float = 128.0
    output_std: float = 64.0
    max_prompt: int = 4096
    max_output: int = 1024
    duration_s: float = 600.0
    seed: int = 0

    def check(self) -> None:
        problems = []
        if self.num_models < 1 or self.num_groups < 1 or self.num_groups > self.num_models:
            problems.append("need 1 <= num_groups <= num_models")
        if not 1 <= self.active_groups <= self.num_groups:
            problems.append("need 1 <= active_groups <= num_groups")
        for name in ("shift_s", "rate", "burstiness_cv", "prompt_mean", "output_mean", "duration_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        for name in ("idle_fraction", "zipf_alpha", "prompt_std", "output_std"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if problems:
            raise ValueError("; ".join(problems))


def model_names(count: int) -> list[str]:
    return [f"model-{i}" for i in range(count)]


def _lognormal(rng: random.Random, mean: float, std: float, upper: int) -> int:
    if std == 0:
        return max(1, min(upper, round(mean)))
    sigma2 = math.log(1 + (std / mean) ** 2)
    value = rng.lognormvariate(math.log(mean) - sigma2 / 2, math.sqrt(sigma2))
    return max(1, min(upper, round(value)))


def _arrivals(rng: random.Random, rate: float, cv: float, start: float, end: float) -> list[float]:
    """A Gamma renewal process of the given rate and CV on [start, end),
    begun in equilibrium (the first gap is a fresh draw scaled by a uniform,
    so short windows are not biased towards late first arrivals)."""
    if rate <= 0:
        return []
    shape = 1 / (cv * cv)
    scale = 1 / (rate * shape)
    out = []
    t = start + rng.gammavariate(shape, scale) * rng.random()
    while t < end:
        out.append(t)
        t += rng.gammavariate(shape, scale)
    return out


def bursty_group_trace(params: BurstyGroupParams, models: list[str] | None = None) -> Trace:
    """models: names to use (their count is num_models); default model-0, model-1, ..."""
    params.check()
    names = list(models) if models is not None else model_names(params.num_models)
    if len(names) != params.num_models:
        raise ValueError(f"{len(names)} model names for num_models={params.num_models}")
    rng = random.Random(params.seed)
    order = names[:]
    rng.shuffle(order)
    groups = [order[g :: params.num_groups] for g in range(params.num_groups)]
    rank = {m: i + 1 for group in groups for i, m in enumerate(group)}  # popularity rank within its group
    requests: list[TraceRequest] = []
    windows = []
    start = 0.0
    while start < params.duration_s:
        end = min(start + params.shift_s, params.duration_s)
        active = sorted(rng.sample(range(params.num_groups), params.active_groups))
        windows.append({"start": start, "active_groups": active})
        active_models = [m for g in active for m in groups[g]]
        weights = {m: 1 / rank[m] ** params.zipf_alpha for m in names}
        total = sum(weights[m] for m in active_models)
        for m in names:
            share = params.rate * weights[m] / total
            rate = share if m in active_models else share * params.idle_fraction
            # Each model's window draws from streams of its own: the schedule above never depends on the
            # rate, and at twice the rate a window's arrivals are the same gaps halved with the same
            # lengths first, so a sweep of rates changes nothing but the rate.
            stream = f"{params.seed}:{m}:{len(windows)}"
            lengths = random.Random(stream + ":lengths")
            for t in _arrivals(random.Random(stream), rate, params.burstiness_cv, start, end):
                requests.append(
                    TraceRequest(
                        t=round(t, 6),
                        model=m,
                        prompt_tokens=_lognormal(lengths, params.prompt_mean, params.prompt_std, params.max_prompt),
                        output_tokens=_lognormal(lengths, params.output_mean, params.output_std, params.max_output),
                    )
                )
        start = end
    requests.sort(key=lambda r: (r.t, r.model))
    return Trace(
        tuple(requests), {"generator": "bursty-group", "params": asdict(params), "groups": groups, "windows": windows}
    )
