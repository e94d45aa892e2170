"""Probe: does kvcached's page placement explain why a live one-GPU run preempted and missed where
the simulator did not? Replays a bench/one_gpu.py result's traces in the simulator, whose pool now
places slots on pages as kvcached does (prism/simulator/engine.py CountingPool), twice: with the
agent counting an engine's KV as the pages it holds (the agent since commit 1a67cce) and as its
used tokens (the agent that made runs before it). Nothing is fitted: the placement is kvcached's.

    python bench/probe/kv_pages_replay.py bench/results/one_gpu-h100-mps.json

On that run (H100, 2026-12-06, made with the token count), simulated with the token count: prism
91.8 / 80.4% at 8 / 14 req/s against 90.7 / 82.3% live (the simulator with perfectly packed pages
had said 97.2 / 96.4); with the pages counted: 97.2 / 90.8%. Time-share at 14 req/s stays 10 points
above live either way (bench/results/kv_pages_replay-h100-mps.log)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import one_gpu  # noqa: E402  (bench/: puts the project on sys.path)
from common import table  # noqa: E402

from prism.simulator import engine as sim_engine  # noqa: E402


def replay(payload: dict, counted_as: str) -> list[dict]:
    """Every live point of `payload` (but static's: its memory policy does not balloon) simulated, the
    agent counting KV as `counted_as` ("pages" or "tokens")."""
    holding = sim_engine.SimEngine.holding_bytes
    if counted_as == "tokens":
        sim_engine.SimEngine.holding_bytes = property(lambda engine: engine.used_bytes)
    try:
        args = argparse.Namespace(**payload["settings"])
        args.profile = one_gpu.common.ROOT / "bench" / "results" / "sim-profile-h100.json"
        rows = []
        with tempfile.TemporaryDirectory(prefix="prism-kv-pages-") as tmp:
            entries = one_gpu.fleet_entries(args, Path(tmp))
            for run in payload["runs"]:
                if run["policy"] == "static":
                    continue
                simulated = one_gpu.simulate_points(
                    run["policy"],
                    run["served"],
                    [p["rate"] for p in run["points"]],
                    payload["settings"]["memory_bytes"],
                    args,
                    entries,
                    run["points"],
                )
                for sim, live in zip(simulated, run["points"]):
                    rows.append(
                        {
                            "policy": run["policy"],
                            "rate": live["rate"],
                            "counted_as": counted_as,
                            "live": 100 * live["attainment"],
                            "simulated": 100 * sim["attainment"],
                            "sim_minus_live": 100 * (sim["attainment"] - live["attainment"]),
                            "preemptions": sim["preemptions"],
                        }
                    )
        return rows
    finally:
        sim_engine.SimEngine.holding_bytes = holding


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", type=Path, help="a bench/one_gpu.py result with live points")
    args = p.parse_args()
    payload = one_gpu.merge([args.result])
    rows = replay(payload, "tokens") + replay(payload, "pages")
    print(
        table(
            rows,
            [
                ("policy", "policy", "s"),
                ("rate", "req/s", "g"),
                ("counted_as", "KV counted as", "s"),
                ("live", "live %", ".1f"),
                ("simulated", "simulated %", ".1f"),
                ("sim_minus_live", "sim - live", "+.1f"),
                ("preemptions", "sim preemptions", "d"),
            ],
        )
    )


if __name__ == "__main__":
    main()
