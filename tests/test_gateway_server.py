"""The gateway process: start-up before etcd, clean stops on SIGTERM and
SIGINT, and failing fast when it cannot listen."""

from __future__ import annotations

import signal
import socket
import time

import grpc
import httpx
import pytest
from test_gateway_support import start_gateway, stop_process, wait_until_healthy

from prism_client.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.etcd_server import EmbeddedEtcd, free_port


def test_waits_for_etcd_then_serves_and_stops_on_sigterm(tmp_path):
    etcd_port = free_port()
    log_path = tmp_path / "gateway.log"
    process, http_url, grpc_target = start_gateway(f"127.0.0.1:{etcd_port}", log_path)
    etcd = EmbeddedEtcd(tmp_path / "etcd", client_port=etcd_port)
    try:
        deadline = time.monotonic() + 20
        while True:  # up without etcd: answering, but not healthy
            try:
                health = httpx.get(http_url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and process.poll() is None, log_path.read_text()
                time.sleep(0.1)
        assert health.status_code == 503
        models = httpx.get(http_url + "/v1/models")
        assert models.status_code == 503 and "etcd" in models.json()["error"]["message"]
        with grpc.insecure_channel(grpc_target) as channel, pytest.raises(grpc.RpcError) as caught:
            gateway_pb2_grpc.GatewayStub(channel).ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        etcd.start()
        wait_until_healthy(http_url, process, log_path)
        assert httpx.get(http_url + "/v1/models").json() == {"object": "list", "data": []}

        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0, log_path.read_text()
        assert "gateway stopped" in log_path.read_text()
    finally:
        stop_process(process)
        etcd.stop()


def test_stops_cleanly_on_sigint(etcd_server, tmp_path):
    log_path = tmp_path / "gateway.log"
    process, http_url, _ = start_gateway(etcd_server.endpoint, log_path)
    try:
        wait_until_healthy(http_url, process, log_path)
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0, log_path.read_text()
    finally:
        stop_process(process)


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port"])
def test_exits_with_an_error_when_a_port_is_taken(tmp_path, flag):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log_path = tmp_path / "gateway.log"
        process, _, _ = start_gateway(f"127.0.0.1:{free_port()}", log_path, flag, str(port))
        try:
            assert process.wait(20) == 1
        finally:
            stop_process(process)
        assert f"cannot listen for {'HTTP' if flag == '--http-port' else 'gRPC'}" in log_path.read_text()
