"""SLO attainment per placement policy and GPU count, simulated (prism
simulate's engine: prism/simulator) on one seeded bursty-group trace, with the
H200 latency profile (bench/results/sim-profile-h200.json; --profile for another, e.g. the H100's).

    .venv/bin/python bench/sim_tables.py                       # 18 models, 1..8 GPUs
    .venv/bin/python bench/sim_tables.py --large               # also 200 models on 8..64 GPUs

Prints a markdown table per configuration (attainment per policy and GPU
count, and the fewest GPUs reaching the target, searched beyond the table
where the table does not reach it) and writes everything, with the trace's
parameters and the settings, to bench/results/sim_tables-h200profile.json.

Agents: static's placements name GPU ids of one 8-GPU machine, so it runs with
8 GPUs per agent (its models on GPU ids the cluster lacks stay unplaced);
the other policies run with one agent per GPU (`--gpus-per-agent`), since an
agent runs one engine per model and a model can only move between agents.
The simulations run in parallel processes (`--jobs`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prism.simulator.profile import DEFAULT_PROFILE, LatencyProfile  # noqa: E402
from prism.simulator.runner import SimSettings, fewest_above, simulate  # noqa: E402
from prism.workload.generator import BurstyGroupParams, bursty_group_trace  # noqa: E402
from services.common.placement_config import ModelConfig, PlacementConfig, load  # noqa: E402

POLICIES = ("static", "dedicated", "time-share", "prism")
SIZES = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")


def large_config(num_models: int, gpus_per_machine: int = 8) -> PlacementConfig:
    """num_models models, 1B, 3B and 8B in turn (as models-18.json), each
    with an init placement on GPU i mod 8 (static's layout), switched off."""
    models = []
    for i in range(num_models):
        models.append({"model_name": f"model-{i}", "model_path": f"../configs/{SIZES[i % len(SIZES)]}",
                       "load_format": "dummy", "init_placements": [{"gpu_ids": [i % gpus_per_machine], "on": False}]})
    path = REPO / "bench" / "sim" / f"models-{num_models}.json"
    if not path.exists():
        path.write_text(json.dumps(models, indent=1) + "\n")
    return load(path)


def _run(job: tuple) -> tuple:
    trace_params, models, policy, gpus, gpus_per_agent, profile_path = job
    trace = bursty_group_trace(trace_params)
    profile = LatencyProfile.load(profile_path)
    settings = SimSettings(num_gpus=gpus, policy=policy, gpus_per_agent=gpus_per_agent)
    started = time.monotonic()
    result = simulate(trace, models, profile, settings)
    overall = result["overall"]
    errors = overall.get("errors") or {}
    return (policy, gpus, {"attainment": overall["slo_attainment"], "requests": overall["requests"],
                           "errors": errors, "gpus_per_agent": gpus_per_agent,
                           "ttft_p99_s": overall.get("ttft_p99_s"), "tpot_p99_s": overall.get("tpot_p99_s"),
                           "wall_s": round(time.monotonic() - started, 1),
                           "counters": {k: result["simulation"][k] for k in
                                        ("loads", "unloads", "activations", "deactivations", "preemptions")}})


def run_table(name: str, trace_params: BurstyGroupParams, models: list[ModelConfig], gpu_counts: list[int],
              target: float, jobs: int, agent_gpus: int, search_up_to: int, profile: Path = DEFAULT_PROFILE) -> dict:
    def agents_for(policy: str) -> int:
        return 8 if policy == "static" else agent_gpus

    results: dict[str, dict[int, dict]] = {p: {} for p in POLICIES}
    work = [(trace_params, models, p, n, agents_for(p), profile) for n in gpu_counts for p in POLICIES]
    with ProcessPoolExecutor(jobs) as pool:
        for policy, gpus, row in pool.map(_run, work):
            results[policy][gpus] = row
            print(f"  {name}: {policy} at {gpus} GPUs: {100 * row['attainment']:.1f}% ({row['wall_s']}s)",
                  file=sys.stderr, flush=True)
        # The fewest GPUs at the target: from the table, else doubling past it, then bisecting.
        fewest: dict[str, int | None] = {}
        for policy in POLICIES:
            rows = results[policy]

            def met(n: int) -> bool:
                if n not in rows:
                    _, _, rows[n] = pool.submit(_run, (trace_params, models, policy, n, agents_for(policy),
                                                           profile)).result()
                return rows[n]["attainment"] >= target

            in_table = sorted(n for n in gpu_counts if met(n))
            fewest[policy] = in_table[0] if in_table else fewest_above(met, max(gpu_counts), search_up_to)
    return {"name": name, "trace": asdict(trace_params), "models": len(models), "target": target,
            "gpu_counts": gpu_counts, "fewest_gpus": fewest,
            "results": {p: {str(n): r for n, r in sorted(rows.items())} for p, rows in results.items()}}


def markdown(table: dict) -> str:
    counts = table["gpu_counts"]
    lines = [f"### {table['name']}: {table['models']} models, {table['trace']['rate']:g} req/s, "
             f"{table['trace']['duration_s']:g} s, seed {table['trace']['seed']}",
             "", "| policy | " + " | ".join(f"{n} GPUs" for n in counts) + f" | fewest GPUs at "
             f"{100 * table['target']:g}% |", "|---" * (len(counts) + 2) + "|"]
    for policy in POLICIES:
        rows = table["results"][policy]
        cells = [f"{100 * rows[str(n)]['attainment']:.1f}%" for n in counts]
        fewest = table["fewest_gpus"][policy]
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {fewest if fewest is not None else 'not reached'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=30.0, help="requests/s of the 18-model trace")
    ap.add_argument("--duration-s", type=float, default=150.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpus", default="1,2,3,4,5,6,7,8", help="GPU counts of the 18-model table")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--gpus-per-agent", type=int, default=1, help="for every policy but static")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--large", action="store_true", help="also the 200-model table")
    ap.add_argument("--large-models", type=int, default=200)
    ap.add_argument("--large-rate", type=float, default=200.0)
    ap.add_argument("--large-gpus", default="8,16,24,32,48,64")
    ap.add_argument("--large-groups", type=int, default=10)
    ap.add_argument("--only-large", action="store_true")
    ap.add_argument("--profile", type=Path, default=DEFAULT_PROFILE,
                    help="latency profile (default: the H200's; bench/results/sim-profile-h100.json: the H100's)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sim_tables-h200profile.json")
    args = ap.parse_args()

    tables = []
    if not args.only_large:
        models = list(load(REPO / "bench" / "sim" / "models-18.json").models)
        params = BurstyGroupParams(num_models=len(models), rate=args.rate, duration_s=args.duration_s, seed=args.seed)
        counts = [int(n) for n in args.gpus.split(",")]
        tables.append(run_table("18 models", params, models, counts, args.target, args.jobs, args.gpus_per_agent,
                                search_up_to=2 * len(models), profile=args.profile))
    if args.large or args.only_large:
        models = list(large_config(args.large_models).models)
        params = BurstyGroupParams(num_models=len(models), num_groups=args.large_groups, rate=args.large_rate,
                                   duration_s=args.duration_s, seed=args.seed)
        counts = [int(n) for n in args.large_gpus.split(",")]
        tables.append(run_table(f"{len(models)} models", params, models, counts, args.target, args.jobs,
                                args.gpus_per_agent, search_up_to=len(models), profile=args.profile))
    for table in tables:
        print(markdown(table) + "\n")
    profile = LatencyProfile.load(args.profile)
    args.out.write_text(json.dumps({"profile": str(args.profile.resolve().relative_to(REPO)), "profile_device": profile.device,
                                    "date": time.strftime("%Y-%m-%d"), "tables": tables}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
