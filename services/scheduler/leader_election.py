"""Leader election among scheduler replicas, through etcd.

The leader is whoever created records.SCHEDULER_LEADER: the key is written in
a transaction that succeeds only while it is absent, under a lease of a few
seconds that the leader keeps alive. A standby watches the key and campaigns
as soon as it is deleted (its leader resigned, or died and its lease ran
out), so a dead leader is replaced within about one TTL.

Fencing: etcd deletes the key no earlier than TTL seconds after the leader's
last successful keep-alive was *sent*. The leader therefore stops leading
(cancels its `lead` task) `fence_margin_s` before that moment unless a newer
keep-alive succeeded, which is before any standby can win: a leader cut off
from etcd never acts beside its successor. It also steps down when the key
no longer carries its lease (deleted by hand, or a lease etcd forgot).

    election = LeaderElection(etcd, "sched-a", "10.0.0.5:50051", ttl_s=2)
    await election.run(lead)   # calls lead() for each term, cancels it when the term ends
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import aetcd

from services.common import records

log = logging.getLogger(__name__)

# Roles reported to on_role.
STANDBY = "standby"
LEADER = "leader"

OnRole = Callable[[str], Awaitable[None] | None]
# A term's work: a coroutine, run as a task that the end of the term cancels.
LeaderWork = Callable[[], Coroutine[Any, Any, None]]


class EtcdLease(Protocol):
    """What the election uses of an aetcd.Lease (aetcd ships no type hints)."""

    id: int
    ttl: int  # seconds, as etcd granted it

    async def refresh(self) -> Any: ...  # etcd's keep-alive reply (its TTL), or None

    async def revoke(self) -> Any: ...


class LeaderElection:
    def __init__(
        self,
        client: aetcd.Client,
        candidate_id: str,
        address: str,
        *,
        ttl_s: int = 2,
        fence_margin_s: float = 0.5,
        key: str = records.SCHEDULER_LEADER,
        on_role: OnRole | None = None,
    ):
        """ttl_s: the leader's lease; a dead leader is replaced about this long
        after its death. etcd's shortest lease is 2 s with default timing.
        fence_margin_s: how long before its lease could lapse the leader stops."""
        if fence_margin_s >= ttl_s:
            raise ValueError("fence_margin_s must be shorter than ttl_s")
        self._client = client
        self.candidate_id = candidate_id
        self.address = address
        self.ttl_s = ttl_s
        self.fence_margin_s = fence_margin_s
        self.key = key
        self._on_role = on_role
        self.role = STANDBY
        self.leader: records.LeaderRecord | None = None  # the leader as last seen (ourselves while leading)
        self._lease: EtcdLease | None = None
        self._lease_deadline = 0.0  # monotonic time before which etcd cannot expire our lease
        self._resigned = False
        self.terms = 0  # how many times this candidate has led

    @property
    def is_leader(self) -> bool:
        return self.role == LEADER

    async def _set_role(self, role: str) -> None:
        if role == self.role:
            return
        self.role = role
        log.info("%s is now %s", self.candidate_id, role)
        if self._on_role is not None:
            result = self._on_role(role)
            if asyncio.iscoroutine(result):
                await result

    async def run(self, lead: LeaderWork) -> None:
        """Campaigns until cancelled or resign()ed; while leading, runs lead()
        (cancelled when leadership ends; if it returns or fails, the term ends
        and the lease is given up so that another replica can lead)."""
        while not self._resigned:
            try:
                lease = await self._campaign()
                if lease is None:
                    await self._wait_for_vacancy()
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd unreachable: keep trying as a standby
                log.warning("election: etcd error while standing by (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            await self._lead(lease, lead)
            await asyncio.sleep(0.5)  # a term that ended by itself does not restart in a tight loop

    async def resign(self) -> None:
        """Stops campaigning and, when leading, gives up the lease at once so a
        standby takes over without waiting for it to expire. Call after the
        task running run() was cancelled (its lead() is cancelled with it)."""
        self._resigned = True
        lease, self._lease = self._lease, None
        await self._set_role(STANDBY)
        if lease is not None:
            try:
                await asyncio.wait_for(lease.revoke(), self.ttl_s)
                log.info("%s resigned leadership", self.candidate_id)
            except Exception as exc:  # etcd gone: the lease runs out by itself
                log.warning("could not revoke the leader lease (%s); it expires within %ds", exc, self.ttl_s)

    async def _campaign(self) -> EtcdLease | None:
        """One attempt: the lease whose key we created, or None if someone leads."""
        asked_at = time.monotonic()
        lease = await self._client.lease(self.ttl_s)
        record = records.LeaderRecord(self.candidate_id, self.address, time.time())
        tx = self._client.transactions
        won, responses = await self._client.transaction(
            compare=[tx.version(self.key.encode()) == 0],  # absent
            success=[tx.put(self.key.encode(), record.to_json(), lease=lease)],
            failure=[tx.get(self.key.encode())],
        )
        if won:
            self._lease = lease
            self._lease_deadline = asked_at + lease.ttl  # etcd counts the TTL from no earlier than asked_at
            self.leader = record
            self.terms += 1
            log.info("%s won the election (lease %x, ttl %ds)", self.candidate_id, lease.id, lease.ttl)
            return lease
        await self._forget(lease)
        for _value, got in responses[0] if responses else []:
            self.leader = records.LeaderRecord.from_json(got.value)
        return None

    async def _forget(self, lease: EtcdLease) -> None:
        try:
            await lease.revoke()
        except Exception:  # it expires by itself
            pass

    async def _wait_for_vacancy(self) -> None:
        """Returns once the leader key is absent."""
        while True:
            got = await self._client.get(self.key.encode())
            if got is None:
                return
            self.leader = records.LeaderRecord.from_json(got.value)
            log.info("%s stands by; %s leads at %s", self.candidate_id, self.leader.scheduler_id, self.leader.address)
            watch = await self._client.watch(self.key.encode(), start_revision=got.header.revision + 1)
            try:
                # A silent watch (a lost connection aetcd has not noticed) must not
                # keep us standing by forever: after a quiet while, read the key again.
                if await asyncio.wait_for(self._until_deleted(watch), 3 * self.ttl_s):
                    log.info("%s: the leader key is gone; campaigning", self.candidate_id)
                    return
            except TimeoutError:
                pass
            finally:
                await watch.cancel()

    async def _until_deleted(self, watch) -> bool:
        async for event in watch:
            if event.kind == aetcd.EventKind.DELETE:
                return True
            self.leader = records.LeaderRecord.from_json(event.kv.value)
        return False  # the watch ended: read the key again

    async def _lead(self, lease: EtcdLease, lead: LeaderWork) -> None:
        await self._set_role(LEADER)
        term = asyncio.create_task(lead(), name=f"leader-term-{self.terms}")
        try:
            why = await self._hold(lease, term)
        finally:
            # Fence: nothing of this term acts any more before another replica can lead.
            term.cancel()
            try:
                await term
            except asyncio.CancelledError:
                if not term.cancelled():  # we ourselves are being cancelled
                    raise
            except Exception:
                log.exception("the leader's work failed")
            await self._set_role(STANDBY)
        if self._lease is lease:
            self._lease = None
            log.warning("%s steps down: %s", self.candidate_id, why)
            await self._forget(lease)  # lets a standby in at once when etcd is reachable

    async def _hold(self, lease: EtcdLease, term: asyncio.Task) -> str:
        """Keeps the lease alive while `term` runs; returns why leadership ended."""
        interval = self.ttl_s / 4
        while True:
            fence_at = self._lease_deadline - self.fence_margin_s
            now = time.monotonic()
            if now >= fence_at:
                return "the lease could not be renewed in time (etcd unreachable?)"
            done, _ = await asyncio.wait({term}, timeout=min(interval, fence_at - now))
            if done:
                return "its work ended"
            if self._lease is not lease:
                return "resigned"
            sent_at = time.monotonic()
            if sent_at >= fence_at:
                continue
            try:
                reply = await asyncio.wait_for(lease.refresh(), fence_at - sent_at)
                if reply is None or reply.TTL <= 0:
                    return "etcd says the lease expired"
                got = await asyncio.wait_for(
                    self._client.get(self.key.encode()), max(0.01, fence_at - time.monotonic())
                )
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leader lease keep-alive failed (%s)", exc)
                continue
            if got is None or got.lease != lease.id:
                return "the leader key is no longer ours"
            # Only a keep-alive whose key is still ours moves the fence.
            self._lease_deadline = sent_at + reply.TTL
