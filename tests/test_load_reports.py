"""The agent's load-report stream, against a real scheduler gRPC service: it
carries the per-model numbers and the device's memory split, and comes back
by itself after the scheduler restarts."""

from __future__ import annotations

import asyncio
import time

import grpc

from prism.tiny_models import write_tiny_model
from prism_client.v1 import scheduler_pb2_grpc
from services.common.etcd_server import free_port
from services.gpu_agent.devices import discover_devices
from services.gpu_agent.engine_manager import EngineManager, EngineSpec
from services.gpu_agent.load_reporter import LoadReporter
from services.gpu_agent.memory_coordinator import MemoryCoordinator
from services.scheduler.scheduler_service import SchedulerService

GUARD_S = 30


async def start_scheduler(address: str) -> tuple[grpc.aio.Server, SchedulerService]:
    service = SchedulerService(asyncio.Event(), report_interval_ms=100)
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    server.add_insecure_port(address)
    await server.start()
    return server, service


async def wait_for_report(service: SchedulerService, agent_id: str, after: float):
    deadline = time.monotonic() + GUARD_S
    while True:
        received = service.latest_reports.get(agent_id)
        if received is not None and received[0] > after:
            return received[1]
        assert time.monotonic() < deadline, "no load report arrived"
        await asyncio.sleep(0.05)


async def test_reports_carry_the_memory_split_and_resume_after_a_scheduler_restart(tmp_path):
    devices = discover_devices("cpu", cpu_memory_gb=0.01)

    async def publish(_managed) -> None:
        return None

    manager = EngineManager(devices, publish, coordinated=True)
    coordinator = MemoryCoordinator(devices[0], manager, reserve_bytes=0)
    model = write_tiny_model(tmp_path / "m", arch="llama")
    await manager.load(EngineSpec(name="m", path=str(model)), (0,), activate=True, memory_limit_bytes=0)
    await coordinator.rebalance()

    address = f"127.0.0.1:{free_port()}"
    server, service = await start_scheduler(address)
    reporter = LoadReporter(address, "agent-1", "127.0.0.1:1", devices, manager, coordinators={0: coordinator})
    task = asyncio.create_task(reporter.run())
    try:
        report = await wait_for_report(service, "agent-1", 0.0)
        assert [m.model for m in report.models] == ["m"]
        (gpu,) = report.gpus
        assert gpu.kv_budget_bytes == devices[0].memory_bytes - manager.get("m").engine.weight_bytes
        assert [e.model for e in gpu.engines] == ["m"]
        assert 0 < gpu.kv_limit_bytes <= gpu.kv_budget_bytes
        assert gpu.free_bytes == gpu.kv_budget_bytes - gpu.kv_limit_bytes

        await server.stop(grace=None)  # the scheduler dies ...
        await asyncio.sleep(0.5)
        restarted_at = time.monotonic()
        server, service = await start_scheduler(address)  # ... and a new one comes up at the same address
        report = await wait_for_report(service, "agent-1", restarted_at)
        assert [m.model for m in report.models] == ["m"]
    finally:
        task.cancel()
        await server.stop(grace=None)
        await manager.stop_all()
