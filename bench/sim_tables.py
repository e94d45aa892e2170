"""SLO attainment per placement policy and GPU count, simulated (prism
simulate's engine: prism/simulator) on one seeded bursty-group trace, with the
H200 latency profile (bench/results/sim-profile-h200.json; --profile for another, e.g. the H100's).

    .venv/bin/python bench/sim_tables.py                       # 18 models, 1..8 GPUs
    .venv/bin/python bench/sim_tables.py --large               # also 200 models on 8..64 GPUs
    .venv/bin/python bench/sim_tables.py --rate 90 --gpus 2,4,6,8 --out bench/results/sim_tables-18models-90rps.json
    .venv/bin/python bench/sim_tables.py --rate 90 --gpus 3,4,5,6,8 --policies prism,kvpr --seeds 0,1,2 \
        --out bench/results/sim_tables-18models-90rps-seeds.json   # one seed's trace decides little

The default 18-model trace (30 req/s) needs only 3 GPUs under prism; at 90 req/s
prism needs 8, the original system's setting of 18 models on 8 GPUs
(2026-11-27, H200 profile: prism 34.7/52.0/96.4/99.4% at 2/4/6/8 GPUs,
time-share 10.5/36.1/78.5/92.8%, fewest GPUs at 99%: prism 8, time-share 17,
dedicated 20).

    .venv/bin/python bench/sim_tables.py --sweep-rates 60,90,120,150,200 --sweep-gpus 8 \
        --out bench/results/sim_sweep-18models-8gpus.json

holds the GPUs at 8 and raises the rate instead (2026-11-27, H200 profile): prism
100/99.4/86.4/73.5/47.9%, time-share 100/92.8/59.4/48.3/41.0% at 60/90/120/150/200
req/s, so 1.0-1.5x; time-share here switches models with the same fast activation.

Prints a markdown table per configuration (attainment per policy and GPU
count, and the fewest GPUs reaching the target, searched beyond the table
where the table does not reach it or a larger count of it misses) and writes everything, with the trace's
parameters and the settings, to bench/results/sim_tables-h200profile.json.

Dedicated is provisioned for each model's peak, as an operator sizing GPUs
per model from its history would: a model gets as many GPUs (placements in
its config; dedicated_policy) as its busiest 10 s of the trace needs at
`compute_overload` of a GPU each (the policy's compute_load: the share of a
GPU's time a model needs to keep its TPOT SLO at a rate). Its column is then
the attainment with that many GPUs or fewer, and its fewest GPUs at the
target is searched the same way.

Agents: static's placements name GPU ids of one 8-GPU machine, so it runs with
8 GPUs per agent (its models on GPU ids the cluster lacks stay unplaced);
the other policies run with one agent per GPU (`--gpus-per-agent`), since an
agent runs one engine per model and a model can only move between agents.
The simulations run in parallel processes (`--jobs`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prism.simulator.models import sim_model  # noqa: E402
from prism.simulator.profile import DEFAULT_PROFILE, LatencyProfile  # noqa: E402
from prism.simulator.runner import SimSettings, fewest_meeting, simulate  # noqa: E402
from prism.workload.generator import BurstyGroupParams, bursty_group_trace  # noqa: E402
from prism.workload.trace import Trace  # noqa: E402
from services.common.placement_config import InitPlacement, ModelConfig, PlacementConfig, load  # noqa: E402
from services.scheduler.policies import ClusterSnapshot, ModelDemand, PolicyParams, compute_load  # noqa: E402

POLICIES = ("static", "dedicated", "time-share", "kvpr", "prism")
WARMUP_S = 30.0  # attainment_after_warmup: of the requests sent from then on
SIZES = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")


def large_config(num_models: int, gpus_per_machine: int = 8) -> PlacementConfig:
    """num_models models, 1B, 3B and 8B in turn (as models-18.json), each
    with an init placement on GPU i mod 8 (static's layout), switched off."""
    models = []
    for i in range(num_models):
        models.append(
            {
                "model_name": f"model-{i}",
                "model_path": f"../configs/{SIZES[i % len(SIZES)]}",
                "load_format": "dummy",
                "init_placements": [{"gpu_ids": [i % gpus_per_machine], "on": False}],
            }
        )
    path = REPO / "bench" / "sim" / f"models-{num_models}.json"
    if not path.exists():
        path.write_text(json.dumps(models, indent=1) + "\n")
    return load(path)


def peak_rate(times: list[float], window_s: float) -> float:
    """The most requests in any window_s-long window, per second (times ascending)."""
    most, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] > window_s:
            first += 1
        most = max(most, last - first + 1)
    return most / window_s


def provisioned_for_peak(
    trace: Trace, models: list[ModelConfig], profile: LatencyProfile, window_s: float = 10.0
) -> list[ModelConfig]:
    """The models, each with as many placements as GPUs its busiest window_s
    of the trace needs at the policy's compute_overload (dedicated's
    provisioning; the placements' GPU ids are not used by that policy)."""
    params = PolicyParams(compute=profile.compute_costs(), step_tokens=profile.step_tokens)
    out = []
    for model in models:
        requests = trace.for_model(model.model_name)
        spec = sim_model(model)
        gpus = 1
        if requests:
            rate = peak_rate([r.t for r in requests], window_s)
            demand = ModelDemand(
                arrival_rate=rate,
                mean_prompt_tokens=sum(r.prompt_tokens for r in requests) / len(requests),
                mean_output_tokens=sum(r.output_tokens for r in requests) / len(requests),
            )
            snapshot = ClusterSnapshot(
                models=(model,),
                agents=(),
                demand={model.model_name: demand},
                weight_bytes={model.model_name: spec.weight_bytes},
                kv_bytes_per_token={model.model_name: spec.kv_bytes_per_token},
            )
            gpus = max(1, math.ceil(compute_load(snapshot, model, params) / params.compute_overload))
        out.append(replace(model, init_placements=tuple(InitPlacement(gpu_ids=(0,), on=True) for _ in range(gpus))))
    return out


def _run(job: tuple) -> tuple:
    trace_params, models, policy, gpus, gpus_per_agent, profile_path, standby = job  # standby: prism's, per model
    trace = bursty_group_trace(trace_params)
    profile = LatencyProfile.load(profile_path)
    settings = SimSettings(num_gpus=gpus, policy=policy, gpus_per_agent=gpus_per_agent, standby_replicas=standby)
    started = time.monotonic()
    result = simulate(trace, models, profile, settings)
    overall = result["overall"]
    errors = overall.get("errors") or {}
    # Every model starts switched off with no history: the first WARMUP_S are a cold start for the
    # policies that react to demand (dedicated is provisioned from the trace beforehand).
    after = [r for r in result["requests"] if r["sent_at"] >= WARMUP_S]
    return (
        policy,
        gpus,
        {
            "attainment": overall["slo_attainment"],
            "requests": overall["requests"],
            "attainment_after_warmup": sum(r["attained"] for r in after) / len(after) if after else None,
            "errors": errors,
            "gpus_per_agent": gpus_per_agent,
            "ttft_p99_s": overall.get("ttft_p99_s"),
            "tpot_p99_s": overall.get("tpot_p99_s"),
            "wall_s": round(time.monotonic() - started, 1),
            "counters": {
                k: result["simulation"][k] for k in ("loads", "unloads", "activations", "deactivations", "preemptions")
            },
        },
    )


def run_table(
    name: str,
    trace_params: BurstyGroupParams,
    models: list[ModelConfig],
    gpu_counts: list[int],
    target: float,
    jobs: int,
    agent_gpus: int,
    search_up_to: int,
    profile: Path = DEFAULT_PROFILE,
    standby: int = 0,
    policies: tuple[str, ...] = POLICIES,
    search: bool = True,
) -> dict:
    dedicated_models = provisioned_for_peak(bursty_group_trace(trace_params), models, LatencyProfile.load(profile))
    provisioned = sum(len(m.init_placements) for m in dedicated_models)
    search_up_to = max(search_up_to, provisioned)

    def job(policy: str, gpus: int) -> tuple:
        return (
            trace_params,
            dedicated_models if policy == "dedicated" else models,
            policy,
            gpus,
            8 if policy == "static" else agent_gpus,
            profile,
            standby,
        )

    results: dict[str, dict[int, dict]] = {p: {} for p in policies}
    work = [job(p, n) for n in gpu_counts for p in policies]
    with ProcessPoolExecutor(jobs) as pool:
        for policy, gpus, row in pool.map(_run, work):
            results[policy][gpus] = row
            print(
                f"  {name}: {policy} at {gpus} GPUs: {100 * row['attainment']:.1f}% ({row['wall_s']}s)",
                file=sys.stderr,
                flush=True,
            )
        # The fewest GPUs at the target: from the table, else doubling past it, then bisecting; where a
        # larger count of the table misses, searched again above it (fewest_meeting).
        fewest: dict[str, int | None] = {}
        for policy in policies if search else ():
            rows = results[policy]

            def met(n: int) -> bool:
                if n not in rows:
                    _, _, rows[n] = pool.submit(_run, job(policy, n)).result()
                return rows[n]["attainment"] >= target

            fewest[policy] = fewest_meeting(met, max(gpu_counts), search_up_to, tried=tuple(gpu_counts))
    return {
        "name": name,
        "trace": asdict(trace_params),
        "models": len(models),
        "target": target,
        "gpu_counts": gpu_counts,
        "fewest_gpus": fewest,
        "searched": search,
        "dedicated_provisioned_gpus": provisioned,
        "prism_standby_replicas": standby,
        "results": {p: {str(n): r for n, r in sorted(rows.items())} for p, rows in results.items()},
    }


def rate_sweep(
    trace_params: BurstyGroupParams,
    models: list[ModelConfig],
    rates: list[float],
    gpus: int,
    policies: list[str],
    jobs: int,
    agent_gpus: int,
    profile: Path,
    standby: int = 0,
) -> dict:
    """Attainment per policy at one GPU count as the trace's rate grows: where
    each policy gives way (dedicated is left out: its GPU count is the trace's)."""
    work = [
        (
            replace(trace_params, rate=rate),
            models,
            policy,
            gpus,
            8 if policy == "static" else agent_gpus,
            profile,
            standby,
        )
        for rate in rates
        for policy in policies
    ]
    results: dict[str, dict[str, dict]] = {p: {} for p in policies}
    with ProcessPoolExecutor(jobs) as pool:
        for job, (policy, _, row) in zip(work, pool.map(_run, work)):
            results[policy][f"{job[0].rate:g}"] = row
            print(
                f"  sweep at {gpus} GPUs: {policy} at {job[0].rate:g} req/s: {100 * row['attainment']:.1f}% "
                f"({row['wall_s']}s)",
                file=sys.stderr,
                flush=True,
            )
    return {
        "gpus": gpus,
        "models": len(models),
        "trace": asdict(trace_params),
        "rates": rates,
        "prism_standby_replicas": standby,
        "results": results,
    }


def sweep_markdown(sweep: dict) -> str:
    rates = [f"{r:g}" for r in sweep["rates"]]
    lines = [
        f"### {sweep['models']} models on {sweep['gpus']} GPUs, attainment against the trace's rate "
        f"({sweep['trace']['duration_s']:g} s, seed {sweep['trace']['seed']})",
        "",
        "| policy | " + " | ".join(f"{r} req/s" for r in rates) + " |",
        "|---" * (len(rates) + 1) + "|",
    ]
    results = sweep["results"]
    for policy, rows in results.items():
        lines.append(f"| {policy} | " + " | ".join(f"{100 * rows[r]['attainment']:.1f}%" for r in rates) + " |")
    if "prism" in results and "time-share" in results:
        ratios = [results["prism"][r]["attainment"] / max(results["time-share"][r]["attainment"], 1e-9) for r in rates]
        lines.append("| prism / time-share | " + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
    return "\n".join(lines)


def seeds_markdown(tables: list[dict]) -> str:
    """One configuration's tables over several seeds: each cell the mean attainment (the seeds' in
    brackets), and the fewest GPUs at the target seed by seed."""
    first = tables[0]
    counts = first["gpu_counts"]
    seeds = [t["trace"]["seed"] for t in tables]
    lines = [
        f"### {first['name']}: {first['models']} models, {first['trace']['rate']:g} req/s, "
        f"{first['trace']['duration_s']:g} s, mean of seeds {', '.join(map(str, seeds))}",
        "",
        "| policy | " + " | ".join(f"{n} GPUs" for n in counts) + f" | fewest GPUs at "
        f"{100 * first['target']:g}% (each seed) |",
        "|---" * (len(counts) + 2) + "|",
    ]
    for policy in first["results"]:
        cells = []
        for n in counts:
            values = [100 * t["results"][policy][str(n)]["attainment"] for t in tables]
            cells.append(f"{sum(values) / len(values):.1f}% ({'/'.join(f'{v:.0f}' for v in values)})")
        fewest = (
            "/".join(str(t["fewest_gpus"][policy]) if t["fewest_gpus"].get(policy) is not None else "-" for t in tables)
            if first.get("searched", True)
            else "not searched"
        )
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {fewest} |")
    return "\n".join(lines)


def markdown(table: dict) -> str:
    counts = table["gpu_counts"]
    lines = [
        f"### {table['name']}: {table['models']} models, {table['trace']['rate']:g} req/s, "
        f"{table['trace']['duration_s']:g} s, seed {table['trace']['seed']}",
        "",
        "| policy | " + " | ".join(f"{n} GPUs" for n in counts) + f" | fewest GPUs at {100 * table['target']:g}% |",
        "|---" * (len(counts) + 2) + "|",
    ]
    for policy in table["results"]:
        rows = table["results"][policy]
        cells = [f"{100 * rows[str(n)]['attainment']:.1f}%" for n in counts]
        fewest = table["fewest_gpus"].get(policy)
        said = "not searched" if not table.get("searched", True) else fewest if fewest is not None else "not reached"
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {said} |")
    lines.append(f"\ndedicated provisioned for each model's busiest 10 s: {table['dedicated_provisioned_gpus']} GPUs")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=30.0, help="requests/s of the 18-model trace")
    ap.add_argument("--duration-s", type=float, default=150.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="several seeds (e.g. 0,1,2): a table each, and their means")
    ap.add_argument("--policies", default=",".join(POLICIES), help="which policies (comma-separated)")
    ap.add_argument("--gpus", default="1,2,3,4,5,6,7,8", help="GPU counts of the 18-model table")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--gpus-per-agent", type=int, default=1, help="for every policy but static")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--no-search",
        action="store_true",
        help="only the table's GPU counts: no search for the fewest GPUs at the target",
    )
    ap.add_argument("--large", action="store_true", help="also the 200-model table")
    ap.add_argument("--large-models", type=int, default=200)
    ap.add_argument("--large-rate", type=float, default=200.0)
    ap.add_argument("--large-gpus", default="8,16,24,32,48,64")
    ap.add_argument("--large-groups", type=int, default=10)
    ap.add_argument("--only-large", action="store_true")
    ap.add_argument(
        "--profile",
        type=Path,
        default=DEFAULT_PROFILE,
        help="latency profile (default: the H200's; bench/results/sim-profile-h100.json: the H100's)",
    )
    ap.add_argument(
        "--standby-replicas",
        type=int,
        default=0,
        help="the prism policy's standby replicas per model (the scheduler's --standby-replicas)",
    )
    ap.add_argument(
        "--sweep-rates",
        default=None,
        help="instead of the tables: the 18-model trace at these rates (comma-separated) on --sweep-gpus",
    )
    ap.add_argument("--sweep-gpus", type=int, default=8)
    ap.add_argument("--sweep-policies", default="prism,time-share")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sim_tables-h200profile.json")
    args = ap.parse_args()

    if args.sweep_rates:
        models = list(load(REPO / "bench" / "sim" / "models-18.json").models)
        params = BurstyGroupParams(num_models=len(models), rate=args.rate, duration_s=args.duration_s, seed=args.seed)
        sweep = rate_sweep(
            params,
            models,
            [float(r) for r in args.sweep_rates.split(",")],
            args.sweep_gpus,
            args.sweep_policies.split(","),
            args.jobs,
            args.gpus_per_agent,
            args.profile,
            args.standby_replicas,
        )
        print(sweep_markdown(sweep))
        profile = LatencyProfile.load(args.profile)
        args.out.write_text(
            json.dumps(
                {
                    "profile": str(args.profile.resolve().relative_to(REPO)),
                    "profile_device": profile.device,
                    "date": time.strftime("%Y-%m-%d"),
                    "sweep": sweep,
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote {args.out}")
        return

    tables = []
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    policies = tuple(args.policies.split(","))
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        ap.error(f"unknown policies {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    for seed in seeds:
        if not args.only_large:
            models = list(load(REPO / "bench" / "sim" / "models-18.json").models)
            params = BurstyGroupParams(num_models=len(models), rate=args.rate, duration_s=args.duration_s, seed=seed)
            counts = [int(n) for n in args.gpus.split(",")]
            tables.append(
                run_table(
                    "18 models",
                    params,
                    models,
                    counts,
                    args.target,
                    args.jobs,
                    args.gpus_per_agent,
                    search_up_to=2 * len(models),
                    profile=args.profile,
                    standby=args.standby_replicas,
                    policies=policies,
                    search=not args.no_search,
                )
            )
        if args.large or args.only_large:
            models = list(large_config(args.large_models).models)
            params = BurstyGroupParams(
                num_models=len(models),
                num_groups=args.large_groups,
                rate=args.large_rate,
                duration_s=args.duration_s,
                seed=seed,
            )
            counts = [int(n) for n in args.large_gpus.split(",")]
            tables.append(
                run_table(
                    f"{len(models)} models",
                    params,
                    models,
                    counts,
                    args.target,
                    args.jobs,
                    args.gpus_per_agent,
                    search_up_to=len(models),
                    profile=args.profile,
                    standby=args.standby_replicas,
                    policies=policies,
                    search=not args.no_search,
                )
            )
    for table in tables:
        print(markdown(table) + "\n")
    if len(seeds) > 1:
        for name in dict.fromkeys(t["name"] for t in tables):
            print(seeds_markdown([t for t in tables if t["name"] == name]) + "\n")
    profile = LatencyProfile.load(args.profile)
    args.out.write_text(
        json.dumps(
            {
                "profile": str(args.profile.resolve().relative_to(REPO)),
                "profile_device": profile.device,
                "date": time.strftime("%Y-%m-%d"),
                "tables": tables,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
