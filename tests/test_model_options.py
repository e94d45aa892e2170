"""The per-model options `max_context` and `deterministic_inference`
from the placement config to SGLang's command line: parsed and checked
in the config, kept in the scheduler's etcd model record, sent in the agent's
ModelSpec, turned into an EngineSpec by the agent's LoadModel, and given by
the engine manager to SGLang as --context-length and
--enable-deterministic-inference. The engine runs as
tests/fake_sglang_server.py, a real process that is a stand-in for SGLang
(which cannot run here), as in tests/test_sglang_driver.py. The built-in
engine honours max_context too, inline and in a worker process."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from prism_client.v1 import agent_pb2
from services.common import placement_config as pc
from services.common import records
from services.common.etcd import connect
from services.gpu_agent.agent_service import AgentService
from services.gpu_agent.devices import Device
from services.gpu_agent.engine_manager import EngineManager
from services.gpu_agent.sglang.driver import DriverOptions, SGLangEngine
from services.scheduler.scheduler_service import SchedulerService
from services.scheduler.server import PlacementLoop, model_spec

FAKE_SERVER = Path(__file__).with_name("fake_sglang_server.py")
MiB = 1 << 20


def _entry(name: str = "m", **options) -> dict:
    return {"model_name": name, "model_path": f"/models/{name}", "init_placements": [{"gpu_ids": [0]}], **options}


# ---- the placement config -------------------------------------------------------


def test_config_takes_both_options_and_defaults_them():
    config = pc.parse([_entry("pinned", max_context=8192, deterministic_inference=True), _entry("plain")])
    pinned, plain = config.model("pinned"), config.model("plain")
    assert pinned.max_context == 8192 and pinned.deterministic_inference is True
    assert plain.max_context == 0 and plain.deterministic_inference is False
    # An explicit null is the same as leaving it out.
    assert pc.parse([_entry(max_context=None)]).models[0].max_context == 0


def test_the_documented_yaml_example_loads(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(
        "- model_name: llama-8b\n"
        "  model_path: /models/llama-8b\n"
        "  max_context: 8192\n"
        "  deterministic_inference: true\n"
        "  init_placements: [{gpu_ids: [0], on: true}]\n"
    )
    model = pc.load(path).models[0]
    assert (model.max_context, model.deterministic_inference) == (8192, True)


@pytest.mark.parametrize("value", [0, -1, -4096, 1.5, 2048.0, "2048", True, [2048]])
def test_a_bad_max_context_is_refused_naming_the_field(value):
    with pytest.raises(pc.ConfigError) as exc:
        pc.parse([_entry("ok"), _entry("bad", max_context=value)], source="models.json")
    message = f"must be an integer >= 1 (tokens; leave it out for the model's own context length), got {value!r}"
    assert exc.value.errors == [f"[1].max_context: {message}"]
    assert "models.json" in str(exc.value)


@pytest.mark.parametrize("value", [1, 0, "true", "yes", None, [True]])
def test_a_non_bool_deterministic_inference_is_refused_naming_the_field(value):
    with pytest.raises(pc.ConfigError) as exc:
        pc.parse([_entry(deterministic_inference=value)])
    assert exc.value.errors == [f"[0].deterministic_inference: must be true or false, got {value!r}"]


def test_every_bad_option_is_reported_at_once():
    with pytest.raises(pc.ConfigError) as exc:
        pc.parse([_entry("a", max_context=0, deterministic_inference="no"), _entry("b", max_context=-5)])
    assert [e.split(":")[0] for e in exc.value.errors] == [
        "[0].max_context",
        "[0].deterministic_inference",
        "[1].max_context",
    ]


# ---- the model record in etcd ---------------------------------------------------


def test_the_model_record_round_trips_both_options():
    rec = records.ModelRecord(name="m", path="/m", max_context=4096, deterministic_inference=True)
    back = records.ModelRecord.from_json(rec.to_json())
    assert back == rec and back.max_context == 4096 and back.deterministic_inference is True
    # A record written before the options existed still parses, with their defaults.
    old = json.dumps(
        {
            "name": "m",
            "path": "/m",
            "tp_size": 1,
            "load_format": "auto",
            "engine": "auto",
            "dtype": "auto",
            "seed": 0,
            "ttft_ms": 0.0,
        }
    )
    legacy = records.ModelRecord.from_json(old)
    assert legacy.max_context == 0 and legacy.deterministic_inference is False


async def test_the_scheduler_publishes_both_options_in_the_model_records(etcd_server):
    config = pc.parse([_entry("pinned", max_context=2048, deterministic_inference=True), _entry("plain")])
    etcd = await connect(etcd_server.endpoint)
    try:
        loop = PlacementLoop(config, etcd, "static", SchedulerService(asyncio.Event()), asyncio.Event(), 1.0, 1.0)
        await loop.publish_registry()
        stored = {
            kv.key.decode(): records.ModelRecord.from_json(kv.value)
            for kv in await etcd.get_prefix(records.MODELS.encode())
        }
    finally:
        await etcd.close()
    pinned, plain = stored[records.MODELS + "pinned"], stored[records.MODELS + "plain"]
    assert (pinned.max_context, pinned.deterministic_inference) == (2048, True)
    assert (plain.max_context, plain.deterministic_inference) == (0, False)


# ---- the agent's ModelSpec ----------------------------------------------------


def test_the_scheduler_puts_both_options_in_the_agents_model_spec():
    config = pc.parse([_entry("pinned", max_context=2048, deterministic_inference=True), _entry("plain")])
    spec = model_spec(config.model("pinned"))
    assert isinstance(spec, agent_pb2.ModelSpec)
    assert spec.max_context == 2048 and spec.deterministic_inference is True
    # Through the wire format too.
    wire = agent_pb2.ModelSpec.FromString(spec.SerializeToString())
    assert (wire.max_context, wire.deterministic_inference) == (2048, True)
    plain = model_spec(config.model("plain"))
    assert plain.max_context == 0 and plain.deterministic_inference is False


def test_the_new_fields_do_not_reuse_a_field_number():
    fields = agent_pb2.ModelSpec.DESCRIPTOR.fields_by_name
    assert fields["max_context"].number == 11 and fields["deterministic_inference"].number == 12
    assert len({f.number for f in agent_pb2.ModelSpec.DESCRIPTOR.fields}) == len(fields)
    # EngineStatus keeps its own (status) max_context.
    assert agent_pb2.EngineStatus.DESCRIPTOR.fields_by_name["max_context"].number == 10


# ---- the agent: LoadModel -> EngineManager._start_sglang -> the command line ----------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from prism.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("options-model") / "tiny-llama", arch="llama")


@pytest.fixture()
def fake_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_SGLANG_SHM_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_SGLANG_TOKEN_INTERVAL_S", "0.01")
    return monkeypatch


async def _published(managed) -> None:
    pass


async def test_load_model_hands_both_options_to_the_sglang_command_line(model_dir, tmp_path, fake_env):
    """The agent's gRPC LoadModel, given the scheduler's ModelSpec, starts the
    (stand-in) SGLang server with --context-length and
    --enable-deterministic-inference, and only the model that asked for them."""
    options = DriverOptions(
        log_dir=tmp_path / "logs", shm_dir=tmp_path, stats_interval_s=0.05, health_poll_s=0.1, stop_timeout_s=5.0
    )
    manager = EngineManager(
        [Device(0, "cpu", "cpu", 1 << 30)],
        _published,
        sglang_launch_command=(sys.executable, str(FAKE_SERVER)),
        sglang_options=options,
    )
    service = AgentService("agent-t", [], manager)
    config = pc.parse(
        [
            _entry("pinned", max_context=64, deterministic_inference=True, engine="sglang"),
            _entry("plain", engine="sglang"),
        ]
    )
    argvs = {}
    try:
        for name in ("pinned", "plain"):
            spec = model_spec(replace(config.model(name), model_path=str(model_dir)))
            status = await service.LoadModel(
                agent_pb2.LoadModelRequest(spec=spec, gpu_ids=[0], activate=True, memory_limit_bytes=64 * MiB), None
            )
            managed = manager.engines[name]
            assert status.state == agent_pb2.ENGINE_STATE_ACTIVE, managed.error
            assert isinstance(managed.engine, SGLangEngine)
            argvs[name] = managed.engine.process.argv
            cmdline = Path(f"/proc/{managed.engine.pid}/cmdline")
            if cmdline.exists():  # what the running process was really given
                assert cmdline.read_bytes().decode().split("\0")[:-1] == argvs[name]
        pinned = manager.engines["pinned"]
        assert pinned.spec.max_context == 64 and pinned.spec.deterministic_inference is True
        assert pinned.engine.max_context == 64  # the driver refuses what SGLang would
        assert manager.engines["plain"].engine.max_context > 64  # the model's own
    finally:
        await manager.stop_all()
    pinned, plain = argvs["pinned"], argvs["plain"]
    assert pinned[:2] == [sys.executable, str(FAKE_SERVER)]
    assert pinned.count("--context-length") == 1 and pinned[pinned.index("--context-length") + 1] == "64"
    assert pinned.count("--enable-deterministic-inference") == 1
    assert "--context-length" not in plain and "--enable-deterministic-inference" not in plain


# ---- the built-in engine honours max_context too ------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from prism.tiny_models import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("options") / "tiny", arch="llama"))


async def _tokens(engine, prompt: str, max_tokens: int | None = None) -> tuple[int, str | None]:
    from services.gpu_agent.engine import GenerationRequest

    outs = [
        o
        async for o in engine.generate(
            GenerationRequest("ctx", prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        )
    ]
    return outs[-1].prompt_tokens + outs[-1].completion_tokens, outs[-1].finish_reason


async def test_the_built_in_engine_serves_at_most_max_context(tiny_model):
    from services.gpu_agent.engine import Engine, EngineError, InvalidRequestError

    engine = Engine(tiny_model, max_context=40)
    engine.start()
    try:
        assert engine.max_context == 40  # the tiny model's own is 256
        total, finish = await _tokens(engine, "Hello there")  # no max_tokens: the rest of the context
        assert (total, finish) == (40, "length")
        with pytest.raises(InvalidRequestError, match="context of 40"):
            await _tokens(engine, "word " * 60)
    finally:
        engine.stop()
    assert Engine(tiny_model, max_context=10_000).max_context == 256  # never past the model's own
    with pytest.raises(EngineError, match="max_context must be at least 1"):
        Engine(tiny_model, max_context=-1)


async def test_an_engine_worker_and_the_agent_take_max_context(tiny_model):
    """Through a worker process (the agent's process isolation), and through LoadModel on an in-process agent."""
    from in_process_agent import InProcessAgent

    from services.gpu_agent.workers.remote_engine import RemoteEngine
    from services.gpu_agent.workers.worker_pool import WorkerPool

    pool = WorkerPool(["cpu"], spares_per_device=0)
    await pool.start()
    try:
        worker = await asyncio.wait_for(pool.acquire("cpu"), 120)
        engine = await asyncio.wait_for(RemoteEngine.load(worker, tiny_model, name="tiny", max_context=40), 120)
        try:
            assert engine.max_context == 40
        finally:
            await engine.stop()
    finally:
        await pool.close()
    async with InProcessAgent() as agent:
        status = await agent.stub.LoadModel(
            agent_pb2.LoadModelRequest(
                spec=agent_pb2.ModelSpec(name="m", path=tiny_model, max_context=40), gpu_ids=[0], activate=True
            ),
            timeout=120,
        )
        assert status.max_context == 40


# ---- prefix caching: on unless the config turns it off -------------------------------------


def test_prefix_caching_is_on_unless_the_config_turns_it_off():
    config = pc.parse([_entry("cached"), _entry("uncached", prefix_caching=False)])
    assert config.model("cached").prefix_caching is True and config.model("uncached").prefix_caching is False
    assert model_spec(config.model("cached")).no_prefix_caching is False
    assert model_spec(config.model("uncached")).no_prefix_caching is True
    with pytest.raises(pc.ConfigError) as exc:
        pc.parse([_entry(prefix_caching="no")])
    assert exc.value.errors == ["[0].prefix_caching: must be true or false, got 'no'"]


async def test_an_engine_worker_and_the_agent_turn_the_prefix_cache_off(tiny_model):
    """The same prompt twice: found in the cache, unless the spec turned it off (a worker process, and
    LoadModel on an in-process agent with its engine inline)."""
    from in_process_agent import InProcessAgent

    from services.gpu_agent.workers.remote_engine import RemoteEngine
    from services.gpu_agent.workers.worker_pool import WorkerPool

    prompt = "the same long prompt, twice over: " * 3

    async def queried_and_hit(engine) -> tuple[int, int]:
        for _ in range(2):
            await _tokens(engine, prompt, max_tokens=2)
        if isinstance(engine, RemoteEngine):
            await engine.refresh_stats()  # a worker's stats are otherwise refreshed in the background
        stats = engine.stats()
        return stats.prefix_cache_queried_tokens, stats.prefix_cache_hit_tokens

    pool = WorkerPool(["cpu"], spares_per_device=0)
    await pool.start()
    try:
        for off in (False, True):
            worker = await asyncio.wait_for(pool.acquire("cpu"), 120)
            engine = await asyncio.wait_for(
                RemoteEngine.load(worker, tiny_model, name="tiny", prefix_caching=not off), 120
            )
            try:
                queried, hit = await queried_and_hit(engine)
                assert (queried, hit) == (0, 0) if off else (queried > 0 and hit >= 16), (off, queried, hit)
            finally:
                await engine.stop()
    finally:
        await pool.close()
    async with InProcessAgent() as agent:
        for name, off in (("cached", False), ("uncached", True)):
            await agent.stub.LoadModel(
                agent_pb2.LoadModelRequest(
                    spec=agent_pb2.ModelSpec(name=name, path=tiny_model, no_prefix_caching=off),
                    gpu_ids=[0],
                    activate=True,
                ),
                timeout=120,
            )
        queried, hit = await queried_and_hit(agent.manager.engines["cached"].engine)
        assert queried > 0 and hit >= 16
        assert await queried_and_hit(agent.manager.engines["uncached"].engine) == (0, 0)
