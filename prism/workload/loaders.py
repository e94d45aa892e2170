"""Public LLM-serving traces as Prism traces.

- Azure LLM inference trace (Azure/AzurePublicDataset, 2023 and 2024 files):
  CSV `TIMESTAMP,ContextTokens,GeneratedTokens`, TIMESTAMP a date-time such as
  `2023-11-16 18:15:46.6805900`. It names no model.
- BurstGPT (HPMLL/BurstGPT): CSV `Timestamp,Model,Request tokens,Response
  tokens,Total tokens,Log Type`, Timestamp in seconds; rows whose response
  has 0 tokens are failed requests and are left out unless asked for.

Times become seconds from the first request, multiplied by `time_scale`
(0.1: ten times the rate). Requests are mapped onto the configured models:
`zipf` draws a model per request by Zipf popularity over the given order
(seeded), `round-robin` cycles through them, and `source` (BurstGPT) maps
each of the trace's own models, most frequent first, onto the configured
ones in order (wrapping around)."""

from __future__ import annotations

import csv
import datetime as dt
import random
from collections import Counter
from pathlib import Path

from prism.workload.trace import Trace, TraceRequest

ASSIGNMENTS = ("zipf", "round-robin", "source")


def _azure_time(text: str) -> float:
    text = text.strip()
    whole, _, fraction = text.partition(".")
    moment = dt.datetime.fromisoformat(whole)
    return moment.timestamp() + (float("0." + fraction) if fraction else 0.0)


class _Assigner:
    def __init__(self, models: list[str], how: str, zipf_alpha: float, seed: int, sources: Counter | None = None):
        if not models:
            raise ValueError("no models to map the trace onto")
        if how not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {', '.join(ASSIGNMENTS)}, got {how!r}")
        if how == "source" and sources is None:
            raise ValueError("'source' assignment needs a trace that names models (BurstGPT)")
        self.models, self.how = models, how
        self.rng = random.Random(seed)
        self.weights = [1 / (i + 1) ** zipf_alpha for i in range(len(models))]
        self.count = 0
        self.by_source = (
            {src: models[i % len(models)] for i, (src, _) in enumerate(sources.most_common())}
            if sources is not None
            else {}
        )

    def __call__(self, source: str | None) -> str:
        self.count += 1
        if self.how == "round-robin":
            return self.models[(self.count - 1) % len(self.models)]
        if self.how == "source":
            return self.by_source[source]
        return self.rng.choices(self.models, self.weights)[0]


def _finish(rows: list[tuple[float, str, int, int]], metadata: dict, time_scale: float) -> Trace:
    if time_scale <= 0:
        raise ValueError("time_scale must be positive")
    rows.sort(key=lambda r: r[0])
    start = rows[0][0] if rows else 0.0
    requests = tuple(
        TraceRequest(round((t - start) * time_scale, 6), model, max(1, p), max(1, o)) for t, model, p, o in rows
    )
    return Trace(requests, {**metadata, "time_scale": time_scale})


def load_azure(
    path: str | Path,
    models: list[str],
    *,
    time_scale: float = 1.0,
    assign: str = "zipf",
    zipf_alpha: float = 1.0,
    seed: int = 0,
    limit: int | None = None,
) -> Trace:
    assigner = _Assigner(models, assign, zipf_alpha, seed)
    rows: list[tuple[float, str, int, int]] = []  # (arrival time, model, prompt tokens, output tokens)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not an Azure LLM inference trace (missing columns {sorted(missing)})")
        for number, row in enumerate(reader, 2):
            if limit is not None and len(rows) >= limit:
                break
            try:
                rows.append(
                    (
                        _azure_time(row["TIMESTAMP"]),
                        assigner(None),
                        int(row["ContextTokens"]),
                        int(row["GeneratedTokens"]),
                    )
                )
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
    return _finish(rows, {"source": "azure", "file": str(path), "assign": assign}, time_scale)


def load_burstgpt(
    path: str | Path,
    models: list[str],
    *,
    time_scale: float = 1.0,
    assign: str = "source",
    zipf_alpha: float = 1.0,
    seed: int = 0,
    limit: int | None = None,
    keep_failed: bool = False,
) -> Trace:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"Timestamp", "Model", "Request tokens", "Response tokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a BurstGPT trace (missing columns {sorted(missing)})")
        raw: list[tuple[float, str, int, int]] = []  # (timestamp, its model, prompt tokens, output tokens)
        for number, row in enumerate(reader, 2):
            if limit is not None and len(raw) >= limit:
                break
            try:
                item = (float(row["Timestamp"]), row["Model"], int(row["Request tokens"]), int(row["Response tokens"]))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
            if item[3] == 0 and not keep_failed:
                continue
            raw.append(item)
    assigner = _Assigner(models, assign, zipf_alpha, seed, Counter(r[1] for r in raw))
    rows = [(t, assigner(src), p, o) for t, src, p, o in raw]
    return _finish(rows, {"source": "burstgpt", "file": str(path), "assign": assign}, time_scale)
