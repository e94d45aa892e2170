"""Prefix caching on multi-turn chat: the built-in engine with its prefix cache
on and off, side by side on one device, on the same sessions.

The workload (seeded): --system-prompts system prompts of --system-tokens
tokens each (a range; 1-2k by default), shared by all sessions; sessions
arrive open-loop (Poisson, --rates sessions/s, for --duration-s), each of
4-8 turns: a turn's prompt is the system prompt, the conversation so far and
a new user message (40-120 tokens); its reply is 32-128 tokens (EOS ignored).
The next turn is sent when the reply has ended, after a think time
(exponential, mean --think-s). With dummy weights a reply has no text, so
the conversation carries a placeholder of the reply's length in its place:
the next turn's prompt repeats the earlier ones exactly up to it.

Each rate point starts with the cache empty (the engine is switched off and
on). Per mode and rate: requests, TTFT p50/p99, TPOT p50/p99, SLO attainment
(TTFT <= --ttft-slo-s and TPOT <= --tpot-slo-s), the prompt tokens found in
the cache; and per mode the highest rate at which attainment holds 90%
(interpolated between points). Targets (issue 26): TTFT p50 at least 3x lower
with the cache, and the highest rate at 90% at least 1.5x higher.

    python bench/prefix_cache.py --device cuda --model llama-3.2-1b --rates 1,2,4,6 \\
        --json bench/results/prefix_cache-h100.json

CPU dry run on the tiny model (its context is 256 tokens):

    python bench/prefix_cache.py --device cpu --rates 0.5 --duration-s 4 --system-tokens 60,80 \\
        --user-tokens 5,10 --reply-tokens 4,8 --turns 2,3"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import dummy_model_folder, environment, table, write_json  # noqa: E402

from services.gpu_agent.engine import Engine, GenerationRequest  # noqa: E402

WORDS = (
    "cache prefix token model answer question system prompt user reply memory limit page block engine "
    "serve request stream batch step"
).split()


@dataclass(frozen=True)
class Turn:
    user: str  # the new user message
    reply_tokens: int


@dataclass(frozen=True)
class Session:
    start_s: float
    system: str
    turns: tuple[Turn, ...]


# Tokens per word of WORDS with the model's tokenizer (measured once the first engine is up).
TOKENS_PER_WORD = [1.0]


def words(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of text."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, round(tokens / TOKENS_PER_WORD[0]))))


def measure_tokens_per_word(engine: Engine) -> float:
    sample = " ".join(WORDS * 4)
    return len(engine.tokenize_prompt(GenerationRequest("probe", prompt=sample))) / (4 * len(WORDS))


def sessions_for(rate: float, args: argparse.Namespace, seed: int) -> list[Session]:
    rng = random.Random(seed)
    systems = [words(rng, rng.randint(*args.system_tokens)) for _ in range(args.system_prompts)]
    out, t = [], rng.expovariate(rate)
    while t < args.duration_s:
        turns = tuple(
            Turn(words(rng, rng.randint(*args.user_tokens)), rng.randint(*args.reply_tokens))
            for _ in range(rng.randint(*args.turns))
        )
        out.append(Session(t, rng.choice(systems), turns))
        t += rng.expovariate(rate)
    return out


async def run_session(
    engine: Engine, session: Session, start: float, think_s: float, seed: int, results: list[dict]
) -> None:
    rng = random.Random(seed)
    await asyncio.sleep(max(0.0, start + session.start_s - time.perf_counter()))
    history = session.system
    for i, turn in enumerate(session.turns):
        prompt = f"{history}\nuser: {turn.user}\nassistant:"
        sent = time.perf_counter()
        first = last = None
        out = None
        async for out in engine.generate(
            GenerationRequest(
                f"s{seed}-t{i}", prompt=prompt, max_tokens=turn.reply_tokens, temperature=0.0, ignore_eos=True
            )
        ):
            now = time.perf_counter()
            if out.token_ids:
                first = first or now
                last = now
        n = out.completion_tokens if out else 0
        results.append(
            {
                "ttft_s": (first or time.perf_counter()) - sent,
                "tpot_s": (last - first) / (n - 1) if first and n > 1 else None,
                "prompt_tokens": out.prompt_tokens if out else 0,
                "cached_tokens": out.cached_tokens if out else 0,
            }
        )
        # The reply, as the next turn repeats it: dummy weights give no text, so a placeholder as long.
        history = f"{prompt} {words(rng, turn.reply_tokens)}"
        await asyncio.sleep(rng.expovariate(1 / think_s) if think_s > 0 else 0)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


async def run_point(engine: Engine, rate: float, args: argparse.Namespace) -> dict:
    engine.deactivate()  # the cache starts empty at every point
    engine.activate()
    sessions = sessions_for(rate, args, args.seed)
    results: list[dict] = []
    start = time.perf_counter()
    await asyncio.gather(
        *(run_session(engine, s, start, args.think_s, args.seed * 100_003 + i, results) for i, s in enumerate(sessions))
    )
    ttfts = [r["ttft_s"] for r in results]
    tpots = [r["tpot_s"] for r in results if r["tpot_s"] is not None]
    attained = sum(r["ttft_s"] <= args.ttft_slo_s and (r["tpot_s"] or 0) <= args.tpot_slo_s for r in results)
    prompt = sum(r["prompt_tokens"] for r in results)
    return {
        "rate": rate,
        "sessions": len(sessions),
        "requests": len(results),
        "wall_s": round(time.perf_counter() - start, 1),
        "attainment": attained / len(results) if results else None,
        "ttft_p50_s": quantile(ttfts, 0.5),
        "ttft_p99_s": quantile(ttfts, 0.99),
        "tpot_p50_s": quantile(tpots, 0.5),
        "tpot_p99_s": quantile(tpots, 0.99),
        "cached_fraction": sum(r["cached_tokens"] for r in results) / prompt if prompt else 0.0,
    }


def rate_at(points: list[dict], target: float) -> float | None:
    """The highest rate with attainment >= target, interpolated to where the curve crosses it after
    the last point that holds it; None if none does."""
    best = None
    for lower, upper in zip(points, points[1:] + [None]):
        if lower["attainment"] is None or lower["attainment"] < target:
            continue
        best = lower["rate"]
        if upper is not None and upper["attainment"] is not None and upper["attainment"] < target:
            span = lower["attainment"] - upper["attainment"]
            best = lower["rate"] + (upper["rate"] - lower["rate"]) * (lower["attainment"] - target) / span
    return best


def model_folder(args: argparse.Namespace, scratch: Path) -> Path:
    if args.device == "cpu" and args.model == "tiny":
        from prism.tiny_models import write_tiny_model

        return write_tiny_model(scratch / "tiny-llama")
    if Path(args.model).is_dir():
        return Path(args.model)
    return dummy_model_folder(args.model, scratch)


def span(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    return int(low), int(high or low)


def start_engine(folder: Path, mode: str, args: argparse.Namespace) -> Engine:
    engine = Engine(
        folder,
        load_format="dummy" if args.device != "cpu" else "auto",
        dtype=args.dtype,
        device=args.device,
        memory_limit_bytes=int(args.kv_gb * 2**30) if args.kv_gb else None,
        prefix_caching=mode == "on",
    )
    engine.start()
    return engine


async def main_async(args: argparse.Namespace) -> dict:
    """Both engines stay up (one each for cache off and on); at each rate, off then on, so a run cut
    short by its time limit still has both modes side by side up to where it stopped. A mode whose
    attainment has fallen below --stop-below is not run at higher rates (it is past its 90% point:
    its queue would only make the run longer)."""
    scratch = Path(tempfile.mkdtemp(prefix="prefix-cache-"))
    folder = model_folder(args, scratch)
    engines = {mode: start_engine(folder, mode, args) for mode in ("off", "on")}
    TOKENS_PER_WORD[0] = measure_tokens_per_word(engines["off"])
    runs: dict = {mode: {"points": [], "rate_at_90": None, "stopped_after": None} for mode in engines}
    try:
        for rate in args.rates:
            for mode, engine in engines.items():
                run = runs[mode]
                if run["stopped_after"] is not None:
                    continue
                point = await run_point(engine, rate, args)
                run["points"].append(point)
                run["rate_at_90"] = rate_at(run["points"], 0.9)
                if point["attainment"] is not None and point["attainment"] < args.stop_below:
                    run["stopped_after"] = rate
                print(
                    f"  cache {mode}, {rate:g} sessions/s: {point['requests']} requests in {point['wall_s']} s, "
                    f"attainment {100 * point['attainment']:.1f}%, TTFT p50 {point['ttft_p50_s']:.3f} s, "
                    f"{100 * point['cached_fraction']:.0f}% of prompt tokens cached",
                    file=sys.stderr,
                    flush=True,
                )
                write_result(args, runs)
    finally:
        for engine in engines.values():
            engine.stop()
    return runs


def ratios_of(runs: dict) -> dict:
    on, off = runs["on"], runs["off"]
    by_rate = {p["rate"]: p for p in on["points"]}
    return {
        "ttft_p50_off_over_on": {
            p["rate"]: p["ttft_p50_s"] / by_rate[p["rate"]]["ttft_p50_s"]
            for p in off["points"]
            if by_rate.get(p["rate"], {}).get("ttft_p50_s")
        },
        "rate_at_90_on_over_off": (
            on["rate_at_90"] / off["rate_at_90"] if on["rate_at_90"] and off["rate_at_90"] else None
        ),
    }


def write_result(args: argparse.Namespace, runs: dict) -> None:
    write_json(
        args.json,
        {
            "benchmark": "prefix_cache",
            "environment": environment(),
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "runs": runs,
            "ratios": ratios_of(runs),
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="llama-3.2-1b", help="a bench config name, a model folder, or tiny (CPU)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--rates", type=lambda s: [float(x) for x in s.split(",")], default=[1, 2, 4, 6], help="sessions per second"
    )
    ap.add_argument("--duration-s", type=float, default=30.0, help="sessions start within this span")
    ap.add_argument("--system-prompts", type=int, default=8)
    ap.add_argument("--system-tokens", type=span, default=(1000, 2000))
    ap.add_argument("--user-tokens", type=span, default=(40, 120))
    ap.add_argument("--reply-tokens", type=span, default=(32, 128))
    ap.add_argument("--turns", type=span, default=(4, 8))
    ap.add_argument("--think-s", type=float, default=1.0)
    ap.add_argument("--ttft-slo-s", type=float, default=1.0)
    ap.add_argument("--tpot-slo-s", type=float, default=0.1)
    ap.add_argument("--kv-gb", type=float, default=0.0, help="the engines' KV limit (0: the engine's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--stop-below",
        type=float,
        default=0.5,
        help="a mode whose attainment falls below this is not run at higher rates",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.device == "cpu" and args.model == "llama-3.2-1b":
        args.model = "tiny"
    runs = asyncio.run(main_async(args))
    rows = [{"mode": mode, **p} for mode, run in runs.items() for p in run["points"]]
    on, off = runs["on"], runs["off"]
    ratios = ratios_of(runs)
    print(
        table(
            rows,
            [
                ("mode", "cache", "s"),
                ("rate", "sessions/s", "g"),
                ("requests", "requests", "d"),
                ("attainment", "SLO att.", ".1%"),
                ("ttft_p50_s", "TTFT p50 s", ".3f"),
                ("ttft_p99_s", "TTFT p99 s", ".3f"),
                ("tpot_p50_s", "TPOT p50 s", ".4f"),
                ("tpot_p99_s", "TPOT p99 s", ".4f"),
                ("cached_fraction", "cached", ".0%"),
            ],
        )
    )
    print(
        "\nTTFT p50, off / on, per rate: "
        + ", ".join(f"{rate:g}: {r:.1f}x" for rate, r in ratios["ttft_p50_off_over_on"].items())
        + " (target >= 3x)"
    )
    print(
        f"highest rate at 90% attainment: off {off['rate_at_90']}, on {on['rate_at_90']} sessions/s"
        + (f" ({ratios['rate_at_90_on_over_off']:.2f}x; target >= 1.5x)" if ratios["rate_at_90_on_over_off"] else "")
    )


if __name__ == "__main__":
    main()
