"""Small helpers over the aetcd client that every service needs.

- connect(): a client for "host:port", waiting for etcd to answer.
- PrefixMirror: a local copy of every key under a prefix, kept current by a
  watch that resumes after errors (etcd restarts included).
- LeasedKeys: keys that live as long as this process keeps its lease alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aetcd

log = logging.getLogger(__name__)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """"127.0.0.1:2379" or "http://127.0.0.1:2379" -> ("127.0.0.1", 2379)."""
    rest = endpoint.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
    return host, int(port)


async def connect(endpoint: str, timeout_s: float = 30.0) -> aetcd.Client:
    """Returns a connected client, retrying until etcd answers or timeout_s."""
    host, port = parse_endpoint(endpoint)
    deadline = time.monotonic() + timeout_s
    while True:
        client = aetcd.Client(host=host, port=port, timeout=5)
        try:
            await client.connect()
            await client.status()
            return client
        except Exception as exc:  # aetcd wraps grpc errors in its own types
            await client.close()
            if time.monotonic() > deadline:
                raise ConnectionError(f"etcd at {endpoint} did not answer within {timeout_s:.0f}s: {exc}") from exc
            await asyncio.sleep(0.3)


OnChange = Callable[[str, bytes | None], Awaitable[None] | None]


class PrefixMirror:
    """Mirrors every key under `prefix` into `self.items` (key -> value bytes).

    run() loads the prefix, then follows a watch from the loaded revision, so
    no change between the two is missed. On any error it reloads from scratch
    after a short pause, which also covers a restarted etcd. `on_change(key,
    value_or_None)` is called for every change after the first load;
    `ready` is set once the first load is done.
    """

    def __init__(self, client: aetcd.Client, prefix: str, on_change: OnChange | None = None):
        self._client = client
        self.prefix = prefix
        self.items: dict[str, bytes] = {}
        self.ready = asyncio.Event()
        self._on_change = on_change

    async def _notify(self, key: str, value: bytes | None) -> None:
        if self._on_change is not None:
            result = self._on_change(key, value)
            if asyncio.iscoroutine(result):
                await result

    async def run(self) -> None:
        while True:
            try:
                await self._load_and_follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watch on %s lost (%s); reloading", self.prefix, exc)
                await asyncio.sleep(0.5)

    async def _load_and_follow(self) -> None:
        result = await self._client.get_prefix(self.prefix.encode())
        fresh = {kv.key.decode(): kv.value for kv in result}
        old = self.items
        self.items = fresh
        if self.ready.is_set():  # a reload: report what changed while we were away
            for key in old.keys() - fresh.keys():
                await self._notify(key, None)
            for key, value in fresh.items():
                if old.get(key) != value:
                    await self._notify(key, value)
        self.ready.set()
        revision = result.header.revision
        watch = await self._client.watch_prefix(self.prefix.encode(), start_revision=revision + 1)
        async for event in watch:
            key = event.kv.key.decode()
            if event.kind == aetcd.EventKind.DELETE:
                self.items.pop(key, None)
                await self._notify(key, None)
            else:
                self.items[key] = event.kv.value
                await self._notify(key, event.kv.value)


class LeasedKeys:
    """Keys that exist while this process is alive.

    They are written under one lease that run() refreshes every ttl/3
    seconds. When the lease is lost (etcd restarted, a long pause) a new
    lease is granted and every key is written again.
    """

    def __init__(self, client: aetcd.Client, ttl_s: int = 5):
        self._client = client
        self.ttl_s = ttl_s
        self._values: dict[str, bytes] = {}
        self._lease: aetcd.Lease | None = None
        self._lock = asyncio.Lock()

    async def put(self, key: str, value: bytes) -> None:
        async with self._lock:
            self._values[key] = value
            if self._lease is None:
                await self._new_lease()
            else:
                await self._client.put(key.encode(), value, lease=self._lease)

    async def delete(self, key: str) -> None:
        async with self._lock:
            self._values.pop(key, None)
            await self._client.delete(key.encode())

    async def _new_lease(self) -> None:
        self._lease = await self._client.lease(self.ttl_s)
        for key, value in self._values.items():
            await self._client.put(key.encode(), value, lease=self._lease)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                async with self._lock:
                    if self._lease is None:
                        await self._new_lease()
                        continue
                    reply = await self._lease.refresh()
                    if reply is None or reply.TTL <= 0:  # expired: the keys are gone, write them anew
                        log.warning("etcd lease %s expired; registering again", self._lease.id)
                        await self._new_lease()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease keep-alive failed (%s); retrying", exc)
                self._lease = None

    async def revoke(self) -> None:
        """Removes every key at once (a clean shutdown)."""
        async with self._lock:
            if self._lease is not None:
                try:
                    await self._lease.revoke()
                finally:
                    self._lease = None
