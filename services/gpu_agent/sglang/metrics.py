"""SGLang's /metrics (Prometheus text exposition, with --enable-metrics).

The scheduler's gauges read here (names as in SGLang's
sglang/srt/metrics/collector.py): sglang:num_running_reqs,
sglang:num_queue_reqs, sglang:num_used_tokens, sglang:token_usage and, in
newer versions, sglang:kv_available_tokens. Each carries labels (model_name,
and tp_rank/dp_rank/engine_type depending on the version); samples of one
name are summed over data-parallel ranks and counted once per TP group (the
scheduler of TP rank 0 reports for its group)."""

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
        rest = line[i + 1:].split()
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


def summarize(samples: list[Sample]) -> SGLangMetrics:
    def total(name: str) -> float | None:
        values = [s.value for s in samples
                  if s.name == name and s.labels.get("tp_rank", "0") == "0" and not math.isnan(s.value)]
        return sum(values) if values else None

    usage = [s.value for s in samples if s.name == "sglang:token_usage" and not math.isnan(s.value)]
    available = total("sglang:kv_available_tokens")
    return SGLangMetrics(
        running_requests=int(total("sglang:num_running_reqs") or 0),
        queued_requests=int(total("sglang:num_queue_reqs") or 0),
        used_tokens=int(total("sglang:num_used_tokens") or 0),
        token_usage=max(usage) if usage else 0.0,
        available_tokens=None if available is None else int(available),
    )


def parse_sglang_metrics(text: str) -> SGLangMetrics:
    return summarize(parse_prometheus_text(text))
