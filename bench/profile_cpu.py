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

    python bench/profile_cpu.py [--out bench/results/sim-profile-cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
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
    engine = Engine(folder, name=folder.name, device="cpu", attention="torch",
                    step_tokens=max(512, max(batches) * max(prompts)))
    engine.start()
    load_s = time.perf_counter() - t0
    try:
        rows = []

        async def run_all() -> None:
            texts = {p: prompt_of_length(engine, p) for p in prompts}
            await decode_round(engine, texts[prompts[0]], prompts[0], 2, 4, "warm")  # untimed
            for prompt in prompts:
                for batch in batches:
                    r = await decode_round(engine, texts[prompt], prompt, batch, new_tokens, f"{prompt}-{batch}")
                    rows.append({"batch": batch, "prompt_tokens": prompt, "new_tokens": new_tokens,
                                 "step_s": r["step_s"], "prefill_s": r["prefill_s"]})

        asyncio.run(run_all())
        return {"model": folder.name, "weight_bytes": engine.weight_bytes,
                "kv_bytes_per_token": engine.kv_bytes_per_token, "load_s": load_s, "rows": rows}
    finally:
        engine.stop()


def fit_cpu_profile(measured: list[dict]) -> LatencyProfile:
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
        intercept, per_token = _solve([[1.0, float(r["batch"] * r["prompt_tokens"])] for r in m["rows"]],
                                      [r["prefill_s"] for r in m["rows"]])
        by_size.setdefault(m["weight_bytes"], []).append(SizePoint(
            model=m["model"], weight_bytes=m["weight_bytes"], decode_base_s=max(0.0, base),
            decode_per_seq_s=max(0.0, per_seq), prefill_base_s=max(0.0, intercept - base),
            prefill_per_token_s=max(0.0, per_token)))
    points = []
    for size, pts in sorted(by_size.items()):
        n = len(pts)
        points.append(SizePoint(model="+".join(p.model for p in pts), weight_bytes=size,
                                **{k: sum(getattr(p, k) for p in pts) / n for k in
                                   ("decode_base_s", "decode_per_seq_s", "prefill_base_s", "prefill_per_token_s")}))
    device = f"CPU: {cpu_name()} ({torch.get_num_threads()} torch threads)"
    load_s = sum(m["load_s"] for m in measured) / len(measured)
    metadata = {
        "device": device, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": "bench/profile_cpu.py", "torch": torch.__version__, "models": names,
        "measured": [
            f"in-process engine (device cpu, torch attention) of {', '.join(names)}: decode step time and one-step "
            f"prefill at batch {list(BATCHES)} x prompt {list(PROMPTS)} tokens, {NEW_TOKENS} new tokens; "
            "decode_base_s, decode_per_seq_s, attention_bytes_per_s (shared), prefill_base_s, prefill_per_token_s "
            "by least squares",
            "engine creation (load_base_s)",
        ],
        "assumptions": [
            "activation and deactivation ~0: weights stay in host memory (copy rate set to 1e15 B/s)",
            "no agent, gRPC or gateway overhead: the real cluster's per-request costs are not in the step times",
            "models of the same weight size averaged into one point",
        ],
        "rows": {m["model"]: m["rows"] for m in measured},
    }
    return LatencyProfile(device=device, points=tuple(points), attention_bytes_per_s=1 / s_per_byte,
                          copy_bytes_per_s=1e15, activation_overhead_s=0.0, deactivation_s=0.0,
                          load_base_s=load_s, load_bytes_per_s=1e15, metadata=metadata)


def profile_cpu(models_dir: Path | None = None, batches=BATCHES, prompts=PROMPTS,
                new_tokens: int = NEW_TOKENS) -> tuple[LatencyProfile, list[dict]]:
    if models_dir is None:
        models_dir = Path(tempfile.gettempdir()) / "prism-tiny-models"
    models = ensure_default_models(Path(models_dir))
    measured = [measure_model(Path(path), batches, prompts, new_tokens) for _, path in sorted(models.items())]
    return fit_cpu_profile(measured), measured


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=HERE / "results" / "sim-profile-cpu.json")
    args = p.parse_args()
    profile, measured = profile_cpu(args.models_dir)
    for m in measured:
        for r in m["rows"]:
            print(f"{m['model']:<11} batch {r['batch']:>3} prompt {r['prompt_tokens']:>4}: "
                  f"step {r['step_s'] * 1e3:6.2f} ms  prefill {r['prefill_s'] * 1e3:7.2f} ms")
    for pt in profile.points:
        print(f"{pt.model}: decode {pt.decode_base_s * 1e3:.2f} ms + {pt.decode_per_seq_s * 1e6:.1f} us/seq, "
              f"prefill +{pt.prefill_base_s * 1e3:.2f} ms + {pt.prefill_per_token_s * 1e6:.2f} us/token")
    print(f"attention {profile.attention_bytes_per_s / 1e9:.2f} GB/s; device {profile.device}")
    profile.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
