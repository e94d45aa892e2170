"""The conversions behind the agent's status and load reports, on hand-built
snapshots, memory splits and managed engines."""

from __future__ import annotations

import pytest

from prism_client.v1 import agent_pb2, scheduler_pb2
from services.gpu_agent.agent_service import AgentService
from services.gpu_agent.devices import Device
from services.gpu_agent.engine_manager import EngineManager, EngineSpec, ManagedEngine
from services.gpu_agent.load_reporter import LoadReporter
from services.gpu_agent.memory_split import DeviceMemorySplit, EngineMemory
from services.gpu_agent.request_stats import ModelRequestStats, ServingSnapshot
from services.gpu_agent.slo import ModelSlo
from services.gpu_agent.status_report import (
    demand_by_model,
    fill_model_serving,
    gpu_memory_proto,
    memory_splits,
    serving_stats_proto,
)

MIB = 1 << 20

SNAPSHOT = ServingSnapshot(
    window_s=60.0,
    arrival_rate=2.5,
    finished_requests=140,
    ttft_p50_ms=80.0,
    ttft_p99_ms=950.0,
    tpot_p50_ms=12.0,
    tpot_p99_ms=40.0,
    slo_attainment=0.93,
    shed_requests=3,
    failed_requests=1,
    busy_fraction=0.4,
    mean_prompt_tokens=480.0,
    mean_output_tokens=120.0,
    recent_arrival_rate=7.5,
)


def split(gpu_id: int = 0) -> DeviceMemorySplit:
    a = EngineMemory(
        model="model-a",
        active=True,
        weight_bytes=2000 * MIB,
        kv_limit_bytes=3000 * MIB,
        kv_mapped_bytes=1000 * MIB,
        kv_used_bytes=900 * MIB,
        kv_demand_bytes=2500 * MIB,
    )
    b = EngineMemory(
        model="model-b",
        active=False,
        weight_bytes=6000 * MIB,
        kv_limit_bytes=0,
        kv_mapped_bytes=0,
        kv_used_bytes=0,
        kv_demand_bytes=0,
    )
    return DeviceMemorySplit(
        gpu_id=gpu_id,
        total_bytes=80_000 * MIB,
        weight_bytes=2000 * MIB,
        reserve_bytes=4000 * MIB,
        kv_budget_bytes=74_000 * MIB,
        kv_limit_bytes=3000 * MIB,
        kv_mapped_bytes=1000 * MIB,
        free_bytes=71_000 * MIB,
        engines=(a, b),
    )


class FixedCoordinator:
    """Stands in for a device's MemoryCoordinator: a fixed split."""

    def __init__(self, value: DeviceMemorySplit):
        self.value = value

    def memory_split(self) -> DeviceMemorySplit:
        return self.value


class CountingQueue:
    """Stands in for the admission queue: fixed counts per model."""

    def __init__(self, counts: dict[str, int]):
        self.counts = counts

    def queued(self, model: str) -> int:
        return self.counts.get(model, 0)


def test_serving_stats_carries_every_field():
    proto = serving_stats_proto(SNAPSHOT)
    assert {f.name for f in agent_pb2.ServingStats.DESCRIPTOR.fields} == set(SNAPSHOT.__dataclass_fields__)
    for name in SNAPSHOT.__dataclass_fields__:
        assert getattr(proto, name) == pytest.approx(getattr(SNAPSHOT, name)), name


def test_gpu_memory_carries_the_split_and_every_engine():
    s = split(gpu_id=3)
    proto = gpu_memory_proto(s)
    device_fields = {f.name for f in agent_pb2.GpuMemory.DESCRIPTOR.fields}
    assert device_fields == set(s.__dataclass_fields__)
    for name in device_fields - {"engines"}:
        assert getattr(proto, name) == getattr(s, name), name
    assert [e.model for e in proto.engines] == ["model-a", "model-b"]
    for engine, built in zip(proto.engines, s.engines):
        assert {f.name for f in agent_pb2.EngineMemory.DESCRIPTOR.fields} == set(built.__dataclass_fields__)
        for name in built.__dataclass_fields__:
            assert getattr(engine, name) == getattr(built, name), name


def test_splits_in_device_order_and_none_without_coordinators():
    assert memory_splits(None) == [] and memory_splits({}) == []
    splits = memory_splits({1: FixedCoordinator(split(1)), 0: FixedCoordinator(split(0))})
    assert [s.gpu_id for s in splits] == [0, 1]
    assert demand_by_model(splits) == {"model-a": 2 * 2500 * MIB, "model-b": 0}


def managed_engine(name: str = "model-a", slo: ModelSlo = ModelSlo()) -> ManagedEngine:
    return ManagedEngine(spec=EngineSpec(name=name, path="/models/x", slo=slo), gpu_ids=(0,), state="active")


@pytest.mark.parametrize("message_type", [agent_pb2.EngineStatus, scheduler_pb2.ModelLoad])
def test_engine_status_and_model_load_get_the_same_fields(message_type):
    managed = managed_engine()
    managed.request_stats = ModelRequestStats(ModelSlo(ttft_ms=100))
    managed.request_stats.arrived()
    managed.request_stats.finished(ttft_s=0.05, tpot_s=None)
    managed.request_stats.finished(ttft_s=0.5, tpot_s=None)  # misses the 100 ms TTFT
    message = message_type(model="model-a")
    fill_model_serving(
        message, managed, admission=CountingQueue({"model-a": 4}), demand_bytes=demand_by_model([split()])
    )
    assert message.kv_demand_bytes == 2500 * MIB
    assert message.admission_queued == 4
    assert message.serving.finished_requests == 2 and message.serving.slo_attainment == 0.5
    assert message.serving.ttft_p99_ms == pytest.approx(500)


# ---- the agent's two reports, over a real EngineManager ------------------------


@pytest.fixture()
def manager() -> EngineManager:
    async def publish(_managed) -> None:
        pass

    manager = EngineManager([Device(index=0, kind="cpu", name="cpu", memory_bytes=80_000 * MIB)], publish)
    managed = managed_engine("model-a", ModelSlo(priority=3))
    managed.request_stats = ModelRequestStats(managed.slo, clock=lambda: 100.0)
    for _ in range(3):
        managed.request_stats.arrived()
    manager.engines["model-a"] = managed
    idle = managed_engine("model-b")
    idle.request_stats = ModelRequestStats(ModelSlo(), clock=lambda: 100.0)  # no request yet
    manager.engines["model-b"] = idle
    return manager


def test_load_report_carries_the_split_queue_demand_and_serving(manager):
    reporter = LoadReporter(
        "127.0.0.1:1",
        "agent-1",
        "127.0.0.1:2",
        [],
        manager,
        coordinators={0: FixedCoordinator(split())},
        admission=CountingQueue({"model-a": 2}),
    )
    report = reporter._report()
    assert [g.gpu_id for g in report.gpus] == [0] and report.gpus[0] == gpu_memory_proto(split())
    loads = {m.model: m for m in report.models}
    a = loads["model-a"]
    assert a.admission_queued == 2 and a.queued_requests == 2  # no engine yet: the admission queue alone
    assert a.kv_demand_bytes == 2500 * MIB
    assert a.arrival_rate == pytest.approx(3.0) == pytest.approx(a.serving.arrival_rate)
    b = loads["model-b"]
    assert b.arrival_rate == 0 and b.serving.finished_requests == 0 and b.serving.slo_attainment == 1.0


def test_load_report_without_coordinators_or_queue(manager):
    report = LoadReporter("127.0.0.1:1", "agent-1", "127.0.0.1:2", [], manager)._report()
    assert len(report.gpus) == 0
    assert {m.model: m.admission_queued for m in report.models} == {"model-a": 0, "model-b": 0}


async def test_get_status_carries_the_split_queue_demand_priority_and_serving(manager):
    service = AgentService(
        "agent-1", [], manager, coordinators={0: FixedCoordinator(split())}, admission=CountingQueue({"model-a": 5})
    )
    status = await service.GetStatus(agent_pb2.GetStatusRequest(), None)
    assert list(status.gpus) == [gpu_memory_proto(split())]
    engines = {e.model: e for e in status.engines}
    a = engines["model-a"]
    assert (a.admission_queued, a.kv_demand_bytes, a.priority) == (5, 2500 * MIB, 3)
    assert a.serving.arrival_rate == pytest.approx(3.0) and a.serving.slo_attainment == 1.0
    assert engines["model-b"].serving.slo_attainment == 1.0 and engines["model-b"].admission_queued == 0


def test_the_scheduler_sums_the_reports_busy_fractions_and_averages_their_tokens():
    from services.scheduler.demand import DemandMemory
    from services.scheduler.server import engine_loads_from_reports

    reports = []
    for agent_id, rate, busy, prompt in (("a", 3.0, 0.5, 400.0), ("b", 1.0, 0.25, 800.0)):
        report = scheduler_pb2.LoadReport(agent_id=agent_id)
        load = report.models.add(model="m")
        load.serving.CopyFrom(
            serving_stats_proto(
                ServingSnapshot(
                    window_s=60.0,
                    arrival_rate=rate,
                    finished_requests=10,
                    ttft_p50_ms=0,
                    ttft_p99_ms=0,
                    tpot_p50_ms=0,
                    tpot_p99_ms=0,
                    slo_attainment=1.0,
                    shed_requests=0,
                    failed_requests=0,
                    busy_fraction=busy,
                    mean_prompt_tokens=prompt,
                    mean_output_tokens=100.0,
                    recent_arrival_rate=2 * rate,
                )
            )
        )
        reports.append(report)
    demand = DemandMemory().demand(0.0, engine_loads_from_reports(reports))["m"]
    assert demand.arrival_rate == pytest.approx(4.0)
    assert demand.recent_arrival_rate == pytest.approx(8.0)
    assert demand.busy_fraction == pytest.approx(0.75)
    assert demand.mean_prompt_tokens == pytest.approx((3 * 400 + 1 * 800) / 4)  # weighted by arrival rate
    assert demand.mean_output_tokens == pytest.approx(100.0)


def test_the_scheduler_counts_a_split_models_weights_over_all_its_gpus():
    """A model split over two GPUs shows its shard on each in the agent's report: the scheduler adds
    them up (the policies divide a model's weights by its tp_size), and takes the largest agent's."""
    from services.scheduler.server import reported_weight_bytes

    def report(agent_id: str, rows: dict[int, dict[str, int]]) -> scheduler_pb2.LoadReport:
        out = scheduler_pb2.LoadReport(agent_id=agent_id)
        for gpu_id, engines in rows.items():
            gpu = out.gpus.add(gpu_id=gpu_id)
            for model, nbytes in engines.items():
                gpu.engines.add(model=model, weight_bytes=nbytes)
        return out

    reports = [
        report("a", {0: {"split": 10 * MIB, "small": 3 * MIB}, 1: {"split": 10 * MIB}}),
        report("b", {0: {"small": 4 * MIB, "unknown": 0}}),
    ]
    assert reported_weight_bytes(reports) == {"split": 20 * MIB, "small": 4 * MIB}


def test_the_scheduler_counts_a_split_models_kv_demand_on_every_rank():
    """An agent reports a split model's KV demand as its first rank holds it (its share of the KV heads);
    the policies divide a model's demand by its tp_size, so the scheduler counts it tp_size times."""
    from services.scheduler.server import engine_loads_from_reports

    report = scheduler_pb2.LoadReport(agent_id="a")
    report.models.add(model="split", kv_demand_bytes=100 * MIB)
    report.models.add(model="whole", kv_demand_bytes=30 * MIB)
    loads = engine_loads_from_reports([report], {"split": 4, "whole": 1})
    assert (loads[("a", "split")].demand.kv_demand_bytes, loads[("a", "whole")].demand.kv_demand_bytes) == (
        400 * MIB,
        30 * MIB,
    )
    # no sizes given: as reported
    assert engine_loads_from_reports([report])[("a", "split")].demand.kv_demand_bytes == 100 * MIB


def test_the_policies_plan_each_gpu_without_the_reserve_its_agent_keeps():
    """The policies plan weights and KV on a GPU's memory less the reserve its agent reports in force
    (measured on a GPU: what the processes hold beyond weights and KV); a GPU not yet reported, or
    another agent's report, leaves the device's whole memory."""
    from services.scheduler.server import usable_gpu_memory

    report = scheduler_pb2.LoadReport(agent_id="a")
    report.gpus.add(gpu_id=0, total_bytes=80 * MIB, reserve_bytes=20 * MIB)
    other = scheduler_pb2.LoadReport(agent_id="b")
    other.gpus.add(gpu_id=1, reserve_bytes=50 * MIB)
    devices = [{"index": 0, "memory_bytes": 80 * MIB}, {"index": 1, "memory_bytes": 80 * MIB}]
    assert usable_gpu_memory("a", devices, [report, other]) == {0: 60 * MIB, 1: 80 * MIB}
    assert usable_gpu_memory("a", [{"index": 0}], [report]) == {0: 0}  # memory unknown stays unknown (0)
