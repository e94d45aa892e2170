"""Step costs learned live (issue 22): a cluster serves each model alone at a
few batch sizes, its engines sum their steps' times (services/common/step_costs.py;
only steps that ran alone on the device count), and the scheduler's fitted
costs, read back from its record in etcd (what `prism status` shows), are put
beside the card's profile: each cost, and the step times both predict for a
few step shapes.

    python bench/step_costs.py --out $OUT/step_costs-h100.json            # on the GPU: 1B, 3B, 8B
    python bench/step_costs.py --device cpu --out /tmp/step_costs-cpu.json # a dry run on tiny models

Each model gets --rounds rounds of --batches concurrent requests (prompt
--prompt-tokens, --output-tokens each, EOS ignored), one model at a time,
so its steps run alone; the scheduler fits a size once its engines have run
200 steps (MIN_MEASURED_STEPS)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common  # first: puts the project on sys.path
from common import table, write_json

from prism.cluster import LocalCluster
from prism.tiny_models import write_tiny_model
from prism_client import PrismClient
from services.common.etcd_server import free_port
from services.scheduler.policies.compute import (
    ComputeCosts,
    StepCost,
    compute_costs_for,
    compute_costs_from_profile,
)

CONFIGS = common.ROOT / "bench" / "configs"
# Step shapes to compare: (decoding sequences, tokens of context each, prefill tokens, prompts).
SHAPES = ((1, 512, 0, 0), (16, 512, 0, 0), (32, 1024, 0, 0), (0, 0, 512, 1), (8, 512, 256, 1))


def model_entries(args: argparse.Namespace, state: Path) -> list[dict]:
    if args.device == "cpu":
        tiny = write_tiny_model(state / "tiny-llama")
        return [
            {
                "model_name": "tiny",
                "model_path": str(tiny),
                "dtype": "float32",
                "init_placements": [{"gpu_ids": [0], "on": True}],
            }
        ]
    return [
        {
            "model_name": f"llama-{size}",
            "model_path": str(CONFIGS / common.GPU_CONFIGS[size]),
            "load_format": "dummy",
            "max_context": 4096,
            "init_placements": [{"gpu_ids": [0], "on": True}],
        }
        for size in args.sizes
    ]


def drive(cluster: LocalCluster, model: str, args: argparse.Namespace) -> int:
    """Rounds of concurrent requests at each batch size; returns the requests that completed."""
    prompt = "x" * (args.prompt_tokens * (1 if args.device == "cuda" else 2))  # the dummy models' byte tokenizer
    done = 0
    with PrismClient(cluster.gateway_grpc, timeout_s=300) as client, ThreadPoolExecutor(max(args.batches)) as pool:
        for batch in args.batches:
            for _ in range(args.rounds):
                results = list(
                    pool.map(
                        lambda _: client.generate(
                            model, prompt, max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True
                        ),
                        range(batch),
                    )
                )
                done += sum(1 for r in results if r.completion_tokens == args.output_tokens)
    return done


def published_costs(cluster: LocalCluster, sizes: int, timeout_s: float) -> dict:
    """The scheduler's status record once `sizes` sizes are measured in its step costs."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            [sys.executable, "-m", "prism.cli", "status", "--etcd", cluster.etcd_endpoint, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=common.ROOT,
        )
        costs = json.loads(out.stdout).get("scheduler_status") if out.returncode == 0 else None
        measured = [p for p in (costs or {}).get("points", []) if p.get("measured_steps")]
        if len(measured) >= sizes:
            return costs
        if time.monotonic() > deadline:
            raise SystemExit(
                f"the scheduler published {len(measured)} measured size(s) of {sizes} within {timeout_s:.0f} s: {costs}"
            )
        time.sleep(2.0)


def step_s(costs: ComputeCosts, weight_bytes: int, kv_per_token: int, shape: tuple[int, int, int, int]) -> float:
    decode, context, prefill, prompts = shape
    t = (
        costs.at(weight_bytes, "decode_base_s")
        + decode * costs.at(weight_bytes, "decode_per_seq_s")
        + decode * context * kv_per_token / costs.attention_bytes_per_s
    )
    if prefill:
        t += (
            costs.at(weight_bytes, "prefill_base_s")
            + prompts * costs.at(weight_bytes, "prefill_per_seq_s")
            + prefill * costs.at(weight_bytes, "prefill_per_token_s")
        )
    return t


def compare(record: dict, profile: ComputeCosts, kv_per_token: dict[int, int]) -> list[dict]:
    """Per measured size: each cost measured and in the profile, and the step times both predict."""
    fields = ("decode_base_s", "decode_per_seq_s", "prefill_base_s", "prefill_per_token_s", "prefill_per_seq_s")
    measured = ComputeCosts(
        points=tuple(StepCost(**{k: p[k] for k in ("weight_bytes", *fields)}) for p in record["points"]),
        attention_bytes_per_s=record["attention_bytes_per_s"],
    )
    rows = []
    for point in (p for p in record["points"] if p.get("measured_steps")):
        size = point["weight_bytes"]
        row = {
            "weight_gb": size / 1e9,
            "steps": point["measured_steps"],
            **{f: point[f] for f in fields},
            **{f"profile_{f}": profile.at(size, f) for f in fields},
            "attention_gb_per_s": measured.attention_bytes_per_s / 1e9,
            "profile_attention_gb_per_s": profile.attention_bytes_per_s / 1e9,
            "shapes": [],
        }
        for shape in SHAPES:
            kv = kv_per_token.get(size, 0)
            row["shapes"].append(
                {
                    "shape": shape,
                    "measured_ms": 1e3 * step_s(measured, size, kv, shape),
                    "profile_ms": 1e3 * step_s(profile, size, kv, shape),
                }
            )
        rows.append(row)
    return rows


def kv_bytes_per_token(entries: list[dict], weights: dict[str, int]) -> dict[int, int]:
    from prism.simulator.models import sim_model
    from services.common.placement_config import parse

    out = {}
    for model in parse({"models": entries}).models:
        out[weights.get(model.model_name, 0)] = sim_model(model).kv_bytes_per_token
    return out


def engine_weights(cluster: LocalCluster) -> dict[str, int]:
    status = common.agent_status(cluster.agent_address)
    return {e.model: e.weight_bytes for gpu in status.gpus for e in gpu.engines}


def print_table(payload: dict) -> None:
    rows = []
    for r in payload["sizes"]:
        for s in r["shapes"]:
            decode, context, prefill, prompts = s["shape"]
            size = f"{r['weight_gb']:.2f} GB" if r["weight_gb"] >= 0.1 else f"{r['weight_gb'] * 1e3:.1f} MB"
            rows.append(
                {
                    "size": size,
                    "steps": r["steps"],
                    "shape": f"{decode} x {context} ctx" + (f" + {prefill} prefill" if prefill else ""),
                    "measured": s["measured_ms"],
                    "profile": s["profile_ms"],
                    "ratio": s["measured_ms"] / s["profile_ms"] if s["profile_ms"] else None,
                }
            )
    print(f"\n{payload['device']}: step times the fitted costs predict, against the card's profile")
    print(
        table(
            rows,
            [
                ("size", "weights", ""),
                ("steps", "steps fitted", ".0f"),
                ("shape", "step", ""),
                ("measured", "measured ms", ".2f"),
                ("profile", "profile ms", ".2f"),
                ("ratio", "measured / profile", ".2f"),
            ],
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--sizes", nargs="+", default=["1b", "3b", "8b"], choices=sorted(common.GPU_CONFIGS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 32])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 512 (cpu: 48)")
    p.add_argument("--output-tokens", type=int, default=None, help="default 64 (cpu: 24)")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="the profile to compare with (default: the H100's on cuda; the CPU cluster's constants)",
    )
    p.add_argument("--load-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/step_costs-<device>.json")
    p.add_argument("--state-dir", type=Path, default=None)
    args = p.parse_args()
    cpu = args.device == "cpu"
    args.prompt_tokens = args.prompt_tokens or (48 if cpu else 512)
    args.output_tokens = args.output_tokens or (24 if cpu else 64)
    profile = (
        compute_costs_from_profile(json.loads(args.profile.read_text()))
        if args.profile
        else compute_costs_for([("cpu", "cpu")] if cpu else [("cuda", "H100")])
    )
    state = args.state_dir or Path(tempfile_dir())
    state.mkdir(parents=True, exist_ok=True)
    entries = model_entries(args, state)
    config = state / "models.json"
    config.write_text(json.dumps({"policy": "static", "models": entries}, indent=1))
    cluster = LocalCluster(
        state_dir=state / "cluster",
        config_path=config,
        http_port=free_port(),
        grpc_port=free_port(),
        device=args.device,
        engine_isolation="process",
        agent_args=("--spare-workers", "0"),
        scheduler_args=(
            "--replan-interval-s",
            "0.5",
            "--status-interval-s",
            "1",
            "--step-costs-from",
            "all" if cpu else "cuda",
        ),
    )
    cluster.start(timeout_s=args.load_timeout)
    try:
        common.wait_loaded(cluster, [e["model_name"] for e in entries], args.load_timeout)
        completed = {e["model_name"]: drive(cluster, e["model_name"], args) for e in entries}
        record = published_costs(cluster, len(entries), timeout_s=60.0)
        weights = engine_weights(cluster)
    finally:
        cluster.stop()
    payload = {
        "benchmark": "step_costs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": common.environment().get("device", args.device),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "completed": completed,
        "record": record,
        "sizes": compare(record, profile, kv_bytes_per_token(entries, weights)),
    }
    write_json(args.out or common.ROOT / "bench" / "results" / f"step_costs-{args.device}.json", payload)
    print_table(payload)


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="prism-step-costs-")


if __name__ == "__main__":
    main()
