"""The scheduler's placement writes against a real etcd: one transaction per
plan, which lands only while this loop's leader record is still the leader
key's value (a deposed leader writes nothing) and no placement it read has
changed meanwhile."""

from __future__ import annotations

import asyncio

from services.common import placement_config as pc
from services.common import records
from services.common.etcd import connect
from services.scheduler.policies import ReplicaTarget
from services.scheduler.scheduler_service import SchedulerService
from services.scheduler.server import PlacementLoop

CONFIG = pc.parse([{"model_name": m, "model_path": f"/m/{m}", "init_placements": [{"gpu_ids": [0]}]} for m in "ab"])


async def placements(etcd) -> dict[str, list[dict]]:
    return {
        kv.key.decode().removeprefix(records.PLACEMENTS): records.PlacementRecord.from_json(kv.value).replicas
        for kv in await etcd.get_prefix(records.PLACEMENTS.encode())
    }


async def test_placements_are_written_only_by_the_current_leader(etcd_server):
    etcd = await connect(etcd_server.endpoint)
    try:
        me = records.LeaderRecord("me", "127.0.0.1:1", 1.0).to_json()
        await etcd.put(records.SCHEDULER_LEADER.encode(), me)
        loop = PlacementLoop(
            CONFIG,
            etcd,
            "static",
            SchedulerService(asyncio.Event()),
            asyncio.Event(),
            1.0,
            1.0,
            fence=(records.SCHEDULER_LEADER, me),
        )
        first = {"a": [ReplicaTarget("x", (0,), True)], "b": []}
        assert await loop._write_placements(first)
        assert await placements(etcd) == {
            "a": [{"agent_id": "x", "gpu_ids": [0], "active": True, "memory_limit_bytes": 0}],
            "b": [],
        }
        assert await loop._write_placements(first)  # nothing changed: nothing to write

        # Another replica leads now: this loop's writes no longer land.
        await etcd.put(records.SCHEDULER_LEADER.encode(), records.LeaderRecord("other", "127.0.0.1:2", 2.0).to_json())
        second = {"a": [ReplicaTarget("y", (0,), False)]}
        assert not await loop._write_placements(second)
        assert set(await placements(etcd)) == {"a", "b"}
        assert (await placements(etcd))["a"][0]["agent_id"] == "x"

        # Without a fence (a single replica) the write lands, b's placement goes.
        unfenced = PlacementLoop(CONFIG, etcd, "static", SchedulerService(asyncio.Event()), asyncio.Event(), 1.0, 1.0)
        assert await unfenced._write_placements(second)
        assert await placements(etcd) == {
            "a": [{"agent_id": "y", "gpu_ids": [0], "active": False, "memory_limit_bytes": 0}]
        }
    finally:
        await etcd.close()
