"""A CPU latency profile for the simulator (prism/simulator/profile.py) from
the tiny generated models (prism.tiny_models), measured in-process.

For each tiny model, the built-in engine on the CPU (real generated weights,
torch attention) serves `batch` concurrent greedy requests of `prompt`
tokens and a few new tokens, EOS ignored, at a few batch sizes and prompt
lengths (bench/decode_throughput.py's decode_round: decode step = time from
the last first token to the last token over new_tokens - 1 steps; prefill =
time to the last first token, one step holding the whole batch's prompts).
Fits, by least squares over all rows:
    decode step = decode_base + decode_per_seq * batch + batch * mean_context * kv_bytes / attention_rate
    prefill     = (decode_base + prefill_base) + prefill_per_token * batch * prompt
Activation is taken as ~0 (the CPU "device" is host memory; nothing moves);
load is the measured engine creation. Takes a few seconds.

With --through-cluster the same rows are measured end to end instead: the
requests go through a real LocalCluster (etcd, scheduler, one agent with
inline engines, the gRPC gateway) from a client in this process, so the step
and prefill times include what the engine alone does not pay: gRPC streaming
through the agent and the gateway, asyncio, and the cores those processes
share with the engine. The simulator has no separate term for that cost; a
profile fitted this way charges it to the steps, as the real cluster does.

    python bench/profile_cpu.py [--out bench/results/sim-profile-cpu.json]
    python bench/profile_cpu.py --through-cluster --out bench/results/sim-profile-cpu-cluster.json
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from decode_throughput import decode_round, prompt_of_length  # noqa: E402

from prism.simulator.profile import LatencyProfile, SizePoint  # noqa: E402
from prism.tiny_models import ensure_default_models  # noqa: E402
from services.gpu_agent.engine.engine import Engine  # noqa: E402

BATCHES = (1, 4, 16)
PROMPTS = (16, 128)
NEW_TOKENS = 12


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _solve(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares (normal equations through torch, float64)."""
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(ys, dtype=torch.float64).unsqueeze(1)
    return torch.linalg.lstsq(a, b).solution.squeeze(1).tolist()


def measure_model(folder: Path, batches=BATCHES, prompts=PROMPTS, new_tokens: int = NEW_TOKENS) -> dict:
    """Step and prefill times of one model's engine on the CPU, one row per (batch, prompt)."""
    t0 = time.perf_counter()
    engine = Engine(
        folder, name=folder.name, device="cpu", attention="torch", step_tokens=max(512, max(batches) * max(prompts))
    )
    engine.start()
    load_s = time.perf_counter() - t0
    try:

        async def run_all() -> list[dict]:
            texts = {p: prompt_of_length(engine, p) for p in prompts}
            await measure_rows(engine, texts, batches, new_tokens, "warm")  # untimed: see measure_rows
            return await measure_rows(engine, texts, batches, new_tokens, engine.name)

        rows = asyncio.run(run_all())
        return {
            "model": folder.name,
            "weight_bytes": engine.weight_bytes,
            "kv_bytes_per_token": engine.kv_bytes_per_token,
            "load_s": load_s,
            "rows": rows,
        }
    finally:
        engine.stop()


async def measure_rows(engine, texts: dict[int, str], batches, new_tokens: int, tag: str) -> list[dict]:
    """One row per (prompt length, batch): decode_round's step and prefill times.
    Run it once untimed first: on the CPU a shape's first steps pay a one-time
    cost (through a cluster, a 16-request first burst: 130 ms a step, then 3 ms)."""
    rows = []
    for prompt, text in texts.items():
        for batch in batches:
            r = await decode_round(engine, text, prompt, batch, new_tokens, f"{tag}-{prompt}-{batch}")
            rows.append(
                {
                    "batch": batch,
                    "prompt_tokens": prompt,
                    "new_tokens": new_tokens,
                    "step_s": r["step_s"],
                    "prefill_s": r["prefill_s"],
                }
            )
    return rows


class GatewayEngine:
    """The parts of an Engine that decode_round and prompt_of_length use, served
    by a cluster's gRPC gateway: requests take the whole path a client's do."""

    def __init__(self, stub, model: str, folder: Path):
        from services.gpu_agent.engine.tokenizer import Tokenizer

        self._stub, self.name, self._tokenizer = stub, model, Tokenizer(folder)

    def tokenize_prompt(self, req) -> list[int]:
        from services.gpu_agent.engine.prompt import prompt_token_ids

        return prompt_token_ids(self._tokenizer, req)

    async def generate(self, req):
        from prism_client.v1 import generate_pb2

        sampling = generate_pb2.SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
        request = generate_pb2.GenerateRequest(
            request_id=req.request_id, model=self.name, prompt=req.prompt, sampling=sampling
        )
        async for response in self._stub.Generate(request):
            yield _Output(
                list(response.token_ids), response.usage.prompt_tokens if response.HasField("usage") else None
            )


class _Output:
    def __init__(self, token_ids: list[int], prompt_tokens: int | None):
        self.token_ids, self.prompt_tokens = token_ids, prompt_tokens


def measure_through_cluster(
    models: dict[str, Path], batches=BATCHES, prompts=PROMPTS, new_tokens: int = NEW_TOKENS
) -> list[dict]:
    """The rows of measure_model, each model served by a real local cluster (see the module doc)."""
    import json

    import grpc

    from prism.cluster import LocalCluster
    from prism_client.v1 import gateway_pb2_grpc
    from services.common.etcd_server import free_port

    facts = {}
    for name, folder in models.items():  # weight and KV sizes and creation time, from an engine of the same model
        t0 = time.perf_counter()
        engine = Engine(folder, name=name, device="cpu", attention="torch")
        facts[name] = (engine.weight_bytes, engine.kv_bytes_per_token, time.perf_counter() - t0)
        engine.stop()
    with tempfile.TemporaryDirectory(prefix="prism-profile-") as tmp:
        state = Path(tmp)
        config = state / "models.json"
        config.write_text(
            json.dumps(
                {
                    "policy": "static",
                    "models": [
                        {"model_name": n, "model_path": str(f), "init_placements": [{"gpu_ids": [0], "on": True}]}
                        for n, f in sorted(models.items())
                    ],
                }
            )
        )
        cluster = LocalCluster(
            state_dir=state / "cluster",
            config_path=config,
            http_port=free_port(),
            grpc_port=free_port(),
            device="cpu",
            engine_isolation="inline",
        )
        cluster.start()
        measured = []
        try:

            async def run_all() -> None:
                async with grpc.aio.insecure_channel(cluster.gateway_grpc) as channel:
                    stub = gateway_pb2_grpc.GatewayStub(channel)
                    engines = {name: GatewayEngine(stub, name, folder) for name, folder in sorted(models.items())}
                    texts = {name: {p: prompt_of_length(e, p) for p in prompts} for name, e in engines.items()}
                    for name, engine in engines.items():  # untimed first, every model (see measure_rows)
                        await measure_rows(engine, texts[name], batches, new_tokens, f"warm-{name}")
                    for name, engine in engines.items():
                        rows = await measure_rows(engine, texts[name], batches, new_tokens, name)
                        weight_bytes, kv_bytes, load_s = facts[name]
                        measured.append(
                            {
                                "model": name,
                                "weight_bytes": weight_bytes,
                                "kv_bytes_per_token": kv_bytes,
                                "load_s": load_s,
                                "rows": rows,
                            }
                        )

            asyncio.run(run_all())
        finally:
            cluster.stop()
    return measured


def fit_cpu_profile(measured: list[dict], through_cluster: bool = False) -> LatencyProfile:
    """One SizePoint per distinct weight size (models of the same size averaged), a shared attention rate."""
    # Attention rate from all models' decode rows: step = base_m + per_seq_m * b + kv_read * s_per_byte.
    names = [m["model"] for m in measured]
    xs, ys = [], []
    for i, m in enumerate(measured):
        for r in m["rows"]:
            kv_read = r["batch"] * (r["prompt_tokens"] + r["new_tokens"] / 2) * m["kv_bytes_per_token"]
            x = [0.0] * (2 * len(measured)) + [kv_read]
            x[2 * i], x[2 * i + 1] = 1.0, float(r["batch"])
            xs.append(x)
            ys.append(r["step_s"])
    coef = _solve(xs, ys)
    s_per_byte = max(coef[-1], 1e-15)
    by_size: dict[int, list[SizePoint]] = {}
    for i, m in enumerate(measured):
        base, per_seq = coef[2 * i], coef[2 * i + 1]
        intercept, per_token = _solve(
            [[1.0, float(r["batch"] * r["prompt_tokens"])] for r in m["rows"]], [r["prefill_s"] for r in m["rows"]]
        )
        by_size.setdefault(m["weight_bytes"], []).append(
            SizePoint(
                model=m["model"],
                weight_bytes=m["weight_bytes"],
                decode_base_s=max(0.0, base),
                decode_per_seq_s=max(0.0, per_seq),
                prefill_base_s=max(0.0, intercept - base),
                prefill_per_token_s=max(0.0, per_token),
            )
        )
    points = []
    for size, pts in sorted(by_size.items()):
        n = len(pts)
        points.append(
            SizePoint(
                model="+".join(p.model for p in pts),
                weight_bytes=size,
                **{
                    k: sum(getattr(p, k) for p in pts) / n
                    for k in ("decode_base_s", "decode_per_seq_s", "prefill_base_s", "prefill_per_token_s")
                },
            )
        )
    device = f"CPU: {cpu_name()} ({torch.get_num_threads()} torch threads)"
    load_s = sum(m["load_s"] for m in measured) / len(measured)
    metadata = {
        "device": device,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "models": names,
        "source": "bench/profile_cpu.py" + (" --through-cluster" if through_cluster else ""),
        "measured": [
            (
                "requests through a local cluster's gRPC gateway to an inline engine (device cpu, torch attention) of "
                if through_cluster
                else "in-process engine (device cpu, torch attention) of "
            )
            + f"{', '.join(names)}: decode step time and one-step "
            f"prefill at batch {list(BATCHES)} x prompt {list(PROMPTS)} tokens, {NEW_TOKENS} new tokens; "
            "decode_base_s, decode_per_seq_s, attention_bytes_per_s (shared), prefill_base_s, prefill_per_token_s "
            "by least squares",
            "engine creation (load_base_s)",
        ],
        "assumptions": [
            "activation and deactivation ~0: weights stay in host memory (copy rate set to 1e15 B/s)",
            (
                "the agent's, gRPC's and the gateway's per-token costs are in the step times (measured through them)"
                if through_cluster
                else "no agent, gRPC or gateway overhead: the real cluster's per-request costs are not in the step "
                "times"
            ),
            "models of the same weight size averaged into one point",
        ],
        "rows": {m["model"]: m["rows"] for m in measured},
    }
    return LatencyProfile(
        device=device,
        points=tuple(points),
        attention_bytes_per_s=1 / s_per_byte,
        copy_bytes_per_s=1e15,
        activation_overhead_s=0.0,
        deactivation_s=0.0,
        load_base_s=load_s,
        load_bytes_per_s=1e15,
        metadata=metadata,
    )


def profile_cpu(
    models_dir: Path | None = None,
    batches=BATCHES,
    prompts=PROMPTS,
    new_tokens: int = NEW_TOKENS,
    through_cluster: bool = False,
) -> tuple[LatencyProfile, list[dict]]:
    if models_dir is None:
        models_dir = Path(tempfile.gettempdir()) / "prism-tiny-models"
    models = ensure_default_models(Path(models_dir))
    if through_cluster:
        measured = measure_through_cluster({n: Path(p) for n, p in models.items()}, batches, prompts, new_tokens)
    else:
        measured = [measure_model(Path(path), batches, prompts, new_tokens) for _, path in sorted(models.items())]
    return fit_cpu_profile(measured, through_cluster), measured


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=HERE / "results" / "sim-profile-cpu.json")
    p.add_argument(
        "--through-cluster",
        action="store_true",
        help="measure through a local cluster's gateway (see above) instead of the engine alone",
    )
    args = p.parse_args()
    profile, measured = profile_cpu(args.models_dir, through_cluster=args.through_cluster)
    for m in measured:
        for r in m["rows"]:
            print(
                f"{m['model']:<11} batch {r['batch']:>3} prompt {r['prompt_tokens']:>4}: "
                f"step {r['step_s'] * 1e3:6.2f} ms  prefill {r['prefill_s'] * 1e3:7.2f} ms"
            )
    for pt in profile.points:
        print(
            f"{pt.model}: decode {pt.decode_base_s * 1e3:.2f} ms + {pt.decode_per_seq_s * 1e6:.1f} us/seq, "
            f"prefill +{pt.prefill_base_s * 1e3:.2f} ms + {pt.prefill_per_token_s * 1e6:.2f} us/token"
        )
    print(f"attention {profile.attention_bytes_per_s / 1e9:.2f} GB/s; device {profile.device}")
    profile.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
