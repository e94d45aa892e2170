"""Decode throughput of dummy-weight Llama engines, beside Hugging Face
transformers and beside the memory-bandwidth floor.

On one GPU (--device), for each model (the Llama-3.2-1B and Llama-3.1-8B
configs in bench/configs, or any model folder) and each batch size:
  prism   the built-in engine with dummy bf16 weights, once per attention
          path (--attention: the Triton decode kernel, the torch path). The
          batch is sent as that many concurrent requests of --prompt-tokens
          prompt tokens each (a prompt text whose encoding has exactly that
          length), greedy, --new-tokens new tokens, EOS ignored. The step
          budget fits the whole batch's prefill, so every request gets its
          first token from the same step; the decode step time is the time
          from the moment every request has its first token to the moment all
          have finished, over the new_tokens - 1 steps in between, as the
          client sees it (asyncio stream). One untimed round of the same
          shape goes first (Triton JIT, allocator, cuBLAS heuristics).
  hf      transformers' LlamaForCausalLM built from the same config.json,
          random bf16 weights on the device, model.generate on random prompt
          ids of the same shape, greedy, min_new_tokens = max_new_tokens = N.
          Step time = (t(N new tokens) - t(1 new token)) / (N - 1), which
          takes the prefill out; after one untimed generate of N tokens.
  floor   the bytes a decode step must read over the HBM bandwidth: the
          weights (less the input embedding table where it is not tied to
          the output head: a step reads only its batch's rows of it) plus
          the KV cache at the average context of the timed steps, prompt +
          new/2 tokens per sequence. The bandwidth is measured in the same
          run: a 2 GiB device-to-device copy (read + write), CUDA events,
          median of several.
tokens/s is batch / step time.

    python bench/decode_throughput.py [--models llama-3.2-1b,llama-3.1-8b] [--batches 1,8,32,128]
        [--attention triton,torch] [--prompt-tokens 128] [--new-tokens 128] [--no-hf]
        [--json bench/results/decode_throughput.json]

CPU smoke test on a tiny model folder (e.g. from prism.tiny_models.write_tiny_model):

    python bench/decode_throughput.py --device cpu --models /tmp/tiny-llama --batches 1,4 \\
        --new-tokens 8 --prompt-tokens 8 --attention torch --no-hf

Targets (issue): at batch 1 a decode step within 3x its floor; at batch 32 at
least 2x the tokens/s of transformers."""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import string
import time
from pathlib import Path

import common  # first: puts the project on sys.path
import torch
from common import environment, table, write_json

from services.common.step_costs import DEFAULT_STEP_TOKENS
from services.gpu_agent.engine import Engine, EngineError, GenerationRequest
from services.gpu_agent.engine.model_config import load_model_config

MODELS = ["llama-3.2-1b", "llama-3.1-8b"]
BATCHES = [1, 8, 32, 128]
ATTENTION = ["triton", "torch"]
DTYPE = torch.bfloat16
GIB = 1 << 30
FLOOR_TARGET = 3.0  # batch 1: step time at most this many floors
HF_TARGET = 2.0  # batch 32: at least this many times transformers' tokens/s


# ---- memory bandwidth ------------------------------------------------------------


def copy_bandwidth(device: torch.device, repeats: int = 10) -> float:
    """Median bytes/s moved by one large device-to-device copy (each byte read
    once and written once, so 2 x its size). On the CPU a smaller copy, timed
    with the wall clock, so the smoke test has a number to divide by."""
    nbytes = 2 * GIB if device.type == "cuda" else 256 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):  # warm-up: first-touch page mapping, clocks up
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    free_device_memory(device)
    return 2 * nbytes / statistics.median(times)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- models ------------------------------------------------------------------------


def model_folder(name: str) -> Path:
    """A config name under bench/configs, or a path to a model folder."""
    configs = common.ROOT / "bench" / "configs" / name
    if configs.is_dir():
        return configs
    path = Path(name).expanduser()
    if (path / "config.json").exists():
        return path.resolve()
    raise SystemExit(f"{name!r} is neither a config in bench/configs nor a folder with a config.json")


def step_weight_bytes(folder: Path, weight_bytes: int) -> int:
    """The weights a decode step reads: all but an untied input embedding table,
    of which the step reads only its batch's rows."""
    config = load_model_config(folder)
    if config.tie_word_embeddings:
        return weight_bytes
    return weight_bytes - config.vocab_size * config.hidden_size * DTYPE.itemsize


def floor_s(
    weight_bytes: int, kv_bytes_per_token: int, batch: int, prompt_tokens: int, new_tokens: int, bandwidth: float
) -> float:
    # The timed steps attend over prompt + 1 ... prompt + new - 1 tokens: on average prompt + new / 2.
    average_context = prompt_tokens + new_tokens / 2
    return (weight_bytes + batch * average_context * kv_bytes_per_token) / bandwidth


# ---- prism engine --------------------------------------------------------------------


def prompt_of_length(engine: Engine, n: int) -> str:
    """A prompt text that the engine encodes (BOS included, if the tokenizer adds
    one) to exactly n tokens: the shortest prefix of a long random text that
    reaches n, found by bisection (token counts grow with the prefix)."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(2 * n + 16)]
    text = " ".join(words)

    def count(length: int) -> int:
        return len(engine.tokenize_prompt(GenerationRequest("probe", prompt=text[:length])))

    if count(len(text)) < n:
        raise RuntimeError(f"could not build a prompt of {n} tokens")
    low, high = 1, len(text)
    while low < high:
        mid = (low + high) // 2
        if count(mid) >= n:
            high = mid
        else:
            low = mid + 1
    for length in range(low, min(low + 8, len(text)) + 1):  # a merge can make the count skip n by one
        if count(length) == n:
            return text[:length]
    raise RuntimeError(f"no prefix of the prompt text encodes to exactly {n} tokens")


def build_engine(
    folder: Path,
    attention: str,
    device: str,
    max_batch: int,
    prompt_tokens: int,
    new_tokens: int,
    kv_pool: str = "auto",
) -> Engine:
    config = load_model_config(folder)
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * DTYPE.itemsize
    # Twice what the largest batch holds, plus a margin for the pool's whole-page
    # rounding: no request may wait or be preempted for KV memory.
    kv_needed = max_batch * (prompt_tokens + new_tokens) * kv_bytes_per_token
    memory_limit = 2 * kv_needed + 256 * (1 << 20)
    # The whole batch's prefill in one step: every request then starts decoding
    # in the same step, and the timed window holds exactly new_tokens - 1 steps.
    step_tokens = max(DEFAULT_STEP_TOKENS, max_batch * prompt_tokens)
    engine = Engine(
        folder,
        name=folder.name,
        load_format="dummy",
        dtype="bfloat16",
        device=device,
        memory_limit_bytes=memory_limit,
        attention=attention,
        step_tokens=step_tokens,
        kv_pool=kv_pool,
    )
    engine.start()
    return engine


async def first_token_s(engine: Engine, prompt: str, tag: str) -> float:
    """Seconds from submitting one greedy request of `prompt` (max_tokens 1) to its first token."""
    start = time.perf_counter()
    async for out in engine.generate(
        GenerationRequest(tag, prompt=prompt, max_tokens=1, temperature=0.0, ignore_eos=True)
    ):
        if out.token_ids:
            return time.perf_counter() - start
    raise RuntimeError(f"{tag}: no token")


async def decode_round(engine: Engine, prompt: str, prompt_tokens: int, batch: int, new_tokens: int, tag: str) -> dict:
    """batch concurrent requests; from the times their first and last tokens
    arrived, the decode step time."""
    start = time.perf_counter()

    async def one(index: int) -> dict:
        req = GenerationRequest(
            f"{tag}-{index}", prompt=prompt, max_tokens=new_tokens, temperature=0.0, ignore_eos=True
        )
        seen = {"first": None, "tokens": 0, "prompt_tokens": None}
        async for out in engine.generate(req):
            if seen["first"] is None and out.token_ids:
                seen["first"] = time.perf_counter()
            seen["tokens"] += len(out.token_ids)
            seen["prompt_tokens"] = out.prompt_tokens
        seen["last"] = time.perf_counter()
        return seen

    requests = await asyncio.gather(*(one(i) for i in range(batch)))
    # Shapes as asked, or the window below would not hold new_tokens - 1 steps of this batch.
    for key, wanted in (("tokens", new_tokens), ("prompt_tokens", prompt_tokens)):
        if any(r[key] != wanted for r in requests):
            raise RuntimeError(f"{tag}: wanted {key} {wanted}, got {sorted({r[key] for r in requests})}")
    firsts = [r["first"] for r in requests]
    all_started, all_done = max(firsts), max(r["last"] for r in requests)
    return {
        "step_s": (all_done - all_started) / (new_tokens - 1),
        "prefill_s": all_started - start,
        # Near zero when every request got its first token from the same step;
        # about a step or more means the prefill was split and the window is off.
        "first_token_spread_s": all_started - min(firsts),
    }


def measure_prism(
    folder: Path, attention: str, args, batches: list[int], bandwidth: float, skipped: list[dict], kv_pool: str = "auto"
) -> list[dict]:
    """One engine, every batch; a batch that fails (e.g. out of memory: the
    engine fails the requests) is recorded in skipped and the rest go on."""
    engine = build_engine(folder, attention, args.device, max(batches), args.prompt_tokens, args.new_tokens, kv_pool)
    rows = []
    try:
        prompt = prompt_of_length(engine, args.prompt_tokens)
        weight_bytes = step_weight_bytes(folder, engine.weight_bytes)
        pool = type(engine._batcher.pool).__name__  # which KV pool served: KvcachedPool or PagePool
        for batch in batches:
            tag = f"{folder.name}-{attention}-b{batch}"
            try:
                asyncio.run(decode_round(engine, prompt, args.prompt_tokens, batch, args.new_tokens, tag + "-warmup"))
                runner = engine._runner.graph_runner  # CUDA graphs: how much of a step the GPU takes
                if runner is not None:
                    runner.replay_gpu_ms.clear()
                timed = asyncio.run(decode_round(engine, prompt, args.prompt_tokens, batch, args.new_tokens, tag))
            except EngineError as exc:
                print(f"  prism {tag}: failed: {exc}", flush=True)
                skipped.append({"model": folder.name, "attention": attention, "batch": batch, "reason": str(exc)})
                continue
            floor = floor_s(
                weight_bytes, engine.kv_bytes_per_token, batch, args.prompt_tokens, args.new_tokens, bandwidth
            )
            rows.append(
                {
                    "model": folder.name,
                    "batch": batch,
                    "attention": attention,
                    "kv_pool": pool,
                    "graphs": "on" if engine.serving_path.cuda_graphs else "off",
                    "step_ms": timed["step_s"] * 1e3,
                    "tokens_per_s": batch / timed["step_s"],
                    "floor_ms": floor * 1e3,
                    "x_floor": timed["step_s"] / floor,
                    "prefill_ms": timed["prefill_s"] * 1e3,
                    "first_token_spread_ms": timed["first_token_spread_s"] * 1e3,
                    "weight_gb": engine.weight_bytes / 1e9,
                    "step_weight_gb": weight_bytes / 1e9,
                    "graph_gpu_ms": (
                        statistics.median(runner.replay_gpu_ms) if runner is not None and runner.replay_gpu_ms else None
                    ),
                }
            )
            print(
                f"  prism {tag}: step {rows[-1]['step_ms']:.2f} ms, {rows[-1]['tokens_per_s']:.0f} tok/s, "
                f"{rows[-1]['x_floor']:.2f}x floor",
                flush=True,
            )
    finally:
        engine.stop()
        del engine
        free_device_memory(torch.device(args.device))
    return rows


# ---- Hugging Face transformers ----------------------------------------------------------


def import_transformers():
    """The module, or None with the reason printed (it is not a project dependency)."""
    try:
        import transformers
    except ImportError as exc:
        print(f"transformers column skipped: cannot import transformers ({exc})")
        return None
    transformers.logging.set_verbosity_error()  # generate() warns about unused generation flags
    return transformers


def build_hf_model(transformers, folder: Path, device: torch.device):
    """LlamaForCausalLM from config.json, random bf16 weights made on the device."""
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device(device):
        try:
            model = transformers.LlamaForCausalLM._from_config(config, dtype=DTYPE)  # transformers >= 4.56
        except TypeError:
            model = transformers.LlamaForCausalLM._from_config(config, torch_dtype=DTYPE)
    if next(model.parameters()).dtype != DTYPE:  # a version that ignored the keyword
        model = model.to(DTYPE)
    return model.to(device).eval()


def hf_generate_s(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int) -> float:
    device = input_ids.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    sync()
    elapsed = time.perf_counter() - start
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - input_ids.shape[1]} tokens, not {new_tokens}")
    return elapsed


def measure_hf(transformers, folder: Path, args, batches: list[int]) -> dict[int, dict | None]:
    """Per batch: step_ms, tokens_per_s and the attention implementation, or None where it ran
    out of memory."""
    device = torch.device(args.device)
    model = build_hf_model(transformers, folder, device)
    results: dict[int, dict | None] = {}
    out_of_memory_at = None
    try:
        generator = torch.Generator(device="cpu").manual_seed(0)
        for batch in batches:
            if out_of_memory_at is not None and batch > out_of_memory_at:
                results[batch] = None  # a smaller batch already ran out of memory
                continue
            # Ids from 1 on: 0 is the pad id given to generate.
            input_ids = torch.randint(1, model.config.vocab_size, (batch, args.prompt_tokens), generator=generator).to(
                device
            )
            attention_mask = torch.ones_like(input_ids)
            try:
                hf_generate_s(model, input_ids, attention_mask, args.new_tokens)  # warm-up
                one = hf_generate_s(model, input_ids, attention_mask, 1)
                full = hf_generate_s(model, input_ids, attention_mask, args.new_tokens)
            except torch.cuda.OutOfMemoryError:
                print(f"  hf {folder.name}-b{batch}: out of memory", flush=True)
                out_of_memory_at, results[batch] = batch, None
                del input_ids, attention_mask
                free_device_memory(device)
                continue
            step = (full - one) / (args.new_tokens - 1)
            results[batch] = {
                "step_ms": step * 1e3,
                "tokens_per_s": batch / step,
                "attention": getattr(model.config, "_attn_implementation", None),
            }
            print(f"  hf {folder.name}-b{batch}: step {step * 1e3:.2f} ms, {batch / step:.0f} tok/s", flush=True)
    finally:
        del model
        free_device_memory(device)
    return results


# ---- report ------------------------------------------------------------------------------


def verdicts(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        if row["batch"] == 1:
            ratio = row["x_floor"]
            out.append(
                {
                    "target": f"batch 1 step within {FLOOR_TARGET:g}x floor",
                    "model": row["model"],
                    "attention": row["attention"],
                    "ratio": ratio,
                    "pass": ratio <= FLOOR_TARGET,
                }
            )
        if row["batch"] == 32:
            ratio = row.get("speedup_vs_hf")
            out.append(
                {
                    "target": f"batch 32 >= {HF_TARGET:g}x transformers",
                    "model": row["model"],
                    "attention": row["attention"],
                    "ratio": ratio,
                    "pass": None if ratio is None else ratio >= HF_TARGET,
                }
            )
    return out


def verdict_line(v: dict) -> str:
    if v["ratio"] is None:
        return f"{v['target']}: {v['model']} ({v['attention']}) n/a (no transformers number)"
    return f"{v['target']}: {v['model']} ({v['attention']}) {v['ratio']:.2f}x {'PASS' if v['pass'] else 'FAIL'}"


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        type=name_list,
        default=MODELS,
        help="comma-separated config names in bench/configs or model folders",
    )
    parser.add_argument("--batches", type=int_list, default=BATCHES)
    parser.add_argument("--attention", type=name_list, default=ATTENTION, help="triton, torch and/or auto")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers column")
    parser.add_argument(
        "--kv-pools",
        type=name_list,
        default=["auto"],
        help="auto, kvcached and/or pages: an engine per pool (pages beside kvcached: the page "
        "pool's step against kvcached's, x kvcached)",
    )
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (the step time is over new_tokens - 1 steps)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here (use --device cpu for a smoke test)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    batches = sorted(set(args.batches))
    transformers = None if args.no_hf else import_transformers()

    bandwidth = copy_bandwidth(device)
    print(f"{device.type} memory bandwidth (copy): {bandwidth / 1e9:.1f} GB/s", flush=True)

    rows, hf_rows, skipped = [], {}, []
    for name in args.models:
        folder = model_folder(name)
        for attention in args.attention:
            for kv_pool in args.kv_pools:
                print(f"{folder.name}, attention {attention}, KV pool {kv_pool}:", flush=True)
                try:
                    rows.extend(measure_prism(folder, attention, args, batches, bandwidth, skipped, kv_pool))
                except EngineError as exc:  # the engine cannot be built: e.g. triton on the CPU
                    print(f"  skipped: {exc}", flush=True)
                    skipped.append(
                        {"model": folder.name, "attention": attention, "kv_pool": kv_pool, "reason": str(exc)}
                    )
        if transformers is not None:
            print(f"{folder.name}, transformers {transformers.__version__}:", flush=True)
            hf_rows[folder.name] = measure_hf(transformers, folder, args, batches)
    kvcached = {(r["model"], r["batch"], r["attention"]): r["step_ms"] for r in rows if r["kv_pool"] == "KvcachedPool"}
    for row in rows:
        same = kvcached.get((row["model"], row["batch"], row["attention"]))
        row["x_kvcached"] = row["step_ms"] / same if same and row["kv_pool"] != "KvcachedPool" else None
        hf = (hf_rows.get(row["model"]) or {}).get(row["batch"])
        row["hf_step_ms"] = hf["step_ms"] if hf else None
        row["hf_tokens_per_s"] = hf["tokens_per_s"] if hf else None
        row["speedup_vs_hf"] = row["tokens_per_s"] / hf["tokens_per_s"] if hf else None
        row["hf_attention"] = hf["attention"] if hf else None

    print()
    print(
        table(
            rows,
            [
                ("model", "model", ""),
                ("batch", "batch", "d"),
                ("attention", "attention", ""),
                ("kv_pool", "KV pool", ""),
                ("graphs", "graphs", ""),
                ("step_ms", "step ms", ".2f"),
                ("x_kvcached", "x kvcached", ".2f"),
                ("tokens_per_s", "tokens/s", ".0f"),
                ("floor_ms", "floor ms", ".2f"),
                ("graph_gpu_ms", "graph GPU ms", ".2f"),
                ("x_floor", "x floor", ".2f"),
                ("hf_step_ms", "HF step ms", ".2f"),
                ("hf_tokens_per_s", "HF tokens/s", ".0f"),
                ("speedup_vs_hf", "speed-up vs HF", ".2f"),
            ],
        )
    )
    targets = verdicts(rows)
    if targets:
        print()
    for v in targets:
        print(verdict_line(v))
    write_json(
        args.json,
        {
            "benchmark": "decode_throughput",
            "environment": environment(),
            "settings": {
                "models": args.models,
                "batches": batches,
                "attention": args.attention,
                "kv_pools": args.kv_pools,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "device": args.device,
                "transformers": transformers.__version__ if transformers is not None else None,
            },
            "hbm_gbps": bandwidth / 1e9,
            "results": rows,
            "skipped": skipped,
            "targets": targets,
        },
    )


if __name__ == "__main__":
    main()
