"""The etcd helpers against a real etcd: leases expire, mirrors follow."""

from __future__ import annotations

import asyncio

from services.common.etcd import LeasedKeys, PrefixMirror, connect, parse_endpoint


def test_parse_endpoint():
    assert parse_endpoint("127.0.0.1:2379") == ("127.0.0.1", 2379)
    assert parse_endpoint("http://etcd:2379/") == ("etcd", 2379)


async def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_mirror_follows_puts_and_deletes(etcd_server):
    client = await connect(etcd_server.endpoint)
    seen = []
    mirror = PrefixMirror(client, "/t/", lambda k, v: seen.append((k, v)))
    await client.put(b"/t/before", b"1")
    task = asyncio.create_task(mirror.run())
    await asyncio.wait_for(mirror.ready.wait(), 5)
    assert mirror.items == {"/t/before": b"1"}
    await client.put(b"/t/after", b"2")
    await client.put(b"/other", b"x")
    await client.delete(b"/t/before")
    await wait_for(lambda: mirror.items == {"/t/after": b"2"})
    assert seen == [("/t/after", b"2"), ("/t/before", None)]
    task.cancel()
    await client.close()


async def test_leased_keys_vanish_when_keepalive_stops_and_mirror_sees_it(etcd_server):
    owner = await connect(etcd_server.endpoint)
    reader = await connect(etcd_server.endpoint)
    leased = LeasedKeys(owner, ttl_s=2)
    keepalive = asyncio.create_task(leased.run())
    await leased.put("/agents/a1", b"alive")
    mirror = PrefixMirror(reader, "/agents/")
    follow = asyncio.create_task(mirror.run())
    await asyncio.wait_for(mirror.ready.wait(), 5)
    await asyncio.sleep(3)  # longer than the TTL: kept alive by run()
    assert mirror.items == {"/agents/a1": b"alive"}
    keepalive.cancel()  # the owner "dies"
    await wait_for(lambda: not mirror.items, timeout_s=6)
    follow.cancel()
    await owner.close()
    await reader.close()


async def test_revoke_removes_keys_at_once(etcd_server):
    client = await connect(etcd_server.endpoint)
    leased = LeasedKeys(client, ttl_s=30)
    await leased.put("/agents/a2", b"x")
    await leased.revoke()
    assert list(await client.get_prefix(b"/agents/")) == []
    await client.close()


async def test_mirror_and_lease_survive_an_etcd_restart(etcd_server):
    client = await connect(etcd_server.endpoint)
    leased = LeasedKeys(client, ttl_s=2)
    keepalive = asyncio.create_task(leased.run())
    await leased.put("/agents/a3", b"x")
    mirror = PrefixMirror(client, "/agents/")
    follow = asyncio.create_task(mirror.run())
    await asyncio.wait_for(mirror.ready.wait(), 5)
    etcd_server.stop()
    await asyncio.sleep(1)
    etcd_server.start()
    await asyncio.sleep(3)  # the old lease may have expired while etcd was down
    await wait_for(lambda: mirror.items.get("/agents/a3") == b"x", timeout_s=10)
    assert (await client.get(b"/agents/a3")).value == b"x"
    keepalive.cancel()
    follow.cancel()
    await client.close()


def test_etcd_on_chosen_ports_moves_when_another_process_took_one(tmp_path):
    import socket

    from services.common.etcd_server import EmbeddedEtcd

    etcd = EmbeddedEtcd(tmp_path / "etcd")
    taken = etcd.client_port
    with socket.socket() as squatter:  # takes the port between choosing it and etcd binding it
        squatter.bind(("127.0.0.1", taken))  # bound, not listening: a connect does not mistake it for etcd
        etcd.start()
        try:
            assert etcd.client_port != taken
            assert "address already in use" in (tmp_path / "etcd" / "etcd.log").read_text()
        finally:
            etcd.stop()
    # Ports the caller gave are not moved: the clash is an error that says so.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        fixed = EmbeddedEtcd(tmp_path / "fixed", client_port=squatter.getsockname()[1])
        try:
            fixed.start()
        except RuntimeError as exc:
            assert "address already in use" in str(exc)
        else:
            fixed.stop()
            raise AssertionError("etcd started on a port another socket holds")
