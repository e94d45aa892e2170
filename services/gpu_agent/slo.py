"""A model's latency targets and scheduling weight, as the agent applies them.

The placement config sets them per model (`slo: {ttft_ms, tpot_ms}`,
`priority`, `shed_load`); the scheduler passes them in ModelSpec; anything
unset takes the defaults here. The defaults suit the small models on CPU and
interactive serving on a GPU alike: a first token within a second, then at
least ten tokens a second."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TTFT_MS = 1000.0
DEFAULT_TPOT_MS = 100.0
DEFAULT_PRIORITY = 1


@dataclass(frozen=True)
class ModelSlo:
    ttft_ms: float = DEFAULT_TTFT_MS
    tpot_ms: float = DEFAULT_TPOT_MS
    priority: int = DEFAULT_PRIORITY  # weight in memory and admission contention (higher wins more)
    shed_load: bool = False  # refuse a request that cannot meet its TTFT instead of serving it late

    @property
    def ttft_s(self) -> float:
        return self.ttft_ms / 1000

    @property
    def tpot_s(self) -> float:
        return self.tpot_ms / 1000

    def met(self, ttft_s: float, tpot_s: float | None) -> bool:
        """Whether a finished request attained its SLO (tpot None: one output token, no TPOT)."""
        return ttft_s <= self.ttft_s and (tpot_s is None or tpot_s <= self.tpot_s)
