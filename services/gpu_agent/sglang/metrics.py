"""SGLang's /metrics (Prometheus text exposition, with --enable-metrics).

The scheduler's gauges read here (names as in SGLang 0.5.15's
python/sglang/srt/observability/metrics_collector.py):
sglang:num_running_reqs, sglang:num_queue_reqs, sglang:num_used_tokens,
sglang:token_usage (the fullest of its pools, 0..1),
sglang:kv_available_tokens (free slots) and sglang:kv_evictable_tokens
(slots holding prefix-cache entries that new requests may evict). Each
carries the labels model_name, engine_type, tp_rank, pp_rank, moe_ep_rank,
and dp_rank with data parallelism; with priority scheduling the total is
under priority="" and per-priority breakdowns under priority="<n>". Samples
of one name are summed over data-parallel ranks and counted once per TP and
PP group (TP rank 0, PP rank 0 report for theirs); breakdowns are skipped.
SGLang refreshes these gauges when it logs its statistics (every prefill,
every few decode steps), so they lag."""

from __future__ import annotations

import math
from dataclasses import dataclass


class MetricsFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_prometheus_text(text: str) -> list[Sample]:
    """Every sample of a text exposition (version 0.0.4): comments and blank
    lines skipped, label values unescaped, a trailing timestamp ignored."""
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            samples.append(_parse_line(line))
        except (ValueError, IndexError) as exc:
            raise MetricsFormatError(f"line {number} of the metrics is not a sample ({exc}): {line!r}") from None
    return samples


def _parse_line(line: str) -> Sample:
    labels: dict[str, str] = {}
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        name = line[:brace]
        i = brace + 1
        while line[i] != "}":
            eq = line.index("=", i)
            key = line[i:eq].strip().lstrip(",").strip()
            if line[eq + 1] != '"':
                raise ValueError(f"label {key} has no quoted value")
            j, value = eq + 2, []
            while line[j] != '"':
                if line[j] == "\\":
                    j += 1
                    value.append({"n": "\n", "\\": "\\", '"': '"'}.get(line[j], line[j]))
                else:
                    value.append(line[j])
                j += 1
            labels[key] = "".join(value)
            i = j + 1
            while line[i] in ", ":
                i += 1
        rest = line[i + 1 :].split()
    else:
        name, *rest = line.split()
    if not name or not rest:
        raise ValueError("no value")
    return Sample(name, labels, float(rest[0]))  # float() reads NaN, +Inf, -Inf


@dataclass(frozen=True)
class SGLangMetrics:
    running_requests: int
    queued_requests: int
    used_tokens: int
    token_usage: float  # used / total KV tokens, 0..1
    available_tokens: int | None  # None where the version does not export it
    evictable_tokens: int | None = None  # None where the version does not export it

    @property
    def free_tokens(self) -> int | None:
        """Slots a new request can have: free ones and evictable cached ones."""
        if self.available_tokens is None:
            return None
        return self.available_tokens + (self.evictable_tokens or 0)


def summarize(samples: list[Sample]) -> SGLangMetrics:
    def counted(s: Sample) -> bool:
        return (
            s.labels.get("tp_rank", "0") == "0"
            and s.labels.get("pp_rank", "0") == "0"
            and s.labels.get("priority", "") == ""
            and not math.isnan(s.value)
        )

    def total(name: str) -> float | None:
        values = [s.value for s in samples if s.name == name and counted(s)]
        return sum(values) if values else None

    usage = [s.value for s in samples if s.name == "sglang:token_usage" and not math.isnan(s.value)]
    available = total("sglang:kv_available_tokens")
    evictable = total("sglang:kv_evictable_tokens")
    return SGLangMetrics(
        running_requests=int(total("sglang:num_running_reqs") or 0),
        queued_requests=int(total("sglang:num_queue_reqs") or 0),
        used_tokens=int(total("sglang:num_used_tokens") or 0),
        token_usage=max(usage) if usage else 0.0,
        available_tokens=None if available is None else int(available),
        evictable_tokens=None if evictable is None else int(evictable),
    )


def parse_sglang_metrics(text: str) -> SGLangMetrics:
    return summarize(parse_prometheus_text(text))
