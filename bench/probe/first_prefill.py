"""Probe: what the first long prefill of a freshly built engine costs (after its kernel warm-up), then the next ones. python bench/probe/first_prefill.py"""
import asyncio, logging, sys, time
sys.path.insert(0, "bench"); sys.path.insert(0, "bench/probe"); sys.path.insert(0, ".")
import services.gpu_agent.engine.engine as em
em.STEP_LOG = True
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
for n in ("kvcached",): logging.getLogger(n).setLevel(logging.WARNING)
from decode_throughput import build_engine, first_token_s, model_folder, prompt_of_length
async def main():
    for model in ("llama-3.2-1b",):
        t = time.perf_counter()
        engine = build_engine(model_folder(model), "auto", "cuda", 1, 3072, 1)
        print("built in", time.perf_counter() - t, flush=True)
        engine._scheduler.step_tokens = 2048
        for n in (1536, 1400, 1536, 3000):
            p = prompt_of_length(engine, n)
            ms = 1e3 * await first_token_s(engine, p, f"first-{n}")
            print(f"PROMPT {n}: {ms:.1f} ms", flush=True)
        engine.stop()
if __name__ == "__main__":
    asyncio.run(main())
