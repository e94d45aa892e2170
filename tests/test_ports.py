"""Ports for local services: free_port never hands a process the same port twice, and a gRPC server of
ours refuses a port another one listens on instead of sharing it (SO_REUSEPORT off)."""

from __future__ import annotations

import grpc
import pytest

from services.common.etcd_server import free_port
from services.common.grpc_util import REUSE_NO_PORT


def test_free_port_never_hands_out_a_port_twice():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


async def test_a_second_server_on_a_taken_port_fails_to_bind_rather_than_share_it():
    port = free_port()
    first = grpc.aio.server(options=[REUSE_NO_PORT])
    assert first.add_insecure_port(f"127.0.0.1:{port}") == port
    await first.start()
    try:
        second = grpc.aio.server(options=[REUSE_NO_PORT])
        with pytest.raises(RuntimeError):
            second.add_insecure_port(f"127.0.0.1:{port}")
    finally:
        await first.stop(None)
