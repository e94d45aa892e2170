"""The memory coordinator's measured overhead: what a GPU's processes hold beyond the weights and KV
it counts (CUDA contexts, graphs, activations) is read from the engine workers' device readings and
kept out of the KV budget and the room an activation gets.

There is no GPU here, so the engines are stand-ins that report the readings a worker on a CUDA device
would (CudaReadingEngineFake); the coordinator's arithmetic over them is the real one."""

from __future__ import annotations

from services.gpu_agent.devices import Device
from services.gpu_agent.engine.kv_pool import MemoryLimitState
from services.gpu_agent.engine.request import EngineStats, ServingPath
from services.gpu_agent.engine_manager import EngineManager, EngineSpec, ManagedEngine
from services.gpu_agent.memory_coordinator import (
    OVERHEAD_MARGIN_BYTES,
    OVERHEAD_SETTLE_S,
    OVERHEAD_WINDOW_S,
    MemoryCoordinator,
)

GIB = 1 << 30


class CudaReadingEngineFake:
    """Stands in for an engine worker on a CUDA device (none here): its stats carry its KV mapped and the
    device's memory in use, as a worker reads it with cudaMemGetInfo."""

    kv_bundle_bytes = 2 << 20
    kv_bytes_per_token = 128 << 10
    serving_path = ServingPath("kvcached", "triton", True)

    def __init__(self, weight_bytes: int, mapped_bytes: int = 0):
        self.weight_bytes = weight_bytes
        self.mapped_bytes = mapped_bytes
        self.held_bytes = 0  # the pages the used KV is on, where more than the KV itself
        self.demand_tokens = 0  # what its running and queued requests need soon
        self.device_used_bytes = 0
        self.revision = 0

    async def set_memory_limit(self, nbytes: int, revision: int | None) -> MemoryLimitState:
        self.revision = revision or self.revision + 1
        return MemoryLimitState("applied", nbytes, nbytes, self.mapped_bytes, self.revision)

    def stats(self) -> EngineStats:
        return EngineStats(
            running_requests=0,
            queued_requests=0,
            kv_used_bytes=self.mapped_bytes,
            memory_limit_bytes=self.mapped_bytes,
            weight_bytes=self.weight_bytes,
            kv_mapped_bytes=self.mapped_bytes,
            device_used_bytes=self.device_used_bytes,
            kv_held_bytes=self.held_bytes,
            kv_demand_tokens=self.demand_tokens,
        )


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


async def noop(_managed) -> None:
    pass


def coordinator_with(engines: dict[str, tuple[CudaReadingEngineFake, str]], clock: Clock) -> MemoryCoordinator:
    device = Device(0, "cuda", "a GPU that is not here", 80 * GIB)
    manager = EngineManager([device], noop)
    for name, (engine, state) in engines.items():
        manager.engines[name] = ManagedEngine(
            spec=EngineSpec(name=name, path=f"/m/{name}"), gpu_ids=(0,), state=state, engine=engine
        )
    return MemoryCoordinator(device, manager, reserve_bytes=4 * GIB, clock=clock)


def read(engines, used: int) -> None:
    for engine in engines:
        engine.device_used_bytes = used


def read_and_hold(coordinator: MemoryCoordinator, clock: Clock, engines, used: int) -> int:
    """The engines read `used` from now on, sampled every second until the reading has held its settle
    time; returns the overhead then."""
    read(engines, used)
    start = clock.now
    while clock.now < start + OVERHEAD_SETTLE_S:
        coordinator.observe_overhead()
        clock.now += 1.0
    return coordinator.observe_overhead()


async def test_what_the_processes_hold_beyond_weights_and_kv_is_kept_out_of_the_budget():
    active, idle = CudaReadingEngineFake(16 * GIB, mapped_bytes=2 * GIB), CudaReadingEngineFake(16 * GIB)
    clock = Clock()
    coordinator = coordinator_with({"a": (active, "active"), "b": (idle, "inactive")}, clock)
    # Nothing read (the CPU device, or before the first stats): the configured reserve.
    assert coordinator.observe_overhead() == 0
    assert coordinator.budget_bytes(coordinator._active()) == 80 * GIB - 16 * GIB - 4 * GIB
    # The device reads 30 GiB in use: 16 of weights and 2 of KV are counted, 12 are not; counted once held.
    read((active, idle), 30 * GIB)
    assert coordinator.observe_overhead() == 0
    assert read_and_hold(coordinator, clock, (active, idle), 30 * GIB) == 12 * GIB
    assert coordinator.reserve_now() == 12 * GIB + OVERHEAD_MARGIN_BYTES
    assert coordinator.budget_bytes(coordinator._active()) == 80 * GIB - 16 * GIB - 12 * GIB - OVERHEAD_MARGIN_BYTES
    assert coordinator.room_to_activate(coordinator.manager.engines["b"]) == []  # 16 GiB fit in the 51 left
    # 66 GiB in use, 48 of them uncounted: the switched-off engine's weights no longer fit beside the
    # active one (beside the configured 4 GiB reserve alone they would), so the idle one steps aside...
    clock.now = OVERHEAD_WINDOW_S + 1
    assert read_and_hold(coordinator, clock, (active, idle), 66 * GIB) == 48 * GIB
    assert coordinator.room_to_activate(coordinator.manager.engines["b"]) == ["a"]
    # ... and were it serving, the activation is refused rather than run the device out of memory.
    coordinator.manager.engines["a"].request_stats.arrived()
    assert coordinator.room_to_activate(coordinator.manager.engines["b"]) is None
    assert coordinator.memory_split().reserve_bytes == coordinator.reserve_now()


async def test_an_activation_under_way_and_a_loading_engine_do_not_read_as_overhead():
    active, switching_on = CudaReadingEngineFake(16 * GIB), CudaReadingEngineFake(16 * GIB)
    clock = Clock()
    coordinator = coordinator_with({"a": (active, "active"), "b": (switching_on, "inactive")}, clock)
    assert read_and_hold(coordinator, clock, (active, switching_on), 20 * GIB) == 4 * GIB
    # b's weights arriving while it is switched on (its activation lock held, not yet active): counted.
    b = coordinator.manager.engines["b"]
    await b.activation_lock.acquire()
    clock.now = 1.0
    read((active, switching_on), 36 * GIB)
    assert coordinator.measured_overhead_bytes() == 4 * GIB
    b.activation_lock.release()
    read((active, switching_on), 20 * GIB)
    # An engine loading here (its weights on the device, in no count): no reading is taken.
    coordinator.manager.engines["c"] = ManagedEngine(
        spec=EngineSpec(name="c", path="/m/c"), gpu_ids=(0,), state="loading", engine=CudaReadingEngineFake(8 * GIB)
    )
    read((active, switching_on), 60 * GIB)
    assert coordinator.measured_overhead_bytes() is None
    assert coordinator.observe_overhead() == 4 * GIB
    del coordinator.manager.engines["c"]


async def test_the_reserve_covers_the_most_the_processes_held_over_the_window():
    active = CudaReadingEngineFake(16 * GIB)
    clock = Clock()
    coordinator = coordinator_with({"a": (active, "active")}, clock)
    assert read_and_hold(coordinator, clock, (active,), 20 * GIB) == 4 * GIB
    # The processes hold 6 GiB more for a while (a large step's activations in an allocator's cache)...
    grown_at = clock.now
    assert read_and_hold(coordinator, clock, (active,), 26 * GIB) == 10 * GIB
    read((active,), 20 * GIB)
    clock.now += 1.0
    assert coordinator.observe_overhead() == 10 * GIB
    assert coordinator.reserve_now() == 10 * GIB + OVERHEAD_MARGIN_BYTES
    # ... which the reserve keeps covering until the window has passed without it.
    clock.now = grown_at + OVERHEAD_SETTLE_S + OVERHEAD_WINDOW_S + 0.1
    assert coordinator.observe_overhead() == 4 * GIB


async def test_a_reading_that_does_not_hold_is_not_overhead():
    """An engine's reading is up to 100 ms old: for a moment after a switch the device's memory in use
    still holds weights the count no longer has. Such a reading is passed over unless it holds."""
    active = CudaReadingEngineFake(16 * GIB)
    clock = Clock()
    coordinator = coordinator_with({"a": (active, "active")}, clock)
    assert read_and_hold(coordinator, clock, (active,), 20 * GIB) == 4 * GIB
    for moment in range(5):  # 16 GiB more for half a second, then gone, now and then
        read((active,), 36 * GIB)
        clock.now += 0.5
        assert coordinator.observe_overhead() == 4 * GIB
        read((active,), 20 * GIB)
        clock.now += 2.0
        assert coordinator.observe_overhead() == 4 * GIB
    assert coordinator.reserve_now() == 4 * GIB + OVERHEAD_MARGIN_BYTES


async def test_an_engine_being_switched_on_keeps_its_weights_and_limit_from_plans_and_grants():
    """Between prepare_activation and the engine's state turning active its weights are being copied in:
    the coordinator's periodic plans and admission's grants must not hand that memory (or the limit
    prepared for it) to the engines already on."""
    serving, arriving = CudaReadingEngineFake(16 * GIB), CudaReadingEngineFake(16 * GIB)
    serving.demand_tokens = (200 * GIB) // serving.kv_bytes_per_token  # wants more than the device has
    clock = Clock()
    coordinator = coordinator_with({"a": (serving, "active"), "b": (arriving, "inactive")}, clock)
    a, b = coordinator.manager.engines["a"], coordinator.manager.engines["b"]
    # Without b: a's limit may reach 80 - 16 - 4 GiB.
    assert coordinator.snapshot().budget_bytes == 60 * GIB
    # b is switched on: its prepared limit is set, its weights are on the way (the activation lock is held).
    await b.activation_lock.acquire()
    b.memory_limit_bytes = 3 * GIB
    assert coordinator.snapshot().budget_bytes == 60 * GIB - 16 * GIB - 3 * GIB
    assert coordinator.memory_split().kv_budget_bytes == 60 * GIB - 16 * GIB - 3 * GIB
    # The plan during the copy grows a no further than that budget...
    a.memory_limit_bytes = 40 * GIB
    plan = coordinator._policy(coordinator.snapshot(), coordinator.params)
    assert plan["a"] <= 41 * GIB and "b" not in plan
    # ... and a grant finds none of b's memory unassigned.
    a.memory_limit_bytes = 41 * GIB
    assert await coordinator.grant(a, 2 << 20) is False
    # prepare_activation's own plan (b counted as active, `also`) does not count b twice.
    assert coordinator.snapshot(also=b).budget_bytes == 60 * GIB - 16 * GIB
    # A third engine asking for room meanwhile counts b's weights and prepared limit, not a page bundle:
    # with a just served (not idle long enough to step aside), c's 16 GiB fit beside a small limit of
    # b's (80 - 4 reserve - 16 a - 16 b - 3 = 41 GiB free) but not beside a large one (14 GiB free).
    coordinator.manager.engines["c"] = ManagedEngine(
        spec=EngineSpec(name="c", path="/m/c"), gpu_ids=(0,), state="inactive", engine=CudaReadingEngineFake(16 * GIB)
    )
    c = coordinator.manager.engines["c"]
    a.memory_limit_bytes, serving.demand_tokens = 2 * GIB, 0
    a.request_stats.arrived()
    a.request_stats.ended()
    assert coordinator.room_to_activate(c) == []
    b.memory_limit_bytes = 30 * GIB
    assert coordinator.room_to_activate(c) is None
    b.activation_lock.release()
    assert coordinator.room_to_activate(c) == []  # b's switch-on given up: its memory is free again


async def test_kv_an_engine_holds_above_its_limit_is_not_planned_for_another_until_given_back():
    """A shrink kvcached has not finished (the pages still hold running sequences' slots) leaves the
    engine's pages on the card: neither a plan nor a grant gives them to another engine meanwhile."""
    shrinking, growing = CudaReadingEngineFake(16 * GIB), CudaReadingEngineFake(16 * GIB)
    clock = Clock()
    coordinator = coordinator_with({"a": (shrinking, "active"), "b": (growing, "active")}, clock)
    a, b = coordinator.manager.engines["a"], coordinator.manager.engines["b"]
    budget = 80 * GIB - 32 * GIB - 4 * GIB
    a.memory_limit_bytes, b.memory_limit_bytes = 10 * GIB, budget - 10 * GIB
    shrinking.held_bytes = 10 * GIB
    assert coordinator.snapshot().budget_bytes == budget
    # a's limit went from 14 to 10 GiB, but its sequences still hold 14 GiB of pages.
    shrinking.held_bytes = 14 * GIB
    assert coordinator.snapshot().budget_bytes == budget - 4 * GIB
    b.memory_limit_bytes = budget - 14 * GIB
    assert await coordinator.grant(b, 2 * GIB) is False  # the 4 GiB a's limit gave up are still a's pages
    growing.demand_tokens = (100 * GIB) // growing.kv_bytes_per_token
    plan = coordinator._policy(coordinator.snapshot(), coordinator.params)
    assert sum(plan.values()) <= budget - 4 * GIB
    # Given back: the budget is whole again.
    shrinking.held_bytes = 9 * GIB
    assert coordinator.snapshot().budget_bytes == budget
    assert await coordinator.grant(b, 2 * GIB) is True
