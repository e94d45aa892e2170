"""The SGLang driver (services/gpu_agent/sglang) on the CPU: its command line
and environment, its parsing of SGLang's documented formats (stream events,
errors, metrics, kvcached's segment), and its life cycle against
fake_sglang_server.py, a real process that is a stand-in for SGLang (which
cannot run here). The last test runs real SGLang where it imports and a GPU
is present (skipped here)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import struct
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from services.common.model_size import estimate_weight_bytes
from services.gpu_agent.engine.errors import EngineError, EngineInactiveError, InvalidRequestError
from services.gpu_agent.engine.request import GenerationRequest
from services.gpu_agent.sglang.client import DONE, ChunkDecoder, StreamFormatError, parse_sse_line
from services.gpu_agent.sglang.driver import DriverOptions, SGLangEngine, SGLangStartError
from services.gpu_agent.sglang.kvcached_limit import KvcachedLimit, KvcachedSegment, KvcachedSegmentError
from services.gpu_agent.sglang.launch import SGLangLaunchConfig, build_command, build_env, resolve_port
from services.gpu_agent.sglang.metrics import MetricsFormatError, parse_prometheus_text, parse_sglang_metrics
from services.gpu_agent.sglang.model_info import ModelInfoError, read_model_info
from services.gpu_agent.workers.errors import WorkerLostError

ROOT = Path(__file__).resolve().parent.parent
FAKE_SERVER = Path(__file__).with_name("fake_sglang_server.py")
MiB = 1 << 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from prism.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("sglang-model") / "tiny-llama", arch="llama")


# ---- command line and environment ---------------------------------------------


def test_command_line_carries_the_spec():
    config = SGLangLaunchConfig(
        name="llama-8b",
        model_path="/models/llama",
        gpu_ids=(2, 3),
        tp_size=2,
        port=31000,
        load_format="safetensors",
        dtype="bfloat16",
        seed=7,
        mem_fraction_static=0.5,
        extra_args=("--disable-radix-cache",),
    )
    argv = build_command(config)
    assert argv[:3] == [sys.executable, "-m", "sglang.launch_server"]
    pairs = dict(zip(argv[3::1], argv[4::1]))
    assert pairs["--model-path"] == "/models/llama"
    assert pairs["--served-model-name"] == "llama-8b"
    assert pairs["--port"] == "31000" and pairs["--host"] == "127.0.0.1"
    assert pairs["--tp-size"] == "2"
    assert pairs["--load-format"] == "safetensors" and pairs["--dtype"] == "bfloat16"
    assert pairs["--random-seed"] == "7" and pairs["--mem-fraction-static"] == "0.5"
    for flag in (
        "--enable-metrics",
        "--enable-memory-saver",
        "--enable-weights-cpu-backup",
        "--incremental-streaming-output",
    ):
        assert flag in argv
    assert argv[-1] == "--disable-radix-cache"
    # kvcached sizes the KV pool: no memory fraction unless asked for.
    assert "--mem-fraction-static" not in build_command(replace(config, mem_fraction_static=None))
    bare = build_command(replace(config, enable_memory_saver=False, incremental_streaming=False, enable_metrics=False))
    assert not {
        "--enable-memory-saver",
        "--enable-weights-cpu-backup",
        "--incremental-streaming-output",
        "--enable-metrics",
    } & set(bare)
    stand_in = build_command(replace(config, launch_command=("python3", "fake.py")))
    assert stand_in[:2] == ["python3", "fake.py"] and stand_in[2:] == argv[3:]
    # SGLang 0.5.15's --dtype choices are auto/half/float16/bfloat16/float/float32: our aliases are translated.
    bf16 = build_command(replace(config, dtype="bf16"))
    assert bf16[bf16.index("--dtype") + 1] == "bfloat16"
    assert "--context-length" not in argv and "--enable-deterministic-inference" not in argv
    pinned = build_command(replace(config, max_context=2048, deterministic_inference=True))
    assert pinned[pinned.index("--context-length") + 1] == "2048" and "--enable-deterministic-inference" in pinned


def test_environment_enables_kvcached_per_engine():
    base = {"PATH": "/usr/bin", "KVCACHED_IPC_NAME": "someone-elses", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    a = SGLangLaunchConfig(name="llama/8b", model_path="/m", gpu_ids=(2, 3), tp_size=2, port=31000)
    b = replace(a, name="qwen", gpu_ids=(2,), tp_size=1, port=31001)
    env_a, env_b = build_env(a, base), build_env(b, base)
    assert env_a["ENABLE_KVCACHED"] == "true" and env_a["KVCACHED_AUTOPATCH"] == "1"
    assert env_a["CUDA_VISIBLE_DEVICES"] == "2,3" and env_b["CUDA_VISIBLE_DEVICES"] == "2"
    assert env_a["KVCACHED_IPC_NAME"] == "prism_llama-8b_31000"  # sanitized as kvcached would, and distinct
    assert env_a["KVCACHED_IPC_NAME"] != env_b["KVCACHED_IPC_NAME"]
    assert env_a["PATH"] == "/usr/bin" and base["KVCACHED_IPC_NAME"] == "someone-elses"
    off = build_env(replace(a, kvcached=False), {**base, "ENABLE_KVCACHED": "true"})
    assert off["ENABLE_KVCACHED"] == "false" and "KVCACHED_IPC_NAME" not in off
    long = SGLangLaunchConfig(name="x" * 100, model_path="/m", port=40000)
    assert len(long.kvcached_ipc_name) <= 64 and long.kvcached_ipc_name.endswith("_40000")
    assert build_env(replace(a, extra_env=(("KVCACHED_PAGE_SIZE_MB", "4"),)), base)["KVCACHED_PAGE_SIZE_MB"] == "4"
    # kvcached's own headroom is off (the agent's reserve is the headroom), unless the operator set one.
    assert env_a["KVCACHED_GPU_UTILIZATION"] == "1.0"
    assert build_env(a, {**base, "KVCACHED_GPU_UTILIZATION": "0.9"})["KVCACHED_GPU_UTILIZATION"] == "0.9"


def test_launch_config_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="tp_size 2 needs 2"):
        SGLangLaunchConfig(name="m", model_path="/m", gpu_ids=(0,), tp_size=2)
    with pytest.raises(ValueError, match="silently"):
        SGLangLaunchConfig(name="m", model_path="/m", ipc_name="has space")
    with pytest.raises(ValueError, match="mem_fraction_static"):
        SGLangLaunchConfig(name="m", model_path="/m", mem_fraction_static=1.5)
    with pytest.raises(ValueError, match="not one SGLang takes"):  # its argument parser would exit at start-up
        SGLangLaunchConfig(name="m", model_path="/m", dtype="float8_e4m3fn")
    with pytest.raises(ValueError, match="resolve the port"):
        build_command(SGLangLaunchConfig(name="m", model_path="/m"))
    assert resolve_port(SGLangLaunchConfig(name="m", model_path="/m")).port > 0


def test_model_info_from_config(model_dir):
    info = read_model_info(model_dir)
    # tiny llama: 2 layers, 2 KV heads, head_dim 64 / 4 = 16; bf16 unless its config says otherwise.
    assert (info.num_layers, info.num_kv_heads, info.head_dim) == (2, 2, 16)
    assert info.kv_bytes_per_token == 2 * 2 * 2 * 16 * info.dtype_bytes
    # Over 4 TP ranks SGLang replicates the 2 KV heads: one per rank, 4 in all.
    assert info.kv_bytes_per_token_over(2) == info.kv_bytes_per_token
    assert info.kv_bytes_per_token_over(4) == 2 * info.kv_bytes_per_token
    assert info.max_context == 256 and info.weight_bytes > 0


def test_model_info_counts_dummy_weights_by_their_parameters():
    """A bench config served with --load-format dummy has no weight files; SGLang makes its weights up in
    the run dtype, so they count as the parameters do (Llama-3.2-1B: 1.24 B parameters, 2.47 GB in bf16)."""
    folder = ROOT / "bench" / "configs" / "llama-3.2-1b"
    info = read_model_info(folder, "bfloat16", "dummy")
    assert info.weight_bytes == estimate_weight_bytes(str(folder), "bfloat16")
    assert 2.4e9 < info.weight_bytes < 2.6e9
    assert read_model_info(folder, "float32", "dummy").weight_bytes == 2 * info.weight_bytes


def test_model_info_reads_config_as_sglang_does(tmp_path):
    """SGLang 0.5.15's dtype and context length rules (configs/model_config.py,
    utils/hf_transformers/common.py) on hand-written configs."""
    import json

    def info(**config):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        base = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}
        (folder / "config.json").write_text(json.dumps({**base, **config}))
        return read_model_info(folder)

    assert info(torch_dtype="float32").dtype_bytes == 2  # auto runs float32 checkpoints in float16
    assert info(dtype="float32", model_type="gemma2").dtype_bytes == 2  # (bfloat16 for Gemma)
    assert info().dtype_bytes == 2  # no dtype: float32, so float16
    assert read_model_info(tmp_path / "0", dtype="float32").dtype_bytes == 4  # asked for explicitly
    assert info(max_position_embeddings=4096).max_context == 4096
    assert info(seq_length=1024, max_position_embeddings=4096).max_context == 1024  # SGLang's key order
    assert info().max_context == 2048  # SGLang's default
    assert info(max_position_embeddings=4096, rope_scaling={"rope_type": "linear", "factor": 2.0}).max_context == 8192
    for rope in (
        {"rope_type": "yarn", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0},
        {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 4096},
    ):
        assert info(max_position_embeddings=4096, rope_scaling=rope).max_context == 4096
    with pytest.raises(ModelInfoError, match="MLA"):
        info(kv_lora_rank=512)


# ---- SGLang's formats -----------------------------------------------------------


def test_generate_payload():
    """The /generate body: GenerateReqInput's rid, input_ids, stream and
    sampling_params (SamplingParams' max_new_tokens, temperature, top_p,
    stop, ignore_eos, sampling_seed) in SGLang 0.5.15. Its sampling_seed is
    used only under --enable-deterministic-inference, so only then sent."""
    from types import SimpleNamespace

    def payload(deterministic: bool) -> dict:
        config = SGLangLaunchConfig(name="m", model_path="/m", deterministic_inference=deterministic)
        engine = SimpleNamespace(config=config, options=DriverOptions(), name="m", _seed_warned=False)
        return SGLangEngine._payload(engine, _request(seed=3, stop=["\n"], top_p=0.9, max_tokens=4), [1, 2], "r", 4)

    body = payload(False)
    assert body == {
        "rid": "r",
        "input_ids": [1, 2],
        "sampling_params": {"max_new_tokens": 4, "temperature": 0, "top_p": 0.9, "ignore_eos": False, "stop": ["\n"]},
    }
    assert payload(True)["sampling_params"]["sampling_seed"] == 3


def _event(text, ids, finish=None, completion=None, prompt=5):
    return {
        "text": text,
        "output_ids": ids,
        "meta_info": {
            "id": "r",
            "finish_reason": finish,
            "prompt_tokens": prompt,
            "completion_tokens": completion if completion is not None else len(ids),
            "cached_tokens": 0,
        },
    }


def test_request_ids_are_prefix_free():
    """SGLang aborts by id prefix: no request id the driver makes may start
    another's, whatever the callers' ids, nor look like a health check."""
    from services.gpu_agent.sglang.driver import sglang_rid

    rids = [
        sglang_rid(n, request_id)
        for n, request_id in enumerate(["a", "a", "ab", "", "1", "1-a", "HEALTH_CHECK_x"] * 3, start=1)
    ]
    assert len(set(rids)) == len(rids)
    assert not [(a, b) for a in rids for b in rids if a != b and b.startswith(a)]
    assert not any(r.startswith("HEALTH_CHECK") for r in rids)


def test_sse_lines():
    assert parse_sse_line('data: {"text": "a"}\n') == {"text": "a"}
    assert parse_sse_line("data: [DONE]") is DONE
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None
    with pytest.raises(StreamFormatError, match="not JSON"):
        parse_sse_line("data: {broken")


def test_incremental_stream_decoding():
    d = ChunkDecoder(incremental=True)
    first = d.feed(_event(" Hello", [11], completion=1))
    assert (first.text, first.token_ids, first.finish_reason, first.prompt_tokens) == (" Hello", [11], None, 5)
    assert d.feed(_event("", [], completion=1)) is None  # nothing new
    last = d.feed(_event(" world", [12], {"type": "length", "length": 2}, completion=2))
    assert (last.text, last.token_ids, last.finish_reason, last.completion_tokens) == (" world", [12], "length", 2)
    stop = ChunkDecoder(True).feed(_event(".", [13], {"type": "stop", "matched": 2}))
    assert stop.finish_reason == "stop"


def test_cumulative_stream_decoding():
    d = ChunkDecoder(incremental=False)
    assert d.feed(_event(" Hello", [11])).text == " Hello"
    out = d.feed(_event(" Hello world", [11, 12]))
    assert (out.text, out.token_ids) == (" world", [12])
    deferred = d.feed(_event(None, [11, 12, 13]))  # newer SGLang leaves intermediate text out
    assert (deferred.text, deferred.token_ids) == ("", [13])
    end = d.feed(_event(" Hello world!", [11, 12, 13], {"type": "stop", "matched": 2}))  # an EOS token: kept
    assert (end.text, end.token_ids, end.finish_reason) == ("!", [], "stop")


def test_stop_strings_are_not_output():
    """SGLang 0.5.15 cuts the finished text at the stop string and sends only
    what lies past what it had sent (detokenizer_manager.py), so '\\n\\n' made
    of two '\\n' tokens arrives as '\\n', then '' with finish_reason {type:
    stop, matched: '\\n\\n'}; a one-token stop string arrives whole if the
    window held it. Neither is output."""
    for incremental in (True, False):
        for last in ("", "\n"):  # SGLang cut it / the final window still had it
            d = ChunkDecoder(incremental, stop=["\n\n", "END"])
            pieces, texts = [" a", "\n", last], [" a", " a\n", " a\n" + last]
            outs = []
            for i in range(3):
                ids = [1, 2, 2][: i + 1]
                finish = {"type": "stop", "matched": "\n\n"} if i == 2 else None
                outs.append(
                    d.feed(
                        _event(
                            pieces[i] if incremental else texts[i],
                            ids[-1:] if incremental else ids,
                            finish,
                            completion=i + 1,
                        )
                    )
                )
            assert [o.text for o in outs] == [" a", "", ""] and outs[-1].finish_reason == "stop"
            assert [t for o in outs for t in o.token_ids] == [1, 2, 2]  # ids as SGLang sends them
    # Held text that turns out not to start a stop string comes out with the next event.
    d = ChunkDecoder(True, stop=["END"])
    assert d.feed(_event(" E", [5])).text == " "
    assert d.feed(_event("x", [6])).text == "Ex"
    assert d.feed(_event(" EN", [7], {"type": "length", "length": 3})).text == " EN"  # at the end, all of it
    assert ChunkDecoder(True, stop=["END"]).feed(_event("xEND", [1], {"type": "stop", "matched": "END"})).text == "x"
    d = ChunkDecoder(True, stop=["END"])
    assert (
        d.feed(_event("E", [5])).text == ""
        and d.feed(_event("x", [6], {"type": "stop", "matched": "END"})).text == "Ex"
    )  # held text that is not where the stop began


def test_stream_errors_map_to_engine_errors():
    # SGLang 0.5.15's in-stream refusal (http_server.py, generate_request's stream_results).
    with pytest.raises(InvalidRequestError, match="longer than the model's context"):
        ChunkDecoder(True).feed(
            {
                "error": {
                    "message": "The input (300 tokens) is longer than the model's context",
                    "type": "invalid_request_error",
                    "code": 400,
                    "retryable": False,
                }
            }
        )
    with pytest.raises(InvalidRequestError, match="longer than the model's context"):  # older: message only
        ChunkDecoder(True).feed({"error": {"message": "The input (300 tokens) is longer than the model's context"}})
    # Aborted while waiting (tokenizer_manager.py, _handle_abort_req): no prompt_tokens, the text so far.
    waiting = {
        "text": "so far",
        "output_ids": [7],
        "meta_info": {
            "id": "1-r",
            "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
            "weight_version": "default",
            "e2e_latency": 0.1,
            "completion_tokens": 1,
        },
    }
    with pytest.raises(EngineError, match="Abort in waiting queue") as waited:
        ChunkDecoder(True).feed(waiting)
    assert not isinstance(waited.value, InvalidRequestError)
    with pytest.raises(InvalidRequestError, match="bad stop"):
        ChunkDecoder(True).feed(
            _event("", [], {"type": "abort", "message": "bad stop", "status_code": 400, "err_type": "BadRequestError"})
        )
    with pytest.raises(EngineError, match="Abort in waiting queue") as info:
        ChunkDecoder(True).feed(
            _event(
                "", [], {"type": "abort", "message": "Abort in waiting queue", "status_code": None, "err_type": None}
            )
        )
    assert not isinstance(info.value, InvalidRequestError)
    with pytest.raises(StreamFormatError, match="meta_info"):
        ChunkDecoder(True).feed({"text": "x"})
    with pytest.raises(StreamFormatError, match="unknown finish_reason type"):
        ChunkDecoder(True).feed(_event("", [1], {"type": "exploded"}))


METRICS = """# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="m",tp_rank="0",pp_rank="0",moe_ep_rank="0"} 3.0
sglang:num_running_reqs{engine_type="unified",model_name="m",tp_rank="1",pp_rank="0",moe_ep_rank="0"} 3.0
sglang:num_queue_reqs{model_name="m",tp_rank="0",dp_rank="0",priority=""} 2.0
sglang:num_queue_reqs{model_name="m",tp_rank="0",dp_rank="0",priority="1"} 2.0
sglang:num_queue_reqs{model_name="m",tp_rank="0",dp_rank="1"} 1.0
sglang:num_used_tokens{model_name="m",tp_rank="0"} 1536.0 1700000000000
sglang:token_usage{model_name="m",tp_rank="0"} 0.25
sglang:gen_throughput{model_name="a \\"quoted\\", name",tp_rank="0"} NaN
"""


def test_metrics_parsing():
    samples = parse_prometheus_text(METRICS)
    assert len(samples) == 8
    assert samples[-1].labels["model_name"] == 'a "quoted", name'
    m = parse_sglang_metrics(METRICS)
    # TP rank 1 is not counted twice, nor is a per-priority breakdown.
    assert (m.running_requests, m.queued_requests, m.used_tokens) == (3, 3, 1536)
    assert m.token_usage == 0.25 and m.available_tokens is None and m.free_tokens is None
    kv = parse_sglang_metrics(
        METRICS + 'sglang:kv_available_tokens{tp_rank="0"} 4096\nsglang:kv_evictable_tokens{tp_rank="0"} 1000\n'
    )
    assert (kv.available_tokens, kv.evictable_tokens, kv.free_tokens) == (4096, 1000, 5096)
    with pytest.raises(MetricsFormatError, match="line 1"):
        parse_prometheus_text("sglang:num_running_reqs{model_name=m} 1")


def _segment(tmp_path, limit, used=0, prealloc=0) -> KvcachedSegment:
    (tmp_path / "seg").write_bytes(struct.pack("=qqq", limit, used, prealloc))
    return KvcachedSegment("seg", tmp_path)


def test_kvcached_limit_revisions(tmp_path):
    bundle = 8 * MiB  # per rank
    segment = _segment(tmp_path, 1024 * MiB)
    limit = KvcachedLimit(segment, bundle, tp_size=2)
    state = limit.attach(100 * MiB)
    assert limit.capacity_bytes == 2048 * MiB and limit.bundle_bytes == 16 * MiB
    assert (state.status, state.limit_bytes, state.effective_limit_bytes, state.revision) == (
        "applied",
        100 * MiB,
        96 * MiB,
        0,
    )
    assert segment.read().limit_bytes == 48 * MiB  # what each rank's kvcached reads: half, in whole bundles
    state = limit.set(200 * MiB)  # no revision: the next
    assert (state.status, state.revision, state.effective_limit_bytes) == ("applied", 1, 192 * MiB)
    assert segment.read().limit_bytes == 96 * MiB
    assert limit.set(300 * MiB, revision=5).revision == 5
    stale = limit.set(1 * MiB, revision=4)
    assert (stale.status, stale.limit_bytes, stale.revision) == ("stale", 300 * MiB, 5)
    assert limit.set(64 * MiB, revision=5).status == "conflict"
    assert limit.set(300 * MiB, revision=5).status == "applied"  # the same again: a no-op
    assert segment.read().limit_bytes == 144 * MiB
    assert limit.set(10 * 4096 * MiB, revision=6).effective_limit_bytes == 2048 * MiB  # capped at the capacity
    # The engine holds 40 MiB per rank in use: a limit under 80 MiB waits for frees.
    raw = tmp_path / "seg"
    current = struct.unpack("=qqq", raw.read_bytes())[0]
    raw.write_bytes(struct.pack("=qqq", current, 40 * MiB, 8 * MiB))
    deferred = limit.set(32 * MiB, revision=7)
    assert (deferred.status, deferred.mapped_bytes) == ("deferred", 96 * MiB)
    assert struct.unpack("=qqq", raw.read_bytes()) == (16 * MiB, 40 * MiB, 8 * MiB)  # usage fields untouched
    raw.write_bytes(struct.pack("=qqq", 16 * MiB, 0, 0))
    assert limit.state().status == "applied"
    # kvcached 0.1.6 ignores a limit of 0 (KVCacheManager._alloc applies positive targets only): a zero limit is
    # written as 1 byte per K/V buffer of each layer (8 MiB bundle / 2 MiB pages = 4), which it reads as 0 pages.
    zero = limit.set(0, revision=9)
    assert (zero.limit_bytes, zero.effective_limit_bytes) == (0, 0) and limit.segment.read().limit_bytes == 4
    assert limit.set(1 * MiB, revision=10).effective_limit_bytes == 0 and limit.segment.read().limit_bytes == 4
    with pytest.raises(InvalidRequestError):
        limit.set(-1)
    raw.unlink()
    with pytest.raises(KvcachedSegmentError, match="gone"):
        limit.set(64 * MiB, revision=11)
    assert KvcachedLimit(KvcachedSegment("absent", tmp_path), bundle).attach(0) is None
    # No initial limit: the whole capacity, as kvcached wrote it.
    whole = KvcachedLimit(_segment(tmp_path, 1024 * MiB), bundle).attach(0)
    assert (whole.limit_bytes, whole.effective_limit_bytes) == (1024 * MiB, 1024 * MiB)


# ---- life cycle against the stand-in -------------------------------------------


def _config(model_dir: Path, **kw) -> SGLangLaunchConfig:
    return SGLangLaunchConfig(
        name="tiny-llama",
        model_path=str(model_dir),
        gpu_ids=(0,),
        launch_command=(sys.executable, str(FAKE_SERVER)),
        **kw,
    )


def _options(tmp_path: Path, **kw) -> DriverOptions:
    return DriverOptions(
        log_dir=tmp_path / "logs", shm_dir=tmp_path, stats_interval_s=0.05, health_poll_s=0.1, stop_timeout_s=5.0, **kw
    )


@pytest.fixture()
def fake_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_SGLANG_SHM_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_SGLANG_TOKEN_INTERVAL_S", "0.01")
    return monkeypatch


async def _fake_state(engine: SGLangEngine) -> dict:
    async with httpx.AsyncClient(base_url=engine.config.base_url, timeout=5) as c:
        return (await c.get("/fake_state")).json()


async def _eventually(predicate, timeout_s=5.0, what="condition"):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _request(rid="req", **kw) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt=kw.pop("prompt", "Hello there"), temperature=0, **kw)


async def test_lifecycle_against_the_stand_in(model_dir, tmp_path, fake_env):
    fake_env.setenv("FAKE_SGLANG_RESUME_S", "0.2")
    engine = await SGLangEngine.start(_config(model_dir), memory_limit_bytes=64 * MiB, options=_options(tmp_path))
    pgid = engine.process.pgid
    segment = tmp_path / engine.config.kvcached_ipc_name
    try:
        state = await _fake_state(engine)
        assert state["env"]["ENABLE_KVCACHED"] == "true" and state["env"]["CUDA_VISIBLE_DEVICES"] == "0"
        assert state["env"]["KVCACHED_IPC_NAME"] == engine.config.kvcached_ipc_name
        assert "--incremental-streaming-output" in state["argv"] and "--enable-memory-saver" in state["argv"]
        assert engine.sglang_version == "0.5.15"  # from /v1/loads
        bundle = engine.kv_bundle_bytes  # 2 MiB x 2 (K, V) x 2 layers
        assert bundle == 8 * MiB and state["limit"] == 64 * MiB  # the initial limit reached the server
        assert engine.stats().memory_limit_bytes == 64 * MiB and engine.stats().memory_limit_revision == 0

        # Generation streams the stand-in's tokens, with counts.
        outs = [o async for o in engine.generate(_request(max_tokens=5))]
        assert [o.finish_reason for o in outs] == [None] * 4 + ["length"]
        assert all(len(o.token_ids) == 1 and o.text.startswith(" t") for o in outs)
        prompt_len = engine.count_prompt_tokens(_request())
        assert outs[-1].completion_tokens == 5 and outs[-1].prompt_tokens == prompt_len

        # A request SGLang refuses: in the stream (bad sampling parameters), or HTTP 400 (a malformed body).
        with pytest.raises(InvalidRequestError, match="temperature must be a non-negative"):
            [o async for o in engine.generate(replace(_request(), temperature=-1.0))]
        with pytest.raises(InvalidRequestError, match="validation error"):
            async with engine.client.generate({"input_ids": [1], "sampling_params": 5}):
                pass
        with pytest.raises(InvalidRequestError, match="at most"):
            engine.count_prompt_tokens(_request(prompt="word " * 400))

        # Closing a stream early aborts the request in SGLang.
        fake_env.setenv("FAKE_SGLANG_TOKEN_INTERVAL_S", "0.05")
        stream = engine.generate(_request("cancelled", max_tokens=200))
        await anext(stream)
        await anext(stream)
        assert engine.stats().running_requests == 1 and engine.stats().kv_demand_tokens > prompt_len
        await stream.aclose()

        async def aborted():
            s = await _fake_state(engine)
            return any(r.endswith("-cancelled") for r in s["aborted"] + s["disconnected"]) and not s["running"]

        await _eventually(aborted, what="the stand-in to abort the closed stream")
        assert engine.stats().running_requests == 0

        # Limits through kvcached's segment, with revisions; usage comes back in stats.
        state = await engine.set_memory_limit(128 * MiB)
        assert (state.status, state.revision, state.effective_limit_bytes) == ("applied", 1, 128 * MiB)
        assert (await _fake_state(engine))["limit"] == 128 * MiB
        assert (await engine.set_memory_limit(8 * MiB, revision=1)).status == "conflict"
        assert (await engine.set_memory_limit(8 * MiB, revision=0)).status == "stale"
        held = engine.generate(_request("held", max_tokens=400))
        await anext(held)
        await _eventually(lambda: asyncio.sleep(0, engine.stats().kv_used_bytes > 0), what="KV usage in stats")
        shrink = await engine.set_memory_limit(0, revision=3)
        assert shrink.status == "deferred" and engine.stats().memory_limit_status == "deferred"

        # Deactivation ends what is in flight and releases the memory.
        deactivating = asyncio.create_task(engine.deactivate())
        with pytest.raises(EngineInactiveError, match="deactivated"):
            async for _ in held:
                pass
        await asyncio.wait_for(deactivating, 10)
        assert engine.last_deactivate_s is not None
        state = await _fake_state(engine)
        assert state["released"] and any(r.endswith("-held") for r in state["aborted"])
        # Nothing is held any more: the deferred shrink applies (at the driver's next stats refresh).
        await _eventually(
            lambda: asyncio.sleep(0, engine.stats().memory_limit_status == "applied"),
            what="the deferred shrink to apply",
        )
        with pytest.raises(EngineInactiveError):
            await anext(engine.generate(_request()))
        await engine.deactivate()  # again: nothing to do

        health_before = (await _fake_state(engine))["health_calls"]
        timing = await engine.activate()
        assert timing is not None and 0.2 <= timing.copy_s < 5 and timing.nbytes == engine.weight_bytes
        assert await engine.activate() is None
        state = await _fake_state(engine)
        assert [c["path"] for c in state["memory_calls"]] == ["/release_memory_occupation", "/resume_memory_occupation"]
        # Ready when a one-token request after the resume finishes, not by SGLang's /health (a second at least).
        assert state["generated"][-1].endswith("-activation-check") and state["health_calls"] == health_before
        assert timing.ready_s < 1.0
        outs = [o async for o in engine.generate(_request(max_tokens=3))]
        assert outs[-1].finish_reason == "length"
        metrics = await engine.refresh_stats()
        assert metrics.running_requests == 0 and engine.sglang_metrics() is not None
    finally:
        await engine.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert not segment.exists()
    with pytest.raises(EngineError, match="stopped"):
        await anext(engine.generate(_request()))


async def test_stop_ends_streams_in_flight(model_dir, tmp_path, fake_env):
    fake_env.setenv("FAKE_SGLANG_TOKEN_INTERVAL_S", "0.05")
    engine = await SGLangEngine.start(_config(model_dir), memory_limit_bytes=64 * MiB, options=_options(tmp_path))
    stream = engine.generate(_request(max_tokens=1000))
    await anext(stream)
    await engine.stop()
    with pytest.raises(EngineError, match="stopped"):
        async for _ in stream:
            pass
    assert not engine.process.group_alive()


async def test_server_exiting_at_start_up_fails_with_its_log(model_dir, tmp_path, fake_env):
    fake_env.setenv("FAKE_SGLANG_MODE", "exit")
    with pytest.raises(SGLangStartError) as info:
        await SGLangEngine.start(_config(model_dir), options=_options(tmp_path))
    message = str(info.value)
    assert "exited during start-up" in message and "exit code 3" in message
    assert "CUDA out of memory (simulated by the stand-in)" in message


async def test_server_never_healthy_times_out(model_dir, tmp_path, fake_env):
    fake_env.setenv("FAKE_SGLANG_MODE", "unhealthy")
    config = resolve_port(_config(model_dir))
    with pytest.raises(SGLangStartError, match=r"did not become healthy within 1.5s") as info:
        await SGLangEngine.start(config, options=_options(tmp_path, start_timeout_s=1.5))
    assert "fake SGLang stand-in" in str(info.value)  # the log tail
    async with httpx.AsyncClient() as c:  # it was stopped
        with pytest.raises(httpx.ConnectError):
            await c.get(f"{config.base_url}/health", timeout=2)


async def test_missing_kvcached_segment_fails_clearly(model_dir, tmp_path, fake_env):
    fake_env.setenv("FAKE_SGLANG_MODE", "no_kvcached")
    with pytest.raises(SGLangStartError, match="kvcached is not active"):
        await SGLangEngine.start(_config(model_dir), options=_options(tmp_path, segment_timeout_s=1.0))


async def test_without_kvcached_the_limit_is_refused(model_dir, tmp_path, fake_env):
    engine = await SGLangEngine.start(_config(model_dir, kvcached=False), options=_options(tmp_path))
    try:
        assert (await _fake_state(engine))["env"]["ENABLE_KVCACHED"] == "false"
        with pytest.raises(EngineError, match="without kvcached"):
            await engine.set_memory_limit(64 * MiB)
        await _eventually(lambda: asyncio.sleep(0, engine.sglang_metrics() is not None), what="a metrics scrape")
        assert engine.stats().kv_free_tokens == 100000  # sglang:kv_available_tokens + kv_evictable_tokens
    finally:
        await engine.stop()


async def test_activation_that_cannot_generate_fails_clearly(model_dir, tmp_path, fake_env):
    fake_env.setenv("FAKE_SGLANG_MODE", "stuck_after_resume")
    engine = await SGLangEngine.start(_config(model_dir), memory_limit_bytes=64 * MiB, options=_options(tmp_path))
    try:
        await engine.deactivate()
        with pytest.raises(EngineError, match="failed a one-token request after resuming its memory"):
            await engine.activate()
        with pytest.raises(EngineInactiveError):  # not taken for active
            await anext(engine.generate(_request()))
    finally:
        await engine.stop()


async def test_server_death_fails_requests_and_is_reported(model_dir, tmp_path, fake_env):
    fake_env.setenv("FAKE_SGLANG_TOKEN_INTERVAL_S", "0.05")
    engine = await SGLangEngine.start(_config(model_dir), memory_limit_bytes=64 * MiB, options=_options(tmp_path))
    lost: list[WorkerLostError] = []

    async def on_lost(error):
        lost.append(error)

    engine.on_lost(on_lost)
    try:
        stream = engine.generate(_request(max_tokens=1000))
        await anext(stream)
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(WorkerLostError, match="killed by SIGKILL") as info:
            async for _ in stream:
                pass
        assert "fake SGLang stand-in" in str(info.value)
        await _eventually(lambda: asyncio.sleep(0, len(lost) == 1), what="on_lost")
        with pytest.raises(WorkerLostError):
            await engine.set_memory_limit(1)
        assert not (tmp_path / engine.config.kvcached_ipc_name).exists()
    finally:
        await engine.stop()


# ---- real SGLang, where it can run ----------------------------------------------


def _sglang_runs_here() -> bool:
    try:
        import sglang  # noqa: F401
        import torch
    except Exception:
        return False
    return torch.cuda.is_available() and bool(os.environ.get("PRISM_SGLANG_TEST_MODEL"))


@pytest.mark.skipif(
    not _sglang_runs_here(),
    reason="needs `import sglang`, a CUDA GPU and PRISM_SGLANG_TEST_MODEL (a local model folder)",
)
@pytest.mark.timeout(1800)
async def test_real_sglang_with_kvcached(tmp_path):
    # PRISM_SGLANG_TEST_LOAD_FORMAT=dummy serves a config with made-up weights; PRISM_SGLANG_TEST_ARGS adds
    # launch arguments (bench/sglang_gpu.sh: "--attention-backend triton", its bundle has no FA3).
    config = SGLangLaunchConfig(
        name="sglang-it",
        model_path=os.environ["PRISM_SGLANG_TEST_MODEL"],
        load_format=os.environ.get("PRISM_SGLANG_TEST_LOAD_FORMAT", "auto"),
        extra_args=tuple(os.environ.get("PRISM_SGLANG_TEST_ARGS", "").split()),
    )
    engine = await SGLangEngine.start(config, memory_limit_bytes=1 << 30, options=DriverOptions(log_dir=tmp_path))
    try:
        outs = [o async for o in engine.generate(_request(max_tokens=8))]
        assert outs[-1].finish_reason in ("length", "stop") and sum(len(o.token_ids) for o in outs) >= 1
        state = await engine.set_memory_limit(2 << 30)
        assert state.status == "applied" and state.revision == 1
        await engine.deactivate()
        timing = await engine.activate()
        print(
            f"SGLang deactivate {engine.last_deactivate_s:.3f}s, activate {timing.total_s:.3f}s "
            f"(resume {timing.copy_s:.3f}s, first token {timing.ready_s:.3f}s)"
        )
        outs = [o async for o in engine.generate(_request(max_tokens=8))]
        assert outs[-1].finish_reason in ("length", "stop")
    finally:
        await engine.stop()


async def test_the_engine_manager_runs_sglang_engines(model_dir, tmp_path, fake_env):
    from services.gpu_agent.devices import Device
    from services.gpu_agent.engine_manager import EngineManager, EngineSpec, PlacementError

    states: list[str] = []

    async def publish(managed) -> None:
        states.append(managed.state)

    cpu = [Device(0, "cpu", "cpu", 1 << 30)]
    manager = EngineManager(
        cpu, publish, sglang_launch_command=(sys.executable, str(FAKE_SERVER)), sglang_options=_options(tmp_path)
    )
    managed = await manager.load(
        EngineSpec(name="tiny-llama", path=str(model_dir), engine="sglang"),
        (0,),
        activate=True,
        memory_limit_bytes=64 * MiB,
    )
    try:
        assert managed.state == "active" and isinstance(managed.engine, SGLangEngine), managed.error
        assert managed.spec.engine == "sglang" and states[-1] == "active"
        outs = [o async for o in managed.engine.generate(_request(max_tokens=3))]
        assert outs[-1].completion_tokens == 3 and outs[-1].finish_reason == "length"
        await manager.set_memory_limit("tiny-llama", 32 * MiB, 0)
        assert managed.engine.stats().memory_limit_bytes == 32 * MiB
        pgid = managed.engine.process.pgid
    finally:
        await manager.stop_all()
    assert states[-1] == "unloaded"
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # the server's whole process group is gone
    # auto on a CPU device is the built-in engine, even where SGLang could start.
    auto = await manager.load(
        EngineSpec(name="auto-llama", path=str(model_dir)), (0,), activate=True, memory_limit_bytes=0
    )
    try:
        assert auto.state == "active" and auto.spec.engine == "torch" and not isinstance(auto.engine, SGLangEngine)
    finally:
        await manager.stop_all()
    # Without the package (and no stand-in), asking for sglang is refused clearly.
    plain = EngineManager(cpu, publish)
    if importlib.util.find_spec("sglang") is None:
        with pytest.raises(PlacementError, match="needs the sglang package"):
            await plain.load(
                EngineSpec(name="x", path=str(model_dir), engine="sglang"), (0,), activate=True, memory_limit_bytes=0
            )


def test_engine_auto_runs_sglang_only_for_a_verified_release_on_a_gpu():
    from services.gpu_agent.engine_manager import auto_engine

    assert auto_engine("cuda", "0.5.17")[0] == "sglang"
    kind, why = auto_engine("cuda", "0.5.20")
    assert kind == "torch" and "verified with 0.5.17" in why and "engine: sglang runs it anyway" in why
    assert auto_engine("cuda", "") == ("torch", "SGLang is not installed")
    assert auto_engine("cpu", "0.5.17")[0] == "torch"
    assert auto_engine("cuda", "", stand_in=True)[0] == "sglang"
