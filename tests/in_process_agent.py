"""A real agent's gRPC service in the test's own process, wired as
services/gpu_agent/server.py wires it (engine manager, memory coordinator
with prepare_activation before every activation, admission queue, and the
shutdown gate), on one CPU device, over a loopback port. The tests of drains,
SIGTERM drains and making room share it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc

from prism_client.v1 import agent_pb2, agent_pb2_grpc
from services.gpu_agent.admission import AdmissionQueue, AgentAdmission
from services.gpu_agent.agent_service import AgentService
from services.gpu_agent.devices import discover_devices
from services.gpu_agent.engine_manager import DEFAULT_DRAIN_TIMEOUT_S, EngineManager, ManagedEngine
from services.gpu_agent.memory_coordinator import DEFAULT_MAKE_ROOM_IDLE_S, MemoryCoordinator
from services.gpu_agent.server import ShutdownGate


async def _no_publish(managed: ManagedEngine) -> None:
    pass


class InProcessAgent:
    def __init__(
        self,
        agent_id: str = "agent-t",
        *,
        cpu_memory_gb: float = 1.0,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        make_room_idle_s: float = DEFAULT_MAKE_ROOM_IDLE_S,
        publish: Callable[[ManagedEngine], Awaitable[None]] = _no_publish,
        model_roots: tuple = (),
    ):
        self.agent_id = agent_id
        self.model_roots = model_roots
        self.cpu_memory_gb = cpu_memory_gb
        self.drain_timeout_s = drain_timeout_s
        self.make_room_idle_s = make_room_idle_s
        self.publish = publish

    async def start(self) -> None:
        devices = discover_devices("cpu", cpu_memory_gb=self.cpu_memory_gb)
        self.manager = EngineManager(devices, self.publish, coordinated=True, drain_timeout_s=self.drain_timeout_s)
        self.coordinator = MemoryCoordinator(
            devices[0], self.manager, reserve_bytes=0, make_room_idle_s=self.make_room_idle_s
        )
        self.manager.before_activate = self.coordinator.prepare_activation
        queue = AdmissionQueue(self.coordinator)
        self.tasks = [asyncio.create_task(self.coordinator.run()), asyncio.create_task(queue.run())]
        self.admission = AgentAdmission({0: queue})
        service = AgentService(
            self.agent_id,
            devices,
            self.manager,
            coordinators={0: self.coordinator},
            admission=self.admission,
            model_roots=self.model_roots,
        )
        self.gate = ShutdownGate(self.agent_id)
        self.server = grpc.aio.server(interceptors=[self.gate])
        agent_pb2_grpc.add_AgentServicer_to_server(service, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = agent_pb2_grpc.AgentStub(self.channel)

    async def stop(self) -> None:
        await self.channel.close()
        await self.server.stop(grace=None)
        for task in self.tasks:
            task.cancel()
        await self.manager.stop_all()

    async def load(self, name: str, path: str, activate: bool = True) -> agent_pb2.EngineStatus:
        return await self.stub.LoadModel(
            agent_pb2.LoadModelRequest(spec=agent_pb2.ModelSpec(name=name, path=path), gpu_ids=[0], activate=activate),
            timeout=120,
        )

    async def __aenter__(self) -> InProcessAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
