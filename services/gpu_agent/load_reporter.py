"""Announces the agent to the scheduler and streams its load reports.

The stream is re-opened after any failure (scheduler restart, network blip)
with a short back-off, so the scheduler always gets reports from a live agent.
With several scheduler replicas, reports go to the leader: its address is
looked up in etcd (records.SCHEDULER_LEADER) on every (re)connect, falling
back to the configured scheduler address while no leader is recorded, and a
change of leader in etcd moves the stream at once (no back-off wait).
With TLS files, the stream is TLS and presents the agent's certificate (the
scheduler may require it: --mtls).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import grpc

from prism_client.v1 import agent_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.common import records
from services.common.etcd import PrefixMirror
from services.common.tls import TlsFiles, aio_channel
from services.gpu_agent.agent_service import STATE_TO_PROTO
from services.gpu_agent.engine_manager import EngineManager
from services.gpu_agent.status_report import (
    AdmissionQueueView,
    MemorySplitSource,
    demand_by_model,
    fill_model_serving,
    gpu_memory_proto,
    memory_splits,
)

log = logging.getLogger(__name__)


class LoadReporter:
    def __init__(
        self,
        scheduler_address: str,
        agent_id: str,
        address: str,
        devices,
        manager: EngineManager,
        *,
        coordinators: Mapping[int, MemorySplitSource] | None = None,
        admission: AdmissionQueueView | None = None,
        etcd=None,
        tls: TlsFiles | None = None,
    ):
        """coordinators (device index -> its memory coordinator) and the
        admission queue add the memory split and queue numbers to each
        report; without them those stay empty. etcd (an aetcd client): where
        to find the leading scheduler; without it, scheduler_address only.
        tls: the agent's TLS files for the stream (None: plaintext)."""
        self.scheduler_address = scheduler_address
        self.tls = tls
        self.etcd = etcd
        self.target = scheduler_address  # where reports go now
        self._leader_moved = asyncio.Event()
        self.agent_id = agent_id
        self.address = address
        self.devices = devices
        self.manager = manager
        self.coordinators = coordinators
        self.admission = admission
        self.interval_s = 0.5
        self._sequence = 0

    def _report(self) -> scheduler_pb2.LoadReport:
        self._sequence += 1
        splits = memory_splits(self.coordinators)
        demand = demand_by_model(splits)
        report = scheduler_pb2.LoadReport(
            agent_id=self.agent_id, sequence=self._sequence, gpus=[gpu_memory_proto(s) for s in splits]
        )
        for name, managed in self.manager.engines.items():
            if managed.draining:  # on its way out: its requests need no placement (the simulator agrees)
                continue
            load = report.models.add(
                model=name,
                state=STATE_TO_PROTO.get(managed.state, agent_pb2.ENGINE_STATE_UNSPECIFIED),
                memory_limit_bytes=managed.memory_limit_bytes,
            )
            fill_model_serving(load, managed, admission=self.admission, demand_bytes=demand)
            load.arrival_rate = load.serving.arrival_rate  # one rate for the scheduler and every view
            # The scheduler sees every request waiting on this model: the agent's admission queue and the engine's.
            load.queued_requests = load.admission_queued
            if managed.engine is not None:
                stats = managed.engine.stats()
                load.queued_requests += stats.queued_requests
                load.running_requests = stats.running_requests
                load.kv_used_bytes = stats.kv_used_bytes
                load.kv_mapped_bytes = stats.kv_mapped_bytes
                load.kv_free_tokens = stats.kv_free_tokens
                load.memory_limit_bytes = stats.memory_limit_bytes
                load.kv_cached_bytes = stats.kv_cached_bytes
                load.prefix_cache_queried_tokens = stats.prefix_cache_queried_tokens
                load.prefix_cache_hit_tokens = stats.prefix_cache_hit_tokens
                if stats.step_times.steps:
                    load.step_count = stats.step_times.steps
                    load.step_xtx.extend(stats.step_times.xtx)
                    load.step_xty.extend(stats.step_times.xty)
        return report

    async def _reports(self):
        while True:
            yield self._report()
            await asyncio.sleep(self.interval_s)

    async def _leader_address(self) -> str:
        """The leading scheduler's address from etcd, else the configured one."""
        if self.etcd is None:
            return self.scheduler_address
        try:
            got = await asyncio.wait_for(self.etcd.get(records.SCHEDULER_LEADER.encode()), 2.0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # etcd unreachable: the configured scheduler may still answer
            log.warning("cannot look up the scheduler leader (%s); using %s", exc, self.scheduler_address)
            return self.scheduler_address
        return records.LeaderRecord.from_json(got.value).address if got is not None else self.scheduler_address

    def _on_leader_change(self, key: str, value: bytes | None) -> None:
        if (
            key == records.SCHEDULER_LEADER
            and value is not None
            and records.LeaderRecord.from_json(value).address != self.target
        ):
            self._leader_moved.set()

    async def _until_leader_moves(self, coro) -> None:
        """Runs coro until it ends or a new leader appears in etcd (then cancels it)."""
        work = asyncio.ensure_future(coro)
        moved = asyncio.ensure_future(self._leader_moved.wait())
        try:
            await asyncio.wait({work, moved}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            moved.cancel()
            if not work.done():
                work.cancel()
                log.info("the scheduler leader moved; reconnecting")
        if work.done() and not work.cancelled():
            work.result()  # its error, if any

    async def _session(self) -> None:
        async with aio_channel(self.target, self.tls) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            reply = await stub.RegisterAgent(
                scheduler_pb2.RegisterAgentRequest(
                    agent_id=self.agent_id,
                    address=self.address,
                    devices=[
                        agent_pb2.Device(index=d.index, kind=d.kind, name=d.name, memory_bytes=d.memory_bytes)
                        for d in self.devices
                    ],
                ),
                timeout=5,
            )
            if reply.report_interval_ms > 0:
                self.interval_s = reply.report_interval_ms / 1000
            log.info("registered with scheduler %s; reporting every %.1fs", self.target, self.interval_s)
            self._backoff = 0.2
            async for _ack in stub.StreamLoadReports(self._reports()):
                pass

    async def run(self) -> None:
        follower = None
        if self.etcd is not None:
            follower = asyncio.create_task(
                PrefixMirror(self.etcd, records.SCHEDULER_LEADER, self._on_leader_change).run()
            )
        self._backoff = 0.2
        try:
            while True:
                self._leader_moved.clear()
                self.target = await self._leader_address()
                try:
                    await self._until_leader_moves(self._session())
                except asyncio.CancelledError:
                    raise
                except grpc.aio.AioRpcError as exc:
                    log.warning(
                        "scheduler %s unreachable (%s); retrying in %.1fs", self.target, exc.code().name, self._backoff
                    )
                if self._leader_moved.is_set():
                    continue  # straight to the new leader
                await self._until_leader_moves(asyncio.sleep(self._backoff))
                self._backoff = min(self._backoff * 2, 5.0)
        finally:
            if follower is not None:
                follower.cancel()
