"""The scheduler's gRPC service: agents announce themselves and stream load
reports; both wake the placement loop. Only the leading replica takes them: a
standby answers UNAVAILABLE, so an agent looks the leader up again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from prism_client.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, wake: asyncio.Event, report_interval_ms: int = 500):
        self.wake = wake
        self.report_interval_ms = report_interval_ms
        # agent_id -> (monotonic receive time, last report); read by policies as demand.
        self.latest_reports: dict[str, tuple[float, scheduler_pb2.LoadReport]] = {}
        self.leading = True  # set by the leader election; a lone scheduler always leads

    async def _refuse_unless_leading(self, context) -> None:
        if not self.leading:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this scheduler replica is a standby; ask the leader")

    async def RegisterAgent(self, request, context) -> scheduler_pb2.RegisterAgentResponse:
        await self._refuse_unless_leading(context)
        log.info(
            "agent %s registered from %s with %d device(s)", request.agent_id, request.address, len(request.devices)
        )
        self.wake.set()
        return scheduler_pb2.RegisterAgentResponse(report_interval_ms=self.report_interval_ms)

    async def StreamLoadReports(self, request_iterator, context) -> AsyncIterator[scheduler_pb2.LoadReportAck]:
        await self._refuse_unless_leading(context)
        async for report in request_iterator:
            await self._refuse_unless_leading(context)  # stepped down: the agent moves to the new leader
            self.latest_reports[report.agent_id] = (time.monotonic(), report)
            yield scheduler_pb2.LoadReportAck(sequence=report.sequence)

    def fresh_reports(self, max_age_s: float = 5.0) -> list[scheduler_pb2.LoadReport]:
        """The latest report of every agent that reported in the last max_age_s."""
        now = time.monotonic()
        return [report for received, report in self.latest_reports.values() if now - received <= max_age_s]
