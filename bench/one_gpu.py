"""Issue 21's one-GPU showdown: more models than fit on one GPU, one bursty-group
trace per aggregate rate, replayed live through the gRPC gateway under each
placement policy (prism, kvpr, time-share, static), with the simulator's
prediction of every point beside the live one.

The fleet (--fleet, default 4 x 1B, 4 x 3B, 4 x 8B Llama configs with dummy
bf16 weights: 100 GB of weights against an 80 GB H100) is configured whole
for prism, kvpr and time-share: every model placed on GPU 0, switched off, the
policy deciding what is on. Static gets what an operator would write for a
card its models do not all fit: the models that fit with --static-kv-gb of KV
each (the smallest first, so that as many are served as can be), all on, the
KV budget split equally (the agent's --memory-policy static); the rest are not
configured, so their requests fail at the gateway (NOT_FOUND) and count as
missed. SLOs per model: TTFT 1 s for the 1B and 3B, 2 s for the 8B; TPOT 100 ms.

The trace (prism.workload.generator, what `prism trace generate` writes):
groups of --group-size models that become active together, the active group
drawn afresh every --shift-s, Zipf popularity within it, Gamma inter-arrivals
of CV 2, every other model at 2% of its active share; log-normal prompts
(median ~512 tokens) and outputs (median ~128). One trace per rate, the same
seed for all.

Each policy gets one cluster (etcd, scheduler with --replan-interval-s 0.5,
one agent, gateway), reused across its rate points in ascending order. Between
points every request has ended and the cluster idles --settle-s; the agent's
request statistics (a 60 s window) still remember the previous point for up
to a minute, as a live cluster whose load grows would. Recorded per point:
attainment (TTFT and TPOT both within the model's SLO), goodput, TTFT/TPOT
percentiles per model, every activation the agent made (its log), and GPU
memory each second (nvidia-smi, and each active engine's weights, mapped KV
and KV limit from the agent). Summary per policy: the highest rate at which
attainment holds 90% and 99% (the highest swept rate that holds it with
every lower rate holding it too, and the rate interpolated linearly to the
first point that misses).

Run on the GPU (each call holds 10 minutes at most, so spread the policies; starting 12 engine
processes takes about three minutes on an H100, so --share-engines runs prism, kvpr and time-share
on one cluster, the scheduler restarting with each, and the engines load once):

    python bench/one_gpu.py --policies prism time-share --share-engines --out $OUT/one_gpu-a.json
    python bench/one_gpu.py --policies kvpr static --out $OUT/one_gpu-b.json

then here, the simulator on the same traces and the tables of both files:

    python bench/one_gpu.py --tables-from a.json b.json --simulate --out bench/results/one_gpu-h100.json --plot ...

A dry run on CPU with tiny generated models:

    python bench/one_gpu.py --device cpu --rates 2 4 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import common  # first: puts the project on sys.path
from common import MemorySampler, parse_fleet, save_figure, table, wait_loaded, write_json

from prism.cluster import LocalCluster
from prism.simulator.cluster import MAKE_ROOM_IDLE_S
from prism.tiny_models import write_tiny_model
from prism.workload.generator import BurstyGroupParams, bursty_group_trace
from prism.workload.replay import SloTargets, replay, report
from services.common.etcd_server import free_port
from services.common.placement_config import parse as parse_config
from services.gpu_agent.devices import gpu_memory_bytes

CONFIGS = common.ROOT / "bench" / "configs"
TTFT_MS_BY_SIZE = {"1b": 1000.0, "3b": 1000.0, "8b": 2000.0}
SIZES = {size: (common.GPU_CONFIGS[size], ttft_ms) for size, ttft_ms in TTFT_MS_BY_SIZE.items()}
TPOT_MS = 100.0
POLICIES = ("prism", "kvpr", "time-share", "static")
REPLAN_S = 0.5
# After a reset's idle the scheduler starts afresh; its first plans (every REPLAN_S) come before the point.
RESET_FIRST_PLAN_S = 2.0
MAX_CONTEXT = 8192
THRESHOLDS = (0.9, 0.99)
FORESIGHT = "+foresight"  # the name suffix of a run that plans on the trace's future (--foresight-s)
GB = 1e9
ACTIVATED = re.compile(r"activated (\S+) in ([0-9.]+)s")


# ---- the fleet, its configs and the traces ----------------------------------------------


def fleet_entries(args: argparse.Namespace, state: Path) -> list[dict]:
    """Every model of the fleet, placed on GPU 0 and switched off, with its size's SLO."""
    tiny = write_tiny_model(state / "tiny-llama") if args.device == "cpu" else None  # every CPU model is this one
    entries = []
    for i, size in enumerate(parse_fleet(args.fleet, SIZES)):
        config, ttft_ms = SIZES[size]
        fields = (
            {"model_path": str(tiny), "dtype": "float32"}
            if tiny is not None
            else {"model_path": str(CONFIGS / config), "load_format": "dummy", "max_context": MAX_CONTEXT}
        )
        entries.append(
            {
                "model_name": f"model-{i}",
                **fields,
                "slo": {"ttft_ms": ttft_ms, "tpot_ms": TPOT_MS},
                **({"shed_load": True} if getattr(args, "shed_load", False) else {}),
                "init_placements": [{"gpu_ids": [0], "on": False}],
                "size": size,
            }
        )
    return entries


def config_of(entries: list[dict], policy: str) -> dict:
    return {"policy": policy, "models": [{k: v for k, v in e.items() if k != "size"} for e in entries]}


def weight_bytes(entry: dict) -> int:
    from prism.simulator.models import sim_model

    return sim_model(parse_config(config_of([entry], "static")).models[0]).weight_bytes


def static_entries(entries: list[dict], memory_bytes: int, reserve_bytes: int, kv_each_bytes: int) -> list[dict]:
    """What an operator configures for static partitions: the models whose weights fit the card with
    kv_each_bytes of KV each, the smallest first (as many models served as fit), all switched on."""
    chosen, used = [], reserve_bytes
    for entry in sorted(entries, key=lambda e: (weight_bytes(e), int(e["model_name"].split("-")[1]))):
        need = weight_bytes(entry) + kv_each_bytes
        if used + need <= memory_bytes:
            chosen.append(entry)
            used += need
    chosen.sort(key=lambda e: int(e["model_name"].split("-")[1]))
    return [{**e, "init_placements": [{"gpu_ids": [0], "on": True}]} for e in chosen]


def trace_params(args: argparse.Namespace, count: int, rate: float) -> BurstyGroupParams:
    if args.device == "cpu":  # the tiny models hold 256 positions
        lengths = dict(prompt_mean=64, prompt_std=32, output_mean=32, output_std=16, max_prompt=128, max_output=96)
    else:  # log-normal: mean 572 and std 286 give a median of 512; 143 and 72 a median of 128
        lengths = dict(
            prompt_mean=572, prompt_std=286, output_mean=143, output_std=72, max_prompt=4096, max_output=1024
        )
    return BurstyGroupParams(
        num_models=count,
        num_groups=max(1, count // args.group_size),
        active_groups=1,
        shift_s=args.shift_s,
        rate=rate,
        idle_fraction=0.02,
        zipf_alpha=1.0,
        burstiness_cv=2.0,
        duration_s=args.duration,
        seed=args.seed,
        **lengths,
    )


def slo_targets(entries: list[dict]) -> SloTargets:
    return SloTargets(ttft_s=1.0, tpot_s=TPOT_MS / 1e3).with_models(parse_config(config_of(entries, "prism")).models)


# ---- the live runs ---------------------------------------------------------------------


def device_memory_bytes(args: argparse.Namespace) -> int:
    if args.device == "cpu":
        return int(args.cpu_memory_gb * (1 << 30))
    import torch  # only for the card's size; the runs are in the cluster's processes

    return gpu_memory_bytes(torch.cuda.get_device_properties(0).total_memory, args.gpu_memory_gb)


def start_cluster(policy: str, args: argparse.Namespace, entries: list[dict], state: Path) -> LocalCluster:
    config = state / f"models-{policy}.json"
    config.write_text(json.dumps(config_of(entries, policy), indent=1))
    agent_args = ["--spare-workers", "0", "--memory-reserve-gb", str(args.reserve_gb), "--cuda-mps", args.cuda_mps]
    if args.gpu_memory_gb:
        agent_args += ["--gpu-memory-gb", str(args.gpu_memory_gb)]
    if policy == "static":
        agent_args += ["--memory-policy", "static"]
    cluster = LocalCluster(
        state_dir=state / policy,
        config_path=config,
        http_port=free_port(),
        grpc_port=free_port(),
        device=args.device,
        cpu_memory_gb=args.cpu_memory_gb,
        engine_isolation="process",
        agent_args=tuple(agent_args),
        scheduler_args=("--replan-interval-s", str(REPLAN_S)),
    )
    cluster.start(timeout_s=args.load_timeout)
    return cluster


def run_point(cluster: LocalCluster, args: argparse.Namespace, trace, slo: SloTargets) -> dict:
    log_path = cluster.log_dir / "agent.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    sampler = MemorySampler(cluster.agent_address)
    sampler.start()
    results = asyncio.run(
        replay(trace, grpc_address=cluster.gateway_grpc, slo=slo, chars_per_token=args.chars_per_token)
    )
    samples = sampler.stop()
    with log_path.open("rb") as f:
        f.seek(offset)
        log = f.read().decode(errors="replace")
    rep = report(trace, results, slo, api="grpc")
    activations = [(m, float(s)) for m, s in ACTIVATED.findall(log)]
    return summarize_point(rep, trace.duration_s, activations, samples)


def latency_percentiles(overall: dict) -> dict:
    """A report's TTFT and TPOT p50 and p99 (live and simulated points alike, so that they compare)."""
    return {k: overall.get(k) for k in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")}


def summarize_point(rep: dict, duration_s: float, activations: list, samples: list | None) -> dict:
    overall = rep["overall"]
    return {
        "attainment": overall["slo_attainment"],
        "goodput_rps": overall["goodput_rps"],
        "requests": overall["requests"],
        "errors": overall.get("errors") or {},
        **latency_percentiles(overall),
        "activations": len(activations),
        "activations_per_s": len(activations) / max(duration_s, 1e-9),
        "activation_log": activations,
        "per_model": {
            m: {k: s.get(k) for k in ("requests", "slo_attainment", "ttft_p99_s", "tpot_p99_s")}
            for m, s in rep["per_model"].items()
        },
        **(
            {
                "peak_used_gib": max((s["used_mib"][0] for s in samples if "used_mib" in s), default=0) / 1024,
                "memory_samples": samples,
            }
            if samples is not None
            else {}
        ),
    }


def run_policy(
    policy: str,
    args: argparse.Namespace,
    entries: list[dict],
    state: Path,
    save: Callable[[dict], None] = lambda run: None,
) -> dict:
    """save: called with the run so far after each point (a call that reaches its time limit keeps them)."""
    served = served_entries(policy, entries, args, device_memory_bytes(args))
    started = time.monotonic()
    cluster = start_cluster(policy, args, served, state)
    try:
        load_s = wait_loaded(cluster, [e["model_name"] for e in served], args.load_timeout)
        print(f"{policy}: {len(served)} models up in {time.monotonic() - started:.0f}s", flush=True)
        return run_points(
            cluster,
            policy,
            args,
            entries,
            served,
            load_s,
            save,
            reset=lambda: reset_cluster(cluster, policy, served, args),
        )
    finally:
        cluster.stop()


def run_policies_sharing_engines(
    policies: list[str],
    args: argparse.Namespace,
    entries: list[dict],
    state: Path,
    save: Callable[[list[dict]], None] = lambda runs: None,
) -> list[dict]:
    """The policies that configure the whole fleet (all but static) on one cluster, in turn: between two,
    and between two points of one, the cluster is reset (reset_cluster). The engines load once: on the
    H100, 12 engine processes took 165-191 s to start, so that a 10-minute call held one policy's
    three points. save: called with the runs so far after each point."""
    started = time.monotonic()
    cluster = start_cluster(policies[0], args, entries, state)
    runs: list[dict] = []
    try:
        load_s = wait_loaded(cluster, [e["model_name"] for e in entries], args.load_timeout)
        print(f"{', '.join(policies)}: {len(entries)} models up in {time.monotonic() - started:.0f}s", flush=True)
        for i, policy in enumerate(policies):
            if i:
                reset_cluster(cluster, policy, entries, args)
            runs.append(
                run_points(
                    cluster,
                    policy,
                    args,
                    entries,
                    entries,
                    load_s,
                    lambda run: save(runs + [run]),
                    reset=lambda p=policy: reset_cluster(cluster, p, entries, args),
                )
            )
    finally:
        cluster.stop()
    return runs


def reset_cluster(cluster: LocalCluster, policy: str, entries: list[dict], args: argparse.Namespace) -> None:
    """Every point starts from the same state: every engine switched off (as at a cluster's start) and
    --reset-settle-s idle with the scheduler stopped, so that the agents' request statistics forget the
    last point's traffic (their 60 s window), then the scheduler started afresh with `policy` (its demand
    memory empty) and RESET_FIRST_PLAN_S for its first plans. Without it a point began where the last one
    ended: each rate's trace has the same groups, so a policy that keeps engines on started its second
    point with that point's first group already on, and one that switches idle engines off did not
    (H100, 2026-12-07: kvpr 81.9% within SLO at 8 req/s after a reset and 97.5% at 14 after the 8 req/s
    point, with one activation; the simulator, which starts every point afresh, 96.3% and 87.5%). The
    scheduler stays stopped through the idle: started before it, kvpr's plan switched the last point's
    engines back on from the agents' windows, which still held that traffic, and kept them on into the
    next point (73.9% at 8 req/s, 2026-12-07; simulated 88.3%)."""
    import grpc

    from prism_client.v1 import agent_pb2, agent_pb2_grpc

    cluster.kill("scheduler")
    cluster.config_path.write_text(json.dumps(config_of(entries, policy), indent=1))
    with grpc.insecure_channel(cluster.agent_address) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        for entry in entries:
            stub.DeactivateModel(agent_pb2.ModelRequest(model=entry["model_name"], force=True), timeout=60)
    print(f"reset: every engine off; idle {args.policy_settle_s:g}s; scheduler then {policy}", flush=True)
    time.sleep(args.policy_settle_s)
    cluster.spawn_scheduler("scheduler")
    wait_serving(cluster.scheduler_addresses["scheduler"], timeout_s=60)
    time.sleep(min(RESET_FIRST_PLAN_S, args.policy_settle_s))


def wait_serving(address: str, timeout_s: float) -> None:
    """Returns once the gRPC server at `address` answers its health check SERVING (health_probe.probe)."""
    from services.common.health_probe import probe

    deadline = time.monotonic() + timeout_s
    while True:
        serving, why = probe(address, timeout_s=2)
        if serving:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not serving after {timeout_s:g}s: {why}")
        time.sleep(0.2)


def run_points(
    cluster: LocalCluster,
    policy: str,
    args: argparse.Namespace,
    entries: list[dict],
    served: list[dict],
    load_s: float,
    save: Callable[[dict], None],
    reset: Callable[[], None],
) -> dict:
    """The sweep's points on a running cluster under `policy`, ascending, the cluster reset before each
    but the first (which follows the cluster's start or a reset)."""
    slo = slo_targets(entries)
    points: list[dict] = []
    run = {"policy": policy, "served": [e["model_name"] for e in served], "load_s": load_s, "points": points}
    for i, rate in enumerate(sorted(args.rates)):
        if i:
            reset()
        trace = bursty_group_trace(trace_params(args, len(entries), rate), [e["model_name"] for e in entries])
        time.sleep(args.settle_s)
        point = {"rate": rate, **run_point(cluster, args, trace, slo)}
        points.append(point)
        save(run)
        print(
            f"{policy} @ {rate:g} req/s: attainment {100 * point['attainment']:.1f}%, "
            f"{point['activations']} activations, errors {point['errors'] or 'none'}",
            flush=True,
        )
    return run


# ---- the simulator on the same traces ----------------------------------------------------


def served_entries(policy: str, entries: list[dict], args: argparse.Namespace, memory_bytes: int) -> list[dict]:
    if policy != "static":
        return entries
    return static_entries(entries, memory_bytes, int(args.reserve_gb * (1 << 30)), int(args.static_kv_gb * (1 << 30)))


def measured_reserve_bytes(points: list[dict]) -> int:
    """The median reserve the agent kept over a live run (its configured one, or what the GPU's processes
    were measured to hold beyond weights and KV, whichever was more): the simulator's reserve for that run."""
    values = sorted(s["reserve_gb"][0] for p in points for s in p.get("memory_samples", []) if s.get("reserve_gb"))
    return int(values[len(values) // 2] * 1e9) if values else 0


def point_reserve_bytes(rate: float, live_points: list[dict] | None, args: argparse.Namespace) -> int:
    """The reserve the simulated GPU keeps at this rate: what the live point at the rate measured, else the
    run's (measured_reserve_bytes), else the configured --reserve-gb. Point by point, since the processes
    hold more the longer they have served: on the H100 (2026-12-07) the agent kept 16-21 GB through a
    cluster's first point and 26-29 GB through its fourth."""
    configured = int(args.reserve_gb * (1 << 30))
    if not live_points:
        return configured
    at_rate = [p for p in live_points if p["rate"] == rate]
    return measured_reserve_bytes(at_rate) or measured_reserve_bytes(live_points) or configured


def simulate_points(
    policy: str,
    served_names: list[str],
    rates: list[float],
    memory_bytes: int,
    args: argparse.Namespace,
    entries: list[dict],
    live_points: list[dict] | None = None,
    foresight_s: float = 0.0,
) -> list[dict]:
    """Each rate's trace through the simulator (the same policy code, the card's profile); a static
    run's unconfigured models' requests count as missed, as they fail live. live_points: the live run's;
    the simulated GPU keeps the reserve each point measured (point_reserve_bytes)."""
    from prism.simulator.profile import LatencyProfile
    from prism.simulator.runner import SimSettings, simulate
    from prism.workload.trace import Trace

    served = [e for e in served_entries(policy, entries, args, memory_bytes) if e["model_name"] in served_names]
    models = list(parse_config(config_of(served, policy)).models)
    names = {m.model_name for m in models}
    profile = LatencyProfile.load(args.profile)
    slo = slo_targets(entries)
    out = []
    for rate in rates:
        # The live engines were loaded a minute or more before the traffic (stats_lead_s): a first burst reads
        # as a burst, not as a rate that lasted the whole report window.
        settings = SimSettings(
            num_gpus=1,
            gpus_per_agent=1,
            policy=policy,
            gpu_memory_bytes=memory_bytes,
            memory_policy="static" if policy == "static" else "balloon",
            replan_interval_s=REPLAN_S,
            memory_reserve_bytes=point_reserve_bytes(rate, live_points, args),
            stats_lead_s=60.0,
            foresight_s=foresight_s,
            make_room_idle_s=args.make_room_idle_s,
        )
        trace = bursty_group_trace(trace_params(args, len(entries), rate), [e["model_name"] for e in entries])
        kept = Trace(tuple(r for r in trace.requests if r.model in names), trace.metadata)
        result = simulate(kept, models, profile, settings, slo)
        attained = sum(r["attained"] for r in result["requests"])
        sim = result["simulation"]
        out.append(
            {
                "rate": rate,
                "attainment": attained / max(1, len(trace.requests)),
                "requests": len(trace.requests),
                "errors": result["overall"]["errors"],
                "activations": sim["activations"],
                "preemptions": sim["preemptions"],
                **latency_percentiles(result["overall"]),
                "per_model": {m: s["slo_attainment"] for m, s in result["per_model"].items()},
            }
        )
    return out


def simulated_only(args: argparse.Namespace, entries: list[dict]) -> dict:
    """The sweep in the simulator alone (--simulate-only): no live run, more rates and seeds for nothing.
    With --seeds, one run per policy and seed (each run names its seed), the seeds' runs in parallel."""
    memory_bytes = int(args.memory_gb * (1 << 30))
    payload = {
        "benchmark": "one_gpu",
        "simulated_only": True,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "memory_bytes": memory_bytes,
        },
        "fleet_weight_gb": sum(weight_bytes(e) for e in entries) / GB,
        "models": [
            {"name": e["model_name"], "size": e["size"], "config": Path(e["model_path"]).name, "slo": e["slo"]}
            for e in entries
        ],
        "device": f"simulated ({Path(args.profile).name})",
        "runs": [],
    }
    runs = [(policy, 0.0) for policy in args.policies]
    if args.foresight_s:  # prism planning on the trace's future arrivals: a bound, not a baseline
        runs.append(("prism", args.foresight_s))
    jobs = [
        (policy, argparse.Namespace(**{**vars(args), "seed": seed}), entries, foresight_s)
        for policy, foresight_s in runs
        for seed in (args.seeds or [args.seed])
    ]
    with ProcessPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        for run in pool.map(simulated_run, jobs):
            payload["runs"].append(run)
            print(
                f"{run['policy']} seed {run['seed']}: "
                + ", ".join(f"{p['rate']:g} req/s {100 * p['attainment']:.1f}%" for p in run["points"]),
                flush=True,
            )
    return payload


def simulated_run(job: tuple[str, argparse.Namespace, list[dict], float]) -> dict:
    """One policy's sweep on one seed's traces in the simulator (a process pool's task); with
    foresight_s > 0 the policy plans on the trace's future (run named POLICY+foresight)."""
    policy, args, entries, foresight_s = job
    memory_bytes = int(args.memory_gb * (1 << 30))
    served = [e["model_name"] for e in served_entries(policy, entries, args, memory_bytes)]
    points = simulate_points(policy, served, sorted(args.rates), memory_bytes, args, entries, foresight_s=foresight_s)
    return {
        "policy": policy + FORESIGHT if foresight_s else policy,
        "seed": args.seed,
        "served": served,
        "points": points,
        **({"foresight_s": foresight_s} if foresight_s else {}),
    }


# ---- the summary -----------------------------------------------------------------------


def highest_rate(points: list[dict], threshold: float, key: str = "attainment") -> tuple[float | None, float | None]:
    """(the highest swept rate holding `threshold` with every lower one holding it too, that rate
    interpolated linearly towards the first point that misses); None where the lowest misses."""
    held = None
    ordered = sorted(points, key=lambda p: p["rate"])
    for i, p in enumerate(ordered):
        if p[key] < threshold:
            if held is None:
                return None, None
            prev = ordered[i - 1]
            x = (prev[key] - threshold) / (prev[key] - p[key])
            return held, prev["rate"] + x * (p["rate"] - prev["rate"])
        held = p["rate"]
    return held, held


def summary(payload: dict) -> list[dict]:
    """Per run, the highest rates holding each threshold; with several seeds also, per policy, those of
    its attainment averaged over the seeds (seed "mean"). prism's row of each seed (and of the mean) gets
    its ratio to the best baseline's interpolated rate on the same traces."""
    runs = list(payload["runs"])
    seeds = sorted({run["seed"] for run in runs if "seed" in run})
    if len(seeds) > 1:
        runs += [
            mean_run(policy, [run for run in runs if run["policy"] == policy])
            for policy in dict.fromkeys(run["policy"] for run in runs)
        ]
    rows = []
    for run in runs:
        row = {"policy": run["policy"], "seed": run.get("seed"), "served": len(run["served"])}
        for t in THRESHOLDS:
            held, interpolated = highest_rate(run["points"], t)
            row[f"held_{t}"], row[f"interp_{t}"] = held, interpolated
        rows.append(row)
    for seed in dict.fromkeys(row["seed"] for row in rows):
        same = [row for row in rows if row["seed"] == seed]
        ours = [row for row in same if row["policy"] in ("prism", "prism" + FORESIGHT)]
        for t in THRESHOLDS:
            baselines = [row[f"interp_{t}"] or 0.0 for row in same if row not in ours]
            for prism in ours if baselines else []:
                best = max(baselines)
                prism[f"ratio_{t}"] = (prism[f"interp_{t}"] or 0.0) / best if best else None
    return rows


def mean_run(policy: str, runs: list[dict]) -> dict:
    """A policy's runs on several seeds as one: each rate's attainment averaged over the seeds that ran it."""
    by_rate: dict[float, list[float]] = {}
    for run in runs:
        for point in run["points"]:
            by_rate.setdefault(point["rate"], []).append(point["attainment"])
    return {
        "policy": policy,
        "seed": "mean",
        "served": runs[0]["served"],
        "points": [{"rate": rate, "attainment": sum(v) / len(v)} for rate, v in sorted(by_rate.items())],
    }


def print_tables(payload: dict) -> None:
    settings = payload["settings"]
    models = payload["models"]
    sizes = {}
    for m in models:
        sizes[m["size"]] = sizes.get(m["size"], 0) + 1
    capped = ", the card capped" if settings.get("gpu_memory_gb") else ""
    print(
        f"\n{payload.get('device', settings['device'])}: {len(models)} models "
        f"({', '.join(f'{n} x {s}' for s, n in sizes.items())}, {payload['fleet_weight_gb']:.1f} GB of weights "
        f"on {settings['memory_bytes'] / 2**30:.1f} GiB{capped}); "
        f"trace {settings['duration']:g} s a point, groups of "
        f"{settings['group_size']} shifting every {settings['shift_s']:g} s, seed {settings['seed']}"
    )
    rows = []
    for run in payload["runs"]:
        sim = {p["rate"]: p for p in run.get("simulated", [])}
        for p in run["points"]:
            s = sim.get(p["rate"])
            rows.append(
                {
                    "policy": run["policy"],
                    "seed": run.get("seed"),
                    "rate": p["rate"],
                    "requests": p["requests"],
                    "attainment": 100 * p["attainment"],
                    "sim": 100 * s["attainment"] if s else None,
                    "diff": 100 * (s["attainment"] - p["attainment"]) if s else None,
                    "goodput": p.get("goodput_rps"),
                    "acts": p.get("activations_per_s"),
                    "ttft99": p.get("ttft_p99_s"),
                    "tpot99": p.get("tpot_p99_s"),
                    "sim_tpot99": s.get("tpot_p99_s") if s else None,
                    "peak": p.get("peak_used_gib"),
                    "errors": sum(p["errors"].values()),
                }
            )
    seeded = [("seed", "seed", "")] if any(row["seed"] is not None for row in rows) else []
    print(
        table(
            rows,
            [
                ("policy", "policy", ""),
                *seeded,
                ("rate", "req/s", "g"),
                ("requests", "requests", "d"),
                ("attainment", "attainment %", ".1f"),
                ("sim", "simulated %", ".1f"),
                ("diff", "sim - live", "+.1f"),
                ("goodput", "goodput req/s", ".2f"),
                ("acts", "activations/s", ".2f"),
                ("ttft99", "TTFT p99 s", ".2f"),
                ("tpot99", "TPOT p99 s", ".3f"),
                ("sim_tpot99", "simulated TPOT p99 s", ".3f"),
                ("peak", "peak GiB", ".1f"),
                ("errors", "errors", "d"),
            ],
        )
    )
    print()
    columns = [("policy", "policy", ""), *seeded, ("served", "models served", "d")]
    for t in THRESHOLDS:
        pct = f"{100 * t:g}%"
        columns += [
            (f"held_{t}", f"rate at {pct}", "g"),
            (f"interp_{t}", f"interpolated {pct}", ".2f"),
            (f"ratio_{t}", f"x best baseline {pct}", ".2f"),
        ]
    print(table(summary(payload), columns))


def plot(payload: dict, path: Path) -> None:
    """Attainment against rate per policy (live solid, simulated dashed), and at the highest rate each
    policy's GPU memory over time, split per active engine (weights + mapped KV)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = payload["runs"]
    fig, axes = plt.subplots(1 + len(runs), 1, figsize=(10, 3.2 * (1 + len(runs))), squeeze=False)
    ax = axes[0, 0]
    for run in runs:
        (line,) = ax.plot(
            [p["rate"] for p in run["points"]],
            [100 * p["attainment"] for p in run["points"]],
            marker="o",
            label=run["policy"],
        )
        if run.get("simulated"):
            ax.plot(
                [p["rate"] for p in run["simulated"]],
                [100 * p["attainment"] for p in run["simulated"]],
                ls="--",
                color=line.get_color(),
                alpha=0.6,
            )
    for t in THRESHOLDS:
        ax.axhline(100 * t, color="grey", lw=0.5)
    ax.set_xlabel("aggregate rate (req/s)")
    ax.set_ylabel("attainment %")
    ax.set_title(f"{payload.get('device', '')}: live (solid) and simulated (dashed)", fontsize=10)
    ax.legend(fontsize=8)
    for ax, run in zip(axes[1:, 0], runs):
        point = max(run["points"], key=lambda p: p["rate"])
        samples = [s for s in point.get("memory_samples", []) if s.get("engines_gb")]
        names = sorted({m for s in samples for m in s["engines_gb"][0]}, key=lambda n: int(n.split("-")[1]))
        times = [s["t"] for s in samples]
        stacks = [[sum(s["engines_gb"][0].get(n, [0, 0, 0])[:2]) for s in samples] for n in names]
        if samples:
            ax.stackplot(times, stacks, labels=names)
            used = [s["used_mib"][0] * 2**20 / GB for s in samples if "used_mib" in s]
            if len(used) == len(times):
                ax.plot(times, used, color="black", lw=1, label="nvidia-smi")
        ax.set_ylabel("GB")
        ax.set_title(
            f"{run['policy']} at {point['rate']:g} req/s: {100 * point['attainment']:.1f}% "
            "(each active engine's weights + mapped KV)",
            fontsize=10,
        )
        ax.legend(loc="upper right", fontsize=6, ncol=4)
    axes[-1, 0].set_xlabel("seconds into the point's trace")
    save_figure(fig, path)


# ---- main --------------------------------------------------------------------------------


def merge(files: list[Path]) -> dict:
    payloads = [json.loads(f.read_text()) for f in files]
    out = dict(payloads[0])
    out["runs"] = [run for p in payloads for run in p["runs"]]
    out["parts"] = [
        {"file": str(f), "date": p["date"], "policies": [r["policy"] for r in p["runs"]]}
        for f, p in zip(files, payloads)
    ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument(
        "--fleet",
        default=None,
        help="SIZE=COUNT,... of 1b, 3b, 8b (default 1b=4,3b=4,8b=4; cpu: 1b=3,3b=3 of the tiny model)",
    )
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--rates", nargs="+", type=float, default=[6.0, 10.0, 14.0], help="aggregate req/s, one point each")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of trace per point")
    p.add_argument("--shift-s", type=float, default=30.0, help="how often the active group changes")
    p.add_argument("--group-size", type=int, default=4, help="models that become active together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="--simulate-only: one sweep per seed (default: --seed alone); the summary gives each "
        "seed's highest rates and, per policy, those of the mean over the seeds",
    )
    p.add_argument("--settle-s", type=float, default=5.0, help="idle seconds before each point")
    p.add_argument(
        "--shed-load",
        action="store_true",
        help="every model sheds load (placement config shed_load): a request with no first token by its "
        "TTFT SLO is refused (429) instead of served late, for every policy alike",
    )
    p.add_argument(
        "--share-engines",
        action="store_true",
        help="prism, kvpr and time-share on one cluster in turn (the engines load once; static has "
        "its own): the scheduler restarts with each policy, every engine switched off",
    )
    p.add_argument(
        "--reset-settle-s",
        "--policy-settle-s",
        dest="policy_settle_s",
        type=float,
        default=60.0,
        help="idle seconds after the reset before every point but a cluster's first: scheduler "
        "restarted, every engine off (60: the agents' stats window)",
    )
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=0.0,
        help="the agent's --gpu-memory-gb: plan the card as this many GiB (default 0: all of it); on an "
        "H200, 79.19 runs it as an H100 (the fleet is 1.3x an H100's memory, not an H200's)",
    )
    p.add_argument(
        "--reserve-gb",
        type=float,
        default=None,
        help="the agent's --memory-reserve-gb: kept out of weights and KV for the engine processes' "
        "CUDA contexts, activations and graphs (default 14 on cuda: about 1 GB for each of 12 "
        "engine processes, measured on the H100; 0 on cpu)",
    )
    p.add_argument(
        "--cuda-mps",
        default=None,
        choices=["auto", "on", "off"],
        help="the agent's --cuda-mps: engine processes share the GPU through CUDA MPS (default on: "
        "the run fails without it; off on cpu)",
    )
    p.add_argument(
        "--static-kv-gb",
        type=float,
        default=None,
        help="static: KV each configured model needs at least (default 2; cpu: 0.05)",
    )
    p.add_argument("--cpu-memory-gb", type=float, default=1.0, help="the CPU device's memory (--device cpu)")
    p.add_argument("--chars-per-token", type=float, default=None, help="default: 1 (cuda: byte tokenizer), 2.2 (cpu)")
    p.add_argument("--load-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/one_gpu-<device>.json")
    p.add_argument("--state-dir", type=Path, default=None, help="keep each cluster's state and logs here")
    p.add_argument(
        "--tables-from",
        type=Path,
        nargs="+",
        default=None,
        help="result files of this script (one per call): merged, tables printed, nothing run",
    )
    p.add_argument("--simulate", action="store_true", help="also run the simulator on every live point's trace")
    p.add_argument("--simulate-only", action="store_true", help="no live run: the sweep in the simulator alone")
    p.add_argument(
        "--foresight-s",
        type=float,
        default=0.0,
        help="with --simulate-only: also run prism planning on each model's arrivals over the next "
        "this many seconds of the trace (prism+foresight: an upper bound on demand forecasting, "
        "kept out of the baselines)",
    )
    p.add_argument(
        "--make-room-idle-s",
        type=float,
        default=MAKE_ROOM_IDLE_S,
        help="--simulate-only: the simulated agent switches off, to make room for an activation, engines idle "
        "this long (the live agent's --busy-window-s; default %(default)s)",
    )
    p.add_argument(
        "--memory-gb",
        type=float,
        default=79.19,
        help="--simulate-only: the card's memory, GiB (default an H100's, as torch reports it)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="the simulator's latency profile (default: the H100's; cpu: the CPU cluster's)",
    )
    p.add_argument("--plot", type=Path, default=None, help="also write a PNG (matplotlib)")
    args = p.parse_args()
    if args.foresight_s < 0 or (args.foresight_s and not args.simulate_only):
        p.error("--foresight-s takes seconds > 0 and needs --simulate-only (no live scheduler knows the future)")
    if args.tables_from:
        payload = merge(args.tables_from)
        for key in ("device", "fleet", "duration", "shift_s", "group_size", "seed", "chars_per_token", "reserve_gb"):
            setattr(args, key, payload["settings"][key])
        args.shed_load = payload["settings"].get("shed_load", False)  # runs before 2026-12-08 had none
    else:
        payload = None
    if args.reserve_gb is None:
        args.reserve_gb = 0.0 if args.device == "cpu" else 14.0
    if args.cuda_mps is None:
        args.cuda_mps = "off" if args.device == "cpu" else "on"
    if args.static_kv_gb is None:
        args.static_kv_gb = 0.05 if args.device == "cpu" else 2.0
    args.fleet = args.fleet or ("1b=3,3b=3" if args.device == "cpu" else "1b=4,3b=4,8b=4")
    if args.chars_per_token is None:
        args.chars_per_token = 2.2 if args.device == "cpu" else 1.0
    if args.profile is None:
        args.profile = (
            common.ROOT
            / "bench"
            / "results"
            / ("sim-profile-cpu-cluster.json" if args.device == "cpu" else "sim-profile-h100.json")
        )
    out_path = args.out or common.ROOT / "bench" / "results" / f"one_gpu-{args.device}.json"
    with tempfile.TemporaryDirectory(prefix="prism-one-gpu-") as tmp:
        state = args.state_dir or Path(tmp)
        state.mkdir(parents=True, exist_ok=True)
        entries = fleet_entries(args, state)
        if payload is None and args.simulate_only:
            payload = simulated_only(args, entries)
        elif payload is None:
            payload = live_runs(args, entries, state, out_path)
        if args.simulate:
            for run in payload["runs"]:
                run["simulated"] = simulate_points(
                    run["policy"],
                    run["served"],
                    [p["rate"] for p in run["points"]],
                    payload["settings"]["memory_bytes"],
                    args,
                    entries,
                    run["points"],
                )
    write_json(out_path, payload)
    if args.plot:
        plot(payload, args.plot)
    print_tables(payload)


def live_runs(args: argparse.Namespace, entries: list[dict], state: Path, out_path: Path) -> dict:
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["memory_bytes"] = device_memory_bytes(args)
    payload: dict = {
        "benchmark": "one_gpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": settings,
        "fleet_weight_gb": sum(weight_bytes(e) for e in entries) / GB,
        "models": [
            {"name": e["model_name"], "size": e["size"], "config": Path(e["model_path"]).name, "slo": e["slo"]}
            for e in entries
        ],
    }
    if shutil.which("nvidia-smi"):
        payload["device"] = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True
            )
            .stdout.strip()
            .splitlines()[0]
        )
    print(
        f"{len(entries)} models, {payload['fleet_weight_gb']:.1f} GB of weights, on "
        f"{settings['memory_bytes'] / 2**30:.1f} GiB ({args.device}"
        + (f", the card capped at {args.gpu_memory_gb:g} GiB" if args.gpu_memory_gb else "")
        + ")",
        flush=True,
    )
    runs: list[dict] = []
    # Kept as it goes, point by point: a later point or policy may not finish within the call.
    shared = [p for p in args.policies if p != "static"] if args.share_engines else []
    if shared:
        runs += run_policies_sharing_engines(
            shared, args, entries, state, save=lambda so_far: write_json(out_path, {**payload, "runs": so_far})
        )
    for policy in (p for p in args.policies if p not in shared):
        runs.append(
            run_policy(
                policy, args, entries, state, save=lambda run: write_json(out_path, {**payload, "runs": runs + [run]})
            )
        )
    payload["runs"] = runs
    return payload


if __name__ == "__main__":
    main()
