"""The scheduler's leader election against a real etcd: one of two candidates
leads and the other stands by; a resignation hands over at once; a leader
whose lease is revoked steps down; a leader cut off from etcd (the etcd
process stopped) stops its work before its lease can lapse, so before anyone
else can lead."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from services.common import records
from services.common.etcd import connect
from services.scheduler.leader_election import LEADER, STANDBY, LeaderElection

GUARD_S = 20
TTL_S = 2


class Candidate:
    """A LeaderElection whose work records when each of its terms started and ended."""

    def __init__(self, client, name: str):
        self.election = LeaderElection(client, name, f"{name}:50051", ttl_s=TTL_S)
        self.terms: list[list[float | None]] = []  # [started, ended] in time.monotonic()
        self.task: asyncio.Task | None = None

    async def _lead(self) -> None:
        term = [time.monotonic(), None]
        self.terms.append(term)
        try:
            await asyncio.Event().wait()  # the leader's work: runs until its term is ended
        finally:
            term[1] = time.monotonic()

    def start(self) -> None:
        self.task = asyncio.create_task(self.election.run(self._lead))

    @property
    def leading_now(self) -> bool:
        return bool(self.terms) and self.terms[-1][1] is None

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        await self.election.resign()


async def wait_until(check, what: str, guard_s: float = GUARD_S) -> float:
    """Seconds until check() held."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < guard_s, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def leader_record(client) -> records.LeaderRecord | None:
    got = await client.get(records.SCHEDULER_LEADER.encode())
    return records.LeaderRecord.from_json(got.value) if got is not None else None


async def test_one_candidate_leads_the_other_stands_by_and_a_resignation_hands_over_at_once(etcd_server):
    client_a, client_b = await connect(etcd_server.endpoint), await connect(etcd_server.endpoint)
    a, b = Candidate(client_a, "a"), Candidate(client_b, "b")
    try:
        a.start()
        await wait_until(lambda: a.leading_now, "a to lead")
        b.start()
        await wait_until(lambda: b.election.leader is not None, "b to see the leader")
        assert (a.election.role, b.election.role) == (LEADER, STANDBY)
        assert b.election.leader.scheduler_id == "a" and b.election.leader.address == "a:50051"
        record = await leader_record(client_a)
        assert (record.scheduler_id, record.address) == ("a", "a:50051")
        await asyncio.sleep(TTL_S + 0.5)  # keep-alives hold the lease past its TTL
        assert a.leading_now and not b.terms

        resigned_at = time.monotonic()
        await a.stop()
        assert a.election.role == STANDBY and not a.leading_now  # its work was cancelled with the term
        handover_s = await wait_until(lambda: b.leading_now, "b to lead")
        print(f"handover after a resignation: {time.monotonic() - resigned_at:.3f}s")
        assert handover_s < TTL_S, "a resignation revokes the lease: no waiting for it to expire"
        assert (await leader_record(client_a)).scheduler_id == "b"
        assert b.election.terms == 1 and len(a.terms) == 1
    finally:
        for c in (a, b):
            if c.task is not None and not c.task.done():
                await c.stop()
        await client_a.close()
        await client_b.close()


async def test_a_leader_whose_lease_is_revoked_steps_down_and_the_standby_leads(etcd_server):
    client_a, client_b, admin = [await connect(etcd_server.endpoint) for _ in range(3)]
    a, b = Candidate(client_a, "a"), Candidate(client_b, "b")
    try:
        a.start()
        await wait_until(lambda: a.leading_now, "a to lead")
        b.start()
        await wait_until(lambda: b.election.leader is not None, "b to stand by")
        got = await admin.get(records.SCHEDULER_LEADER.encode())
        await admin.revoke_lease(got.lease)  # etcd ends a's lease: the key goes with it
        await wait_until(lambda: b.leading_now, "b to lead")
        await wait_until(lambda: not a.leading_now, "a to step down", guard_s=TTL_S)
        assert a.election.role == STANDBY
        await asyncio.sleep(1.0)  # a stands by now: it does not take the lead back
        assert b.leading_now and not a.leading_now and len(a.terms) == 1
    finally:
        await a.stop()
        await b.stop()
        for c in (client_a, client_b, admin):
            await c.close()


async def test_a_leader_cut_off_from_etcd_stops_before_its_lease_can_lapse(etcd_server):
    client_a, client_b = await connect(etcd_server.endpoint), await connect(etcd_server.endpoint)
    a, b = Candidate(client_a, "a"), Candidate(client_b, "b")
    etcd_pid = etcd_server.process.pid
    try:
        a.start()
        await wait_until(lambda: a.leading_now, "a to lead")
        b.start()
        await wait_until(lambda: b.election.leader is not None, "b to stand by")
        await asyncio.sleep(1.0)
        os.kill(etcd_pid, signal.SIGSTOP)  # a partition: nobody reaches etcd
        stopped_at = time.monotonic()
        try:
            fenced_s = await wait_until(lambda: not a.leading_now, "a to stop leading", guard_s=TTL_S + 1)
        finally:
            await asyncio.sleep(max(0.0, TTL_S + 1 - (time.monotonic() - stopped_at)))
            os.kill(etcd_pid, signal.SIGCONT)
        print(f"a stopped leading {fenced_s:.3f}s after etcd became unreachable")
        assert fenced_s < TTL_S  # its last keep-alive was before the partition
        # etcd expires a's lease; one of them leads again, and no term overlapped a's first.
        await wait_until(lambda: a.leading_now or b.leading_now, "a new leader")
        first_end = a.terms[0][1]
        later_starts = [t[0] for t in a.terms[1:] + b.terms]
        assert later_starts and min(later_starts) > first_end
        assert a.leading_now != b.leading_now
    finally:
        os.kill(etcd_pid, signal.SIGCONT)
        await a.stop()
        await b.stop()
        await client_a.close()
        await client_b.close()
