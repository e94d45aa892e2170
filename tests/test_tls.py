"""Transport security (services/common/tls.py): the local CA's certificates,
real gRPC servers over TLS and mTLS refusing the clients they must refuse,
the SDK with a CA and a client certificate, etcd over TLS with client
certificates and as an etcd user, and a whole cluster started like
`prism up --tls` serving generations end to end (SDK, REST, prism bench)
with mTLS between its services."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prism.cluster import LocalCluster
from prism.workload.replay import replay
from prism.workload.trace import Trace, TraceRequest
from prism_client.v1 import gateway_pb2, gateway_pb2_grpc
from services.common import tls
from services.common.etcd import (
    ETCD_PASSWORD_ENV,
    EtcdAccess,
    EtcdLoginRefused,
    PrefixMirror,
    connect,
    etcd_access,
)
from services.common.etcd_server import EmbeddedEtcd, etcd_binary, free_port
from services.common.grpc_util import add_health_and_reflection, mark_serving
from services.common.tls import TlsConfigError, TlsFiles

GUARD_S = 30


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, TlsFiles]:
    """A CA with a server, a client and an etcd certificate for loopback."""
    return tls.local_pki(tmp_path_factory.mktemp("pki"), ["server", "client", "etcd"])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> dict[str, TlsFiles]:
    """Another CA's client and server: valid certificates nobody here trusts."""
    return tls.local_pki(tmp_path_factory.mktemp("other-pki"), ["client", "server"])


# ---- certificates -----------------------------------------------------------------


def test_local_ca_issues_server_and_client_certificates_for_the_hosts(tmp_path):
    files = tls.local_pki(tmp_path, ["agent"], hosts=["127.0.0.1", "::1", "localhost", "gpu-7.example"])["agent"]
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())

    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "gpu-7.example"}
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}  # every service is both
    for key in (files.key, tmp_path / tls.CA_KEY):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    files.check()  # the key is the certificate's

    # A second run keeps the CA (clients keep trusting it) and issues a new certificate.
    again = tls.local_pki(tmp_path, ["agent"])["agent"]
    assert again.ca.read_bytes() == files.ca.read_bytes()
    x509.load_pem_x509_certificate(again.cert.read_bytes()).verify_directly_issued_by(ca)


def test_bad_tls_settings_are_errors_that_name_the_option_and_the_file(tmp_path, pki):
    missing = tmp_path / "nope.pem"
    with pytest.raises(TlsConfigError, match=f"--tls-ca {missing}: cannot read it"):
        tls.client_tls(ca=missing)
    with pytest.raises(TlsConfigError, match="--tls-cert needs --tls-key"):
        tls.client_tls(ca=pki["client"].ca, cert=pki["client"].cert)
    with pytest.raises(TlsConfigError, match="tls_key .* is not the key of tls_cert"):
        tls.client_tls(cert=pki["client"].cert, key=pki["server"].key, options="tls")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(TlsConfigError, match=f"--etcd-ca {not_pem}: not a PEM certificate"):
        etcd_access(ca=str(not_pem))
    with pytest.raises(TlsConfigError, match=ETCD_PASSWORD_ENV):
        etcd_access(user="prism", environ={})
    assert etcd_access(user="prism", environ={ETCD_PASSWORD_ENV: "s3cret"}).password == "s3cret"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tls-cert", "CERT"], "--tls-cert needs --tls-key"),
        (["--tls-ca", "CA"], "--tls-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "CERT", "--tls-key", "KEY", "--mtls"], "--mtls needs --tls-ca"),
        (["--mtls"], "--mtls needs --tls-ca"),
        (["--tls-cert", "CERT", "--tls-key", "MISSING"], "--tls-key .*missing.pem: cannot read it"),
    ],
)
def test_a_service_refuses_a_tls_flag_without_its_pair(pki, tmp_path, capsys, flags, message):
    from services.scheduler.server import parse_args

    paths = {
        "CERT": pki["server"].cert,
        "KEY": pki["server"].key,
        "CA": pki["server"].ca,
        "MISSING": tmp_path / "missing.pem",
    }
    with pytest.raises(SystemExit) as exited:
        parse_args(["--config", "models.json", *[str(paths.get(f, f)) for f in flags]])
    assert exited.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--http-tls-cert", "CERT"], "--http-tls-cert needs --http-tls-key"),
        (
            ["--http-tls-cert", "CERT", "--http-tls-key", "OTHER_KEY"],
            "--http-tls-key .* is not the key of --http-tls-cert",
        ),
        (["--etcd-user", "prism"], ETCD_PASSWORD_ENV),
    ],
)
def test_the_gateway_refuses_bad_https_and_etcd_flags(pki, capsys, monkeypatch, flags, message):
    from services.gateway.server import parse_args

    monkeypatch.delenv(ETCD_PASSWORD_ENV, raising=False)
    paths = {"CERT": pki["server"].cert, "OTHER_KEY": pki["client"].key}
    with pytest.raises(SystemExit) as exited:
        parse_args([str(paths.get(f, f)) for f in flags])
    assert exited.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_service_takes_its_tls_and_etcd_flags(pki):
    from services.gpu_agent.server import parse_args

    server, client = pki["server"], pki["client"]
    args = parse_args(
        [
            *tls.service_tls_args(server, mtls=True),
            "--etcd-ca",
            str(client.ca),
            "--etcd-cert",
            str(client.cert),
            "--etcd-key",
            str(client.key),
        ]
    )
    assert args.tls_files == server and args.mtls
    assert args.etcd_access == EtcdAccess(tls=TlsFiles(client.ca, client.cert, client.key))
    assert parse_args([]).tls_files is None  # plaintext stays the default


# ---- gRPC over TLS and mTLS -------------------------------------------------------


async def start_health_server(files: TlsFiles, require_client_cert: bool) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    health = add_health_and_reflection(server, [])
    port = tls.add_port(server, "127.0.0.1:0", files, require_client_cert)
    assert port > 0
    await server.start()
    await mark_serving(health, [])
    return server, f"127.0.0.1:{port}"


async def health_check(address: str, files: TlsFiles | None) -> grpc.StatusCode:
    async with tls.aio_channel(address, files) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=GUARD_S)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_tls_server_serves_clients_that_trust_its_ca(pki, other_pki):
    server, address = await start_health_server(pki["server"], require_client_cert=False)
    try:
        assert await health_check(address, TlsFiles(ca=pki["server"].ca)) == grpc.StatusCode.OK
        # A client that trusts another CA does not accept this server; a plaintext client gets nowhere.
        assert await health_check(address, TlsFiles(ca=other_pki["client"].ca)) == grpc.StatusCode.UNAVAILABLE
        assert await health_check(address, None) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_mtls_server_refuses_clients_without_a_certificate_of_its_ca(pki, other_pki):
    server, address = await start_health_server(pki["server"], require_client_cert=True)
    ca = pki["server"].ca
    try:
        assert await health_check(address, pki["client"]) == grpc.StatusCode.OK
        assert await health_check(address, TlsFiles(ca=ca)) == grpc.StatusCode.UNAVAILABLE  # no certificate
        stranger = TlsFiles(ca=ca, cert=other_pki["client"].cert, key=other_pki["client"].key)
        assert await health_check(address, stranger) == grpc.StatusCode.UNAVAILABLE  # another CA's certificate
    finally:
        await server.stop(None)


async def test_a_peer_reached_by_address_is_checked_for_the_shared_service_name(tmp_path):
    """In Kubernetes the agents and schedulers are dialled by pod IP, which no certificate can name: their
    certificates share one name, and the callers check for it (--tls-server-name) instead of the host."""
    from dataclasses import replace

    pki = tls.local_pki(tmp_path, ["server", "client"], hosts=["prism-internal"])
    server, address = await start_health_server(pki["server"], require_client_cert=True)
    try:
        assert await health_check(address, pki["client"]) == grpc.StatusCode.UNAVAILABLE  # 127.0.0.1 is not named
        named = replace(pki["client"], server_name="prism-internal")
        assert await health_check(address, named) == grpc.StatusCode.OK
        assert await health_check(address, replace(named, server_name="someone-else")) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)
    assert tls.service_tls_args(named, mtls=True)[-3:] == ["--tls-server-name", "prism-internal", "--mtls"]


async def test_the_health_probe_checks_a_server_over_its_mtls(pki, capsys):
    """python -m services.common.health_probe: exit 0 for SERVING over mTLS with the caller's certificate,
    1 with the reason for a server that refuses it or is not there (Kubernetes' exec probe)."""
    from services.common import health_probe

    server, address = await start_health_server(pki["server"], require_client_cert=True)
    client = pki["client"]
    flags = ["--tls-ca", str(client.ca), "--tls-cert", str(client.cert), "--tls-key", str(client.key)]
    try:
        assert await asyncio.to_thread(health_probe.main, [address, *flags]) == 0
        assert capsys.readouterr().out.strip() == f"{address}: SERVING"
        assert (
            await asyncio.to_thread(health_probe.main, [address, "--tls-ca", str(client.ca), "--timeout-s", "2"]) == 1
        )
        assert "UNAVAILABLE" in capsys.readouterr().out
    finally:
        await server.stop(None)
    assert await asyncio.to_thread(health_probe.main, [address, *flags, "--timeout-s", "1"]) == 1
    with pytest.raises(SystemExit):
        health_probe.main([address, "--tls-server-name", "x"])  # a name without TLS


class ListOnlyGateway(gateway_pb2_grpc.GatewayServicer):
    async def ListModels(self, request, context):
        return gateway_pb2.ListModelsResponse(models=[gateway_pb2.ModelInfo(name="m", available=True, max_context=8)])


async def test_sdk_clients_take_a_ca_and_a_client_certificate(pki, tmp_path):
    from prism_client import AsyncPrismClient, PrismClient, TlsConfigError, UnavailableError

    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(ListOnlyGateway(), server)
    port = tls.add_port(server, "127.0.0.1:0", pki["server"], require_client_cert=True)
    await server.start()
    target, client = f"127.0.0.1:{port}", pki["client"]
    try:
        async with AsyncPrismClient(target, tls_ca=client.ca, tls_cert=client.cert, tls_key=client.key) as sdk:
            assert [m.name for m in await sdk.list_models()] == ["m"]
        async with AsyncPrismClient(target, tls_ca=client.ca, timeout_s=GUARD_S) as without_cert:
            with pytest.raises(UnavailableError):
                await without_cert.list_models()
        with pytest.raises(TlsConfigError, match="tls_ca .*nope.pem: cannot read it"):
            PrismClient(target, tls_ca=tmp_path / "nope.pem")
        with pytest.raises(TlsConfigError, match="tls_cert needs tls_key"):
            PrismClient(target, tls_cert=client.cert)

        def blocking_list() -> list[str]:
            with PrismClient(target, tls_ca=str(client.ca), tls_cert=str(client.cert), tls_key=str(client.key)) as sdk:
                return [m.name for m in sdk.list_models()]

        assert await asyncio.to_thread(blocking_list) == ["m"]
    finally:
        await server.stop(None)


# ---- etcd ---------------------------------------------------------------------------


async def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_etcd_over_tls_with_client_certificates(tmp_path, pki, other_pki):
    server = EmbeddedEtcd(tmp_path / "etcd", tls=pki["etcd"])
    server.start()
    try:
        client = await connect(server.endpoint, timeout_s=GUARD_S, access=EtcdAccess(tls=pki["client"]))
        mirror = PrefixMirror(client, "/tls/")
        follow = asyncio.create_task(mirror.run())
        await asyncio.wait_for(mirror.ready.wait(), GUARD_S)
        await client.put(b"/tls/a", b"1")
        await wait_for(lambda: mirror.items.get("/tls/a") == b"1", "the watch over TLS")
        follow.cancel()
        await client.close()

        # etcd requires a client certificate of its CA; plaintext gets nowhere either.
        stranger = TlsFiles(ca=pki["client"].ca, cert=other_pki["client"].cert, key=other_pki["client"].key)
        for access in (EtcdAccess(tls=TlsFiles(ca=pki["client"].ca)), EtcdAccess(tls=stranger), EtcdAccess()):
            with pytest.raises(ConnectionError, match="did not answer"):
                await connect(server.endpoint, timeout_s=0.5, access=access)
    finally:
        server.stop()


def etcdctl(endpoint: str, *args: str) -> None:
    ctl = Path(etcd_binary()).parent / "etcdctl"
    if not ctl.exists():
        pytest.skip(f"no etcdctl next to {etcd_binary()}")
    subprocess.run([str(ctl), "--endpoints", endpoint, *args], check=True, capture_output=True, timeout=GUARD_S)


async def test_etcd_user_and_password_and_a_new_token_after_an_etcd_restart(etcd_server):
    etcdctl(etcd_server.endpoint, "user", "add", "root", "--new-user-password=root-pw")
    etcdctl(etcd_server.endpoint, "user", "grant-role", "root", "root")
    etcdctl(etcd_server.endpoint, "auth", "enable")

    with pytest.raises(EtcdLoginRefused, match="refused user 'root'.*authentication failed"):
        await connect(etcd_server.endpoint, timeout_s=GUARD_S, access=EtcdAccess(user="root", password="wrong"))
    anonymous = await connect(etcd_server.endpoint, timeout_s=GUARD_S)  # etcd answers status to anyone ...
    with pytest.raises(Exception, match="user name is empty"):
        await anonymous.get(b"/auth/a")  # ... but not reads
    await anonymous.close()

    client = await connect(etcd_server.endpoint, timeout_s=GUARD_S, access=EtcdAccess(user="root", password="root-pw"))
    await client.put(b"/auth/a", b"1")
    mirror = PrefixMirror(client, "/auth/")
    follow = asyncio.create_task(mirror.run())
    await asyncio.wait_for(mirror.ready.wait(), GUARD_S)
    assert mirror.items == {"/auth/a": b"1"}

    # A restarted etcd has forgotten every token: the client gets a new one, and its watch follows.
    etcd_server.stop()
    etcd_server.start()
    deadline = time.monotonic() + GUARD_S
    while True:
        try:
            await client.put(b"/auth/b", b"2")
            break
        except Exception:  # etcd still coming back
            assert time.monotonic() < deadline, "no write after the restart"
            await asyncio.sleep(0.2)
    await wait_for(lambda: mirror.items.get("/auth/b") == b"2", "the watch after the restart")
    follow.cancel()
    await client.close()


# ---- a whole cluster, as `prism up --tls` starts it ---------------------------------


@pytest.fixture()
def tls_cluster(tmp_path) -> Iterator[LocalCluster]:
    """The two tiny models on one CPU agent, every service started as `prism up --tls` starts it."""
    cluster = LocalCluster(
        state_dir=tmp_path,
        http_port=free_port(),
        grpc_port=free_port(),
        device="cpu",
        cpu_memory_gb=1.0,
        engine_isolation="inline",
        tls=True,
        default_models="tiny",
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_cluster_under_tls_serves_a_generation_with_mtls_between_services(tls_cluster):
    from prism.cluster_view import ClusterReader
    from prism_client import PrismClient, UnavailableError

    cluster = tls_cluster
    ca = cluster.ca_path
    with PrismClient(cluster.gateway_grpc, tls_ca=ca, timeout_s=GUARD_S) as client:
        completion = client.generate("tiny-llama", "hello", max_tokens=4, temperature=0)
    assert completion.completion_tokens >= 1 and completion.finish_reason in ("stop", "length")
    with PrismClient(cluster.gateway_grpc, timeout_s=GUARD_S) as plaintext, pytest.raises(UnavailableError):
        plaintext.list_models()

    listed = httpx.get(
        cluster.http_url + "/v1/models", verify=tls.ssl_context(TlsFiles(ca=ca)), timeout=GUARD_S
    ).json()["data"]
    assert {m["id"] for m in listed} == {"tiny-llama", "tiny-qwen2"}
    assert cluster.http_url.startswith("https://")

    # prism bench over both APIs, trusting the CA.
    trace = Trace((TraceRequest(0.0, "tiny-qwen2", 4, 3), TraceRequest(0.0, "tiny-llama", 4, 3)))
    for api in ({"http_url": cluster.http_url}, {"grpc_address": cluster.gateway_grpc}):
        results = asyncio.run(replay(trace, **api, tls=TlsFiles(ca=ca)))
        assert [(r.error, r.e2e_s is not None) for r in results] == [(None, True)] * 2, api

    async def read(files: TlsFiles | None):
        reader = ClusterReader(cluster.etcd_endpoint, GUARD_S, etcd_access=cluster.client_etcd_access(), tls=files)
        try:
            return await reader.read()
        finally:
            await reader.close()

    # The agent answers its status to a client with a certificate of the CA only (mTLS).
    with_cert = asyncio.run(read(cluster.client_tls()))
    assert [a.status is not None for a in with_cert.agents] == [True]
    assert {e.model for e in with_cert.agents[0].status.engines} == {"tiny-llama", "tiny-qwen2"}
    without_cert = asyncio.run(read(TlsFiles(ca=ca)))
    assert [a.error for a in without_cert.agents] == ["no status (UNAVAILABLE)"]
    # The scheduler and the agent serve mTLS only, so the loads above and the agent's load reports
    # went over mTLS; the logs say so.
    logs = {name: cluster.log_tail(name, 200) for name in ("scheduler", "agent", "gateway")}
    assert "(mTLS)" in logs["scheduler"] and "(mTLS)" in logs["agent"], json.dumps(logs)[:2000]
    assert "registered with scheduler" in logs["agent"], logs["agent"]
    assert "REST on https://" in logs["gateway"], logs["gateway"]
