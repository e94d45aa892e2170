"""Post-mortem of a cluster run's serving latency from its logs: where the
time of each engine and each request went.

Run the cluster with PRISM_ENGINE_STEP_LOG=1 (every engine step is logged with
its batch and wall time, and every request's first token), keep its state
directory (bench/validate_simulator.py --state-dir), then:

    python bench/step_log_summary.py STATE_DIR [--json out.json]

Per engine: steps by kind (CUDA-graph decode, eager decode, steps with
prefill) with their wall times, the busy fraction, graph captures, KV
preemptions, limit changes and activations. Per model: a request's wait in
the agent's admission queue (agent arrival -> engine queue), in the engine
before its first token, and to its end."""

from __future__ import annotations

import argparse
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
ENGINE_EVENT = re.compile(r"engine ([^\s:]+):? (activated in|deactivated|memory limit)")


def _time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p99": None}
    ordered = sorted(values)
    return {"n": len(values), "mean": statistics.fmean(values), "p50": percentile(ordered, 0.5),
            "p99": percentile(ordered, 0.99)}


def summarize(lines) -> dict:
    steps: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    span: dict[str, list[float]] = {}
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    captures = {"n": 0, "seconds": 0.0}
    requests: dict[str, dict[str, float | str]] = defaultdict(dict)
    for raw in lines:
        m = LINE.match(raw.rstrip("\n"))
        if not m:
            continue
        stamp, _level, _service, rid, _logger, message = m.groups()
        t = _time(stamp)
        if (s := STEP.match(message)):
            engine, decode, prefill, _seqs, kind, ms = s.groups()
            label = "prefill" if int(prefill) else f"decode-{kind}"
            steps[engine][label].append(float(ms))
            if label == "prefill":
                steps[engine]["prefill_tokens"].append(int(prefill))
            else:
                steps[engine][f"{label}-batch"].append(int(decode))
            first_last = span.setdefault(engine, [t, t])
            first_last[1] = t
            continue
        if (c := CAPTURE.search(message)):
            captures["n"] += 1
            captures["seconds"] += float(c.group(3))
        if (e := ENGINE_EVENT.match(message)):
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
    return {"engines": engines, "graph_captures": captures, "events": dict(counts.get("all", {})),
            "models": {m: {k: _stats(v) for k, v in d.items()} for m, d in per_model.items()}}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def print_summary(summary: dict) -> None:
    print(f"graph captures: {summary['graph_captures']['n']} ({summary['graph_captures']['seconds']:.2f} s); "
          f"events: {summary['events']}")
    print(f"{'engine':<12} {'kind':<20} {'n':>6} {'mean ms':>8} {'p50':>8} {'p99':>8}")
    for engine, e in summary["engines"].items():
        print(f"{engine:<12} busy {100 * e['busy_fraction']:.0f}%, prefill "
              f"{_fmt(e['prefill_ms_per_1k_tokens'])} ms per 1k tokens, events {e['events']}")
        for kind, s in e.items():
            if isinstance(s, dict) and "n" in s:
                print(f"{'':<12} {kind:<20} {s['n']:>6} {_fmt(s['mean']):>8} {_fmt(s['p50']):>8} {_fmt(s['p99']):>8}")
    print(f"{'model':<12} {'seconds':<24} {'n':>6} {'mean':>8} {'p50':>8} {'p99':>8}")
    for model, m in summary["models"].items():
        for kind, s in m.items():
            print(f"{model:<12} {kind:<24} {s['n']:>6} {_fmt(s['mean']):>8} {_fmt(s['p50']):>8} {_fmt(s['p99']):>8}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("state_dir", type=Path)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    files = sorted(args.state_dir.rglob("*.log"))
    if not files:
        sys.exit(f"no *.log under {args.state_dir}")
    lines = [line for f in files for line in f.read_text(errors="replace").splitlines()]
    summary = summarize(lines)
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
