"""A trace: requests with arrival times, target models and token counts.

Saved as JSON lines: a first line {"trace": {...metadata...}}, then one
request per line {"t": seconds, "model": name, "prompt_tokens": n,
"output_tokens": m}, in time order. The same file drives `prism bench`
(replayed against a cluster) and the simulator."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TraceRequest:
    t: float  # seconds from the trace's start
    model: str
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Trace:
    requests: tuple[TraceRequest, ...]
    metadata: dict[str, Any] = field(default_factory=dict)  # how it was made (generator parameters, source file)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].t if self.requests else 0.0

    @property
    def models(self) -> list[str]:
        return sorted({r.model for r in self.requests})

    def for_model(self, model: str) -> list[TraceRequest]:
        return [r for r in self.requests if r.model == model]

    def save(self, path: str | Path) -> None:
        with open(path, "w") as f:
            f.write(json.dumps({"trace": self.metadata}) + "\n")
            for r in self.requests:
                f.write(json.dumps(asdict(r)) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        requests, metadata = [], {}
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    if "trace" in item:
                        metadata = item["trace"]
                        continue
                    requests.append(
                        TraceRequest(
                            t=float(item["t"]),
                            model=str(item["model"]),
                            prompt_tokens=int(item["prompt_tokens"]),
                            output_tokens=int(item["output_tokens"]),
                        )
                    )
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{number}: not a trace line ({exc}): {line.strip()[:80]}") from None
        return cls(tuple(sorted(requests, key=lambda r: r.t)), metadata)

    def scaled(self, time_scale: float) -> Trace:
        """The same requests with times multiplied by time_scale (0.5: twice the rate)."""
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        return Trace(
            tuple(TraceRequest(r.t * time_scale, r.model, r.prompt_tokens, r.output_tokens) for r in self.requests),
            {**self.metadata, "time_scale": time_scale},
        )
