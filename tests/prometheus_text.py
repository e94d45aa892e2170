"""Reading a Prometheus exposition in tests."""

from __future__ import annotations


def metric_values(text: str) -> dict[str, float]:
    """'name{labels}' -> value of every sample in an exposition."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples
