"""Post-mortem of a cluster run's serving latency from its logs: where the
time of each engine and each request went.

Run the cluster with PRISM_ENGINE_STEP_LOG=1 (every engine step is logged with
its batch and wall time, and every request's first token), keep its state
directory (bench/validate_simulator.py --state-dir), then:

    python bench/step_log_summary.py STATE_DIR [--json out.json] [--contention MODELS_JSON [--profile P]]

Per engine: steps by kind (CUDA-graph decode, eager decode, steps with
prefill) with their wall times, the busy fraction, graph captures, KV
preemptions, limit changes and activations. Per model: a request's wait in
the agent's admission queue (agent arrival -> engine queue), in the engine
before its first token, and to its end. With --contention (the placement config
the cluster ran): how much slower the CUDA-graph decode steps ran beside other
engines' steps than the profile's alone step, by concurrency and model (on the
H100 showdown, bench/results/one_gpu-h100-steplog-steps.json: alone steps 0.8-1.0x
the profile's; beside 4-5 others the 1B and 3B took 3.3x, the 8B 2.1x: the
1B/3B saw a parallelism of ~1.4, the 8B ~2.2, where the simulator assumes 1.25
for every engine)."""

from __future__ import annotations

import argparse
import bisect
import json
import re
import statistics
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.gpu_agent.request_stats import percentile  # noqa: E402  the agent's nearest rank

LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (\S+) \[([^\]]*)\] ([\w.]+): (.*)$")
STEP = re.compile(r"engine (\S+) step: (\d+) decode, (\d+) prefill tokens in (\d+) seqs, (graph|eager), ([\d.]+) ms")
CAPTURE = re.compile(r"captured the decode graph for batch (\d+), width (\d+) in ([\d.]+)s")
ENGINE_EVENT = re.compile(r"engine ([^\s:]+):? (activated in|deactivated|memory limit|admission waits for KV)")


def _time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p99": None}
    ordered = sorted(values)
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "p50": percentile(ordered, 0.5),
        "p99": percentile(ordered, 0.99),
    }


def summarize(lines) -> dict:
    steps: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    span: dict[str, list[float]] = {}
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    captures = {"n": 0, "seconds": 0.0}
    requests: dict[str, dict[str, float | str]] = defaultdict(dict)
    # (start, end, engine, decode, prefill tokens, prefill seqs, kind)
    intervals: list[tuple[float, float, str, int, int, int, str]] = []
    for raw in lines:
        m = LINE.match(raw.rstrip("\n"))
        if not m:
            continue
        stamp, _level, _service, rid, _logger, message = m.groups()
        t = _time(stamp)
        if s := STEP.match(message):
            engine, decode, prefill, seqs, kind, ms = s.groups()
            # logged at its end
            intervals.append((t - float(ms) / 1e3, t, engine, int(decode), int(prefill), int(seqs), kind))
            label = "prefill" if int(prefill) else f"decode-{kind}"
            steps[engine][label].append(float(ms))
            if label == "prefill":
                steps[engine]["prefill_tokens"].append(int(prefill))
            else:
                steps[engine][f"{label}-batch"].append(int(decode))
            first_last = span.setdefault(engine, [t, t])
            first_last[1] = t
            continue
        if c := CAPTURE.search(message):
            captures["n"] += 1
            captures["seconds"] += float(c.group(3))
        if e := ENGINE_EVENT.match(message):
            counts[e.group(1)][e.group(2)] += 1
        if message.startswith("preempted at"):
            counts["all"]["preempted"] += 1
        if message.startswith("switching ") and "off to make room" in message:
            counts["all"]["switched off to make room"] += 1
        if rid in ("-", ""):
            continue
        if message.startswith("generate model="):
            requests[rid]["model"] = message.split("=", 1)[1]
            requests[rid].setdefault("agent", t)
        elif message.startswith("queued:"):
            requests[rid].setdefault("engine", t)
        elif message == "first token":
            requests[rid].setdefault("first", t)
        elif message.startswith("finished ("):
            requests[rid]["end"] = t
    engines = {}
    for engine, by_kind in steps.items():
        busy_ms = sum(sum(v) for k, v in by_kind.items() if not k.endswith(("-batch", "_tokens")))
        seconds = max(1e-9, span[engine][1] - span[engine][0])
        prefill_ms, prefill_tokens = sum(by_kind["prefill"]), sum(by_kind["prefill_tokens"])
        engines[engine] = {
            "busy_fraction": busy_ms / 1e3 / seconds,
            **{kind: _stats(v) for kind, v in by_kind.items() if not kind.endswith("_tokens")},
            "prefill_ms_per_1k_tokens": 1e3 * prefill_ms / prefill_tokens if prefill_tokens else None,
            "events": dict(counts.get(engine, {})),
        }
    per_model: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in requests.values():
        model = r.get("model")
        if model is None:
            continue
        if "engine" in r:
            per_model[model]["admission_wait_s"].append(r["engine"] - r["agent"])
            if "first" in r:
                per_model[model]["engine_to_first_token_s"].append(r["first"] - r["engine"])
        if "end" in r:
            per_model[model]["agent_to_end_s"].append(r["end"] - r["agent"])
    return {
        "engines": engines,
        "graph_captures": captures,
        "events": dict(counts.get("all", {})),
        "models": {m: {k: _stats(v) for k, v in d.items()} for m, d in per_model.items()},
        "intervals": intervals,
    }


CONCURRENCY_BINS = ((1.0, 1.05), (1.05, 2.0), (2.0, 3.0), (3.0, 4.0), (4.0, 5.0), (5.0, float("inf")))


def step_class(decode: int, prefill: int, kind: str) -> str | None:
    """Which contention table a step goes into: "" for a CUDA-graph decode step (the group's own table,
    whence fit_profile's parallelism_by_size takes a size's parallelism), " mixed" for an eager step of
    decoding sequences and prompt tokens, " prefill" for prompt tokens alone (the two pooled give its
    prefill_parallelism); None for an eager pure decode step."""
    if prefill:
        return " mixed" if decode else " prefill"
    return "" if kind == "graph" else None


def contention(intervals: list[tuple], alone_s, group_of) -> dict:
    """How much slower the steps ran than alone, by how many engines' steps ran beside them: a step's
    concurrency is 1 plus the other engines' step time overlapping it, over its own time; its slowdown
    its wall time over alone_s(engine, decode, prefill, prefill_seqs) (the profile's alone step). Per
    group_of(engine), kind of step (step_class: CUDA-graph decode steps under the group's name, eager
    steps with prompt tokens under "GROUP mixed" and "GROUP prefill") and concurrency bin: steps, median
    slowdown, and the median of concurrency / slowdown (the parallelism the simulator's processor
    sharing would need for that step: 1 when the steps took turns). On the H100 (2026-12-07,
    one_gpu-h100-arrivals-steps.txt's cluster) the steps with prompt tokens shared the GPU far better
    than the decode steps did: beside 5 or more engines the 1B's and 3B's decode steps took 4.2-4.4x
    their alone time (parallelism 1.35-1.42), their mixed steps 1.3-1.6x (3.7-4.7)."""
    ordered = sorted(intervals)
    starts = [i[0] for i in ordered]
    longest = max((b - a for a, b, *_ in ordered), default=0.0)
    rows: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for a, b, engine, decode, prefill, seqs, kind in ordered:
        cls = step_class(decode, prefill, kind)
        alone = alone_s(engine, decode, prefill, seqs) if cls is not None else None
        if not alone or b <= a:
            continue
        overlap = 0.0
        for j in range(bisect.bisect_left(starts, a - longest), bisect.bisect_right(starts, b)):
            a2, b2, other = ordered[j][:3]
            if other != engine:
                overlap += max(0.0, min(b, b2) - max(a, a2))
        concurrency = 1 + overlap / (b - a)
        slowdown = (b - a) / alone
        bin_index = next(i for i, (lo, hi) in enumerate(CONCURRENCY_BINS) if lo <= concurrency < hi)
        rows[f"{group_of(engine)}{cls}"][bin_index].append((slowdown, concurrency / slowdown))
    return {
        group: {
            f"{CONCURRENCY_BINS[i][0]:g}-{CONCURRENCY_BINS[i][1]:g}": {
                "steps": len(v),
                "slowdown_p50": statistics.median(s for s, _ in v),
                "parallelism_p50": statistics.median(p for _, p in v),
            }
            for i, v in sorted(bins.items())
        }
        for group, bins in sorted(rows.items())
    }


def alone_step_of(models_json: Path, profile_json: Path, context_tokens: int):
    """(alone_s, group_of) from the placement config the cluster ran and a latency profile: an engine's
    pure decode step alone as the profile prices it (each sequence at context_tokens of context: the
    step log does not say), and its group, the model's config folder."""
    from prism.simulator.models import sim_model
    from prism.simulator.profile import LatencyProfile
    from services.common.placement_config import parse

    profile = LatencyProfile.load(profile_json)
    models = {m.model_name: m for m in parse(json.loads(models_json.read_text()), models_json.parent).models}
    sims = {name: sim_model(m) for name, m in models.items()}

    def alone_s(engine: str, decode: int, prefill: int = 0, prefill_seqs: int = 0) -> float | None:
        sim = sims.get(engine)
        if sim is None:
            return None
        context = decode * context_tokens * sim.kv_bytes_per_token
        return profile.step_s(sim.weight_bytes, decode, context, prefill, max(1, prefill_seqs))

    return alone_s, lambda engine: Path(models[engine].model_path).name if engine in models else engine


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def print_summary(summary: dict) -> None:
    print(
        f"graph captures: {summary['graph_captures']['n']} ({summary['graph_captures']['seconds']:.2f} s); "
        f"events: {summary['events']}"
    )
    print(f"{'engine':<12} {'kind':<20} {'n':>6} {'mean ms':>8} {'p50':>8} {'p99':>8}")
    for engine, e in summary["engines"].items():
        print(
            f"{engine:<12} busy {100 * e['busy_fraction']:.0f}%, prefill "
            f"{_fmt(e['prefill_ms_per_1k_tokens'])} ms per 1k tokens, events {e['events']}"
        )
        for kind, s in e.items():
            if isinstance(s, dict) and "n" in s:
                print(f"{'':<12} {kind:<20} {s['n']:>6} {_fmt(s['mean']):>8} {_fmt(s['p50']):>8} {_fmt(s['p99']):>8}")
    for group, bins in (summary.get("contention") or {}).items():
        if isinstance(bins, dict):
            for concurrency, b in bins.items():
                print(
                    f"{group:<14} concurrency {concurrency:<8} {b['steps']:>6} steps: {b['slowdown_p50']:.2f}x "
                    f"the alone step, parallelism {b['parallelism_p50']:.2f}"
                )
    print(f"{'model':<12} {'seconds':<24} {'n':>6} {'mean':>8} {'p50':>8} {'p99':>8}")
    for model, m in summary["models"].items():
        for kind, s in m.items():
            print(f"{model:<12} {kind:<24} {s['n']:>6} {_fmt(s['mean']):>8} {_fmt(s['p50']):>8} {_fmt(s['p99']):>8}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("state_dir", type=Path)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--contention",
        type=Path,
        default=None,
        metavar="MODELS_JSON",
        help="also how much slower decode steps ran beside other engines' than alone (by --profile), "
        "by concurrency: needs the placement config the cluster ran",
    )
    p.add_argument(
        "--profile", type=Path, default=Path(__file__).resolve().parent / "results" / "sim-profile-h100.json"
    )
    p.add_argument(
        "--context-tokens",
        type=int,
        default=640,
        help="each decoding sequence's context for the alone step (the step log does not say)",
    )
    args = p.parse_args()
    files = sorted(args.state_dir.rglob("*.log"))
    if not files:
        sys.exit(f"no *.log under {args.state_dir}")
    lines = [line for f in files for line in f.read_text(errors="replace").splitlines()]
    summary = summarize(lines)
    intervals = summary.pop("intervals")
    if args.contention:
        summary["contention"] = {
            "profile": args.profile.name,
            "context_tokens": args.context_tokens,
            **contention(intervals, *alone_step_of(args.contention, args.profile, args.context_tokens)),
        }
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
