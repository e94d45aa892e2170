"""The admission queue's order, on real engines and a real memory coordinator
of a CPU device whose budget the test opens one page bundle at a time: the
earliest TTFT deadline goes first across models, a request that waited past
the starvation bound goes before any deadline, a client that leaves while
waiting leaves no reservation behind. And a shedding model's request that has
no first token by its TTFT deadline, wherever it waited, is refused and leaves
its engine (started_by)."""

from __future__ import annotations

import asyncio
import time

import pytest

from prism.tiny_models import write_tiny_model
from services.gpu_agent.admission import AdmissionQueue, ShedError, started_by
from services.gpu_agent.devices import discover_devices
from services.gpu_agent.engine import GenerationRequest
from services.gpu_agent.engine.errors import CapacityError
from services.gpu_agent.engine_manager import EngineManager, EngineSpec
from services.gpu_agent.memory_coordinator import MemoryCoordinator
from services.gpu_agent.slo import ModelSlo

PROMPT_TOKENS = 10  # with DEMAND_GROWTH_TOKENS: far less than one page bundle (512 tokens)


@pytest.fixture()
async def device(tmp_path):
    devices = discover_devices("cpu", cpu_memory_gb=0.05)

    async def publish(_managed) -> None:
        return None

    manager = EngineManager(devices, publish, coordinated=True)
    path = str(write_tiny_model(tmp_path / "m", arch="llama"))
    await manager.load(EngineSpec(name="loose", path=path, slo=ModelSlo(ttft_ms=5000)), (0,), True, 0)
    await manager.load(EngineSpec(name="tight", path=path, slo=ModelSlo(ttft_ms=100)), (0,), True, 0)
    coordinator = MemoryCoordinator(devices[0], manager, reserve_bytes=0)
    yield manager, coordinator
    await manager.stop_all()


def open_budget(coordinator: MemoryCoordinator, units: int) -> None:
    """Sets the reserve so that exactly `units` page bundles are unassigned."""
    active = coordinator._active()
    unit = coordinator.unit_bytes(active)
    limits = sum(m.memory_limit_bytes for m in active)
    weights = sum(m.engine.weight_bytes for m in active)
    coordinator.reserve_bytes = coordinator.device.memory_bytes - weights - limits - units * unit


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_earliest_deadline_first_across_models_then_starving_requests_first(device):
    manager, coordinator = device
    queue = AdmissionQueue(coordinator, starvation_s=0.3)
    open_budget(coordinator, 0)  # nothing free: every request waits
    loose = asyncio.create_task(queue.admit(manager.get("loose"), PROMPT_TOKENS))
    await settle()
    tight = asyncio.create_task(queue.admit(manager.get("tight"), PROMPT_TOKENS))
    await settle()
    await queue.pump()
    assert not loose.done() and not tight.done()
    assert [t.model for t in queue.waiting] == ["loose", "tight"]

    open_budget(coordinator, 1)  # room for one: the later arrival with the earlier deadline goes first
    await queue.pump()
    await settle()
    assert tight.done() and not loose.done()
    assert manager.get("tight").memory_limit_bytes > 1  # granted at once from the unassigned budget

    # Most of what is left of tight's granted unit (512 tokens) goes to another tight request ...
    tight_fill = asyncio.create_task(queue.admit(manager.get("tight"), 250))
    await settle()
    await queue.pump()
    await settle()
    assert tight_fill.done() and not loose.done()
    await asyncio.sleep(0.35)  # `loose` has now waited past the starvation bound
    # ... so this one needs a grant too.
    tight2 = asyncio.create_task(queue.admit(manager.get("tight"), 200))
    await settle()
    open_budget(coordinator, 1)
    await queue.pump()
    await settle()
    assert loose.done() and not tight2.done()  # starving beats a tighter deadline

    tight2.cancel()  # its client leaves while it waits
    await settle()
    assert queue.waiting == [] and queue.queued("tight") == 0
    tickets = [tight.result(), tight_fill.result(), loose.result()]
    assert queue.pending_demand_bytes("tight") > 0 and queue.pending_demand_bytes("loose") > 0
    for ticket in tickets:
        ticket.release()
    assert queue.pending_demand_bytes("tight") == 0 and queue.pending_demand_bytes("loose") == 0


async def test_a_shedding_model_refuses_a_request_past_its_deadline(device, tmp_path):
    manager, coordinator = device
    path = str(write_tiny_model(tmp_path / "s", arch="llama"))
    await manager.load(EngineSpec(name="shed", path=path, slo=ModelSlo(ttft_ms=50, shed_load=True)), (0,), True, 0)
    queue = AdmissionQueue(coordinator)
    open_budget(coordinator, 0)
    waiting = asyncio.create_task(queue.admit(manager.get("shed"), PROMPT_TOKENS))
    await asyncio.sleep(0.1)
    await queue.pump()
    await settle()
    with pytest.raises(ShedError) as refused:
        await waiting
    assert refused.value.retry_after_s >= 1
    assert queue.waiting == [] and queue.shed == 1


async def test_requests_that_could_never_be_admitted_do_not_wait(device, tmp_path):
    manager, coordinator = device
    path = str(write_tiny_model(tmp_path / "c", arch="llama"))
    await manager.load(EngineSpec(name="capped", path=path), (0,), True, 4096)  # a cap of 4 KiB of KV
    queue = AdmissionQueue(coordinator)
    open_budget(coordinator, 0)
    with pytest.raises(CapacityError, match="can ever be given on this device"):
        await asyncio.wait_for(queue.admit(manager.get("capped"), PROMPT_TOKENS), 5)
    # Over the model's context: let through at once, for the engine to refuse with its own message.
    ticket = await asyncio.wait_for(queue.admit(manager.get("tight"), 10_000), 5)
    assert ticket.tokens == 0 and not ticket.reserved and queue.waiting == []
    ticket.release()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("shed") / "llama", arch="llama")


def greedy(request_id: str) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id, prompt="hello " * 40, max_tokens=24, temperature=0.0, ignore_eos=True
    )


async def test_a_request_without_a_first_token_by_its_deadline_is_refused_and_leaves_its_engine(engine_factory):
    engine = engine_factory()
    arrival = time.monotonic() - 0.2  # it waited (an activation, the admission queue) past its 100 ms already
    with pytest.raises(
        ShedError, match="no first token 0.2.s after it arrived, past its TTFT SLO of 100 ms"
    ) as refused:
        async for _ in started_by(engine.generate(greedy("late")), arrival + 0.1, "m", 100, arrival):
            pass
    assert refused.value.retry_after_s == 1
    # Its sequence is out of the engine: nothing queued, running or holding KV for it.
    for _ in range(200):
        stats = engine.stats()
        if stats.running_requests == stats.queued_requests == stats.kv_used_bytes == 0:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError(f"the refused request stayed in its engine: {engine.stats()}")
    # Within its deadline every output goes through, the same as without one.
    on_time = [o async for o in started_by(engine.generate(greedy("a")), time.monotonic() + 60, "m", 60_000, 0.0)]
    plain = [o async for o in engine.generate(greedy("b"))]
    assert [o.token_ids for o in on_time] == [o.token_ids for o in plain]
    assert on_time[-1].finish_reason == "length" and on_time[-1].completion_tokens == 24
