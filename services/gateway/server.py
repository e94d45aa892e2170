"""Gateway process: the OpenAI-compatible REST API (uvicorn) and the
prism.v1.Gateway gRPC API, in one asyncio loop over one router.

    python -m services.gateway.server --etcd 127.0.0.1:2379 \
        --http-host 127.0.0.1 --http-port 8000 --grpc-host 127.0.0.1 --grpc-port 50050 \
        [--request-timeout-s 600] [--agent-keepalive-s 10] [--cold-start-timeout-s 30] [--gateway-id ID] \
        [--api-keys-file FILE] [--metrics-auth] [--max-request-bytes N] [--max-prompt-chars N] \
        [--max-tokens-cap N] [--max-concurrent-streams N] [--rate-limit-rps R] [--rate-limit-burst N] \
        [--tls-cert PEM --tls-key PEM [--tls-ca PEM] [--mtls]] [--http-tls-cert PEM --http-tls-key PEM] \
        [--etcd-ca PEM --etcd-cert PEM --etcd-key PEM] [--etcd-user USER]  (its password: $PRISM_ETCD_PASSWORD)

Both servers listen at once; until the router has loaded the cluster state
from etcd, /health answers 503 and requests fail with 503 / UNAVAILABLE.

SIGINT or SIGTERM drains it: gRPC health goes NOT_SERVING, new requests are
refused while both servers still listen (REST: 503 with Retry-After, /health
503, /metrics still answers; gRPC: UNAVAILABLE), the requests in flight may
finish for SHUTDOWN_GRACE_S less END_MARGIN_S, the ones still going then end
with an explicit error (GatewayShuttingDown: an SSE error event and [DONE],
a 503, UNAVAILABLE with the request id; never a cut stream), and the process
exits 0 once the servers have flushed them.

A request for a model that no live agent serves yet waits for it (up to the
model's TTFT SLO plus --cold-start-timeout-s) while the gateway publishes the
demand in etcd for the scheduler: services/gateway/cold_start.py.

API keys (--api-keys-file and/or PRISM_API_KEYS) and the per-client limits:
services/gateway/auth.py, limits.py and access.py; docs/security.md.

TLS (services/common/tls.py, docs/security.md): --tls-cert/--tls-key serve
the gRPC API over TLS (--mtls: only to clients with a certificate of
--tls-ca) and are the client certificate of the calls to the agents, which
--tls-ca verifies; --http-tls-cert/--http-tls-key serve REST over HTTPS, with
a public certificate that may differ from the internal one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from prism_client.v1 import generate_pb2
from services.common.etcd import add_etcd_args, etcd_access_from_args
from services.common.grpc_util import REUSE_NO_PORT, add_health_and_reflection, mark_not_serving, mark_serving
from services.common.logs import setup_logging
from services.common.tls import TlsConfigError, TlsFiles, add_port, add_tls_args, tls_from_args, transport_name
from services.gateway.access import AccessControl
from services.gateway.auth import ENV_VAR, KeyFileError, KeyStore, load_key_store
from services.gateway.cold_start import DEFAULT_ALLOWANCE_S, ColdStart, DemandPublisher
from services.gateway.errors import error_body
from services.gateway.grpc_gateway import SERVICE_NAME, add_gateway_service
from services.gateway.limits import LIMIT_FIELDS, Limits, limit_problem
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_api import create_app
from services.gateway.relay import GatewayShuttingDown, Relay
from services.gateway.request_ids import HEADER, OTHER_PREFIX, choose_request_id, new_request_id, prefix_for
from services.gateway.router import DEFAULT_AGENT_KEEPALIVE_S, Router

log = logging.getLogger("gateway")

SHUTDOWN_GRACE_S = 5.0
# Of the grace, what is kept for ending the requests still in flight explicitly and flushing them.
END_MARGIN_S = 1.0
DRAIN_POLL_S = 0.05
# How long an idle keep-alive REST connection stays open. Longer than the clients' own idle expiry (httpx,
# and so the openai SDK: 5 s; aiohttp 15 s) and a load balancer's (60 s is usual), so that the client is the
# one to close it: at uvicorn's 5 s, under load (a busy loop notices the timer late, a busy client reuses
# the connection late) the gateway closed connections a client had just sent a request on, unread, and
# the client got a connection reset for a request the gateway never saw.
HTTP_KEEP_ALIVE_S = 75


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Prism gateway: OpenAI-compatible REST and prism.v1.Gateway gRPC")
    p.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoint host:port")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=50050)
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=600.0,
        help="deadline of every agent call, a whole streamed generation included",
    )
    p.add_argument(
        "--agent-keepalive-s",
        type=float,
        default=DEFAULT_AGENT_KEEPALIVE_S,
        help="ping each agent connection with calls open this often; one that does not answer a ping "
        "within as long (a frozen agent, a partition) is dropped and its requests fail with "
        "503 / UNAVAILABLE instead of waiting out --request-timeout-s",
    )
    p.add_argument(
        "--cold-start-timeout-s",
        type=float,
        default=DEFAULT_ALLOWANCE_S,
        help="how long beyond its TTFT SLO a request waits for its model to become servable "
        "(loaded and switched on somewhere) before it fails with 503; 0: fail at once",
    )
    p.add_argument(
        "--gateway-id", default=None, help="names this gateway's demand records in etcd (default: HOSTNAME-HTTP_PORT)"
    )
    p.add_argument(
        "--api-keys-file",
        type=Path,
        default=None,
        help=f"YAML or JSON list of API keys (see docs/security.md); {ENV_VAR} adds comma-separated "
        "keys for every model. Without any key, authentication is off",
    )
    p.add_argument("--metrics-auth", action="store_true", help="/metrics requires an API key too")
    defaults = Limits()
    limit_help = {
        "max_request_bytes": "largest request body (REST) or message (gRPC); larger: 413 / RESOURCE_EXHAUSTED",
        "max_prompt_chars": "longest prompt, or all chat messages together, in characters; longer: 400",
        "max_tokens_cap": "largest max_tokens a request may ask for; larger: 400",
        "max_concurrent_streams": "generations in flight per client (API key), streamed or not; more: 429; 0: no limit",
        "rate_limit_rps": "requests per second per client (token bucket); over: 429 with Retry-After; 0: no limit",
        "rate_limit_burst": "requests a client may send at once after a quiet spell; 0: one second's worth",
    }
    for name, (kind, _) in LIMIT_FIELDS.items():
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=getattr(defaults, name),
            help=f"{limit_help[name]} (default %(default)s; a key's `limits:` overrides it)",
        )
    add_tls_args(p)
    p.add_argument(
        "--http-tls-cert",
        default=None,
        metavar="PEM",
        help="serve REST over HTTPS with this certificate (may differ from --tls-cert)",
    )
    p.add_argument("--http-tls-key", default=None, metavar="PEM", help="the private key of --http-tls-cert")
    add_etcd_args(p)
    args = p.parse_args(argv)
    try:
        args.tls_files = tls_from_args(args)
        args.http_tls = http_tls_from_args(args)
        args.etcd_access = etcd_access_from_args(args)
    except TlsConfigError as exc:
        p.error(str(exc))
    if args.request_timeout_s <= 0:
        p.error("--request-timeout-s must be positive")
    if args.agent_keepalive_s <= 0:
        p.error("--agent-keepalive-s must be positive")
    if args.cold_start_timeout_s < 0:
        p.error("--cold-start-timeout-s must not be negative")
    for name in LIMIT_FIELDS:
        problem = limit_problem(name, getattr(args, name))
        if problem is not None:
            p.error(f"--{name.replace('_', '-')}: {problem}")
    return args


def http_tls_from_args(args: argparse.Namespace) -> TlsFiles | None:
    """The REST API's certificate and key (None: plain HTTP)."""
    if args.http_tls_cert is None and args.http_tls_key is None:
        return None
    files = TlsFiles(
        cert=Path(args.http_tls_cert) if args.http_tls_cert else None,
        key=Path(args.http_tls_key) if args.http_tls_key else None,
        options="--http-tls",
    )
    files.check()
    return files


def limits_of(args: argparse.Namespace) -> Limits:
    """The default limits of every client, from the flags."""
    return Limits(**{name: getattr(args, name) for name in LIMIT_FIELDS})


def _log_auth(keys: KeyStore, args: argparse.Namespace) -> None:
    if not keys.enabled:
        log.warning("authentication is off: no --api-keys-file and no %s; every client is 'anonymous'", ENV_VAR)
        if args.metrics_auth:
            log.warning("--metrics-auth has no effect without API keys")
        return
    log.info(
        "authentication is on: %d API key(s) (%s); /metrics %s",
        len(keys.keys),
        ", ".join(key.name for key in keys.keys),
        "needs a key" if args.metrics_auth else "is open",
    )


class HttpGate:
    """The REST app behind a gate that counts the requests inside; once
    closed, it answers every new request 503 itself (/metrics still
    answers), with Connection: close so keep-alive clients go elsewhere."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.closed = False
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.closed and scope["path"] != "/metrics":
            await self._refuse(scope, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    @staticmethod
    async def _refuse(scope: Scope, send: Send) -> None:
        if scope["path"] == "/health":
            body: dict = {"status": "shutting down"}
        else:
            request_id = new_request_id(OTHER_PREFIX)
            body = error_body(
                GatewayShuttingDown(
                    f"the gateway is shutting down: {scope['method']} {scope['path']} "
                    "was not taken; send it to another gateway or again later"
                ),
                request_id,
            )
        payload = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"retry-after", b"1"),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


class GrpcGate(grpc.aio.ServerInterceptor):
    """Once closed, the gateway service's calls are refused with UNAVAILABLE
    (health and reflection still answer)."""

    def __init__(self) -> None:
        self.closed = False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if not self.closed or handler is None or not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler

        async def refuse(request, context: grpc.aio.ServicerContext) -> None:
            request_id = (
                choose_request_id(request.request_id, prefix_for(request))
                if isinstance(request, generate_pb2.GenerateRequest)
                else new_request_id(OTHER_PREFIX)
            )
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the gateway is shutting down: the call was not taken; send it to another gateway or again later",
                trailing_metadata=((HEADER, request_id),),
            )

        make = (
            grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
        )
        if handler.request_streaming:  # the gateway has no such call; leave it to the servicer
            return handler
        return make(
            refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


async def drain(
    http_gate: HttpGate,
    grpc_gate: GrpcGate,
    relay: Relay,
    grace_s: float = SHUTDOWN_GRACE_S,
    end_margin_s: float = END_MARGIN_S,
) -> None:
    """Closes both gates, waits for the requests in flight (REST requests
    inside the gate, generations of either API in the relay) for up to
    grace_s - end_margin_s, then ends those left explicitly and gives them
    up to end_margin_s to be sent."""
    http_gate.closed = grpc_gate.closed = True
    loop = asyncio.get_running_loop()
    start = loop.time()

    def busy() -> bool:
        return http_gate.in_flight > 0 or relay.in_flight > 0

    if busy():
        log.info(
            "draining: %d REST request(s) and %d generation(s) in flight get up to %.1fs",
            http_gate.in_flight,
            relay.in_flight,
            grace_s - end_margin_s,
        )
    while busy() and loop.time() - start < grace_s - end_margin_s:
        await asyncio.sleep(DRAIN_POLL_S)
    if busy():
        left = relay.end_all()
        log.warning("grace of %.1fs over: ending %d generation(s) still in flight with an error", grace_s, left)
        ended_at = loop.time()
        while busy() and loop.time() - ended_at < end_margin_s / 2:
            await asyncio.sleep(DRAIN_POLL_S)
    else:
        relay.end_all()  # nothing in flight: anything that still slips in fails at once
    log.info("drained in %.2fs", loop.time() - start)


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: this process handles the
    signals and stops both servers together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket | None:
    """The HTTP listening socket, bound here so a taken port is a clean error
    (uvicorn's own bind failure exits the process from inside a task)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        return sock
    except OSError as exc:
        log.error("cannot listen for HTTP on %s:%d: %s", host, port, exc)
        return None


async def serve(args: argparse.Namespace) -> int:
    try:
        keys = load_key_store(args.api_keys_file, os.environ.get(ENV_VAR))
    except KeyFileError as exc:
        log.error("%s", exc)
        return 1
    _log_auth(keys, args)
    http_socket = _bind(args.http_host, args.http_port)
    if http_socket is None:
        return 1
    router = Router(
        args.etcd,
        channel_close_grace_s=args.request_timeout_s,
        etcd_access=args.etcd_access,
        tls=args.tls_files,
        agent_keepalive_s=args.agent_keepalive_s,
    )
    metrics = GatewayMetrics()
    access = AccessControl(keys, limits_of(args), metrics, metrics_auth=args.metrics_auth)
    demand = DemandPublisher(router, args.gateway_id or f"{socket.gethostname()}-{args.http_port}")
    relay = Relay(router, args.request_timeout_s, ColdStart(router, metrics, args.cold_start_timeout_s, demand))

    # gRPC refuses larger messages itself (RESOURCE_EXHAUSTED); the service checks each caller's own limit.
    grpc_gate = GrpcGate()
    grpc_server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", access.largest_request_bytes), REUSE_NO_PORT],
        interceptors=[grpc_gate],
    )
    add_gateway_service(grpc_server, router, relay, metrics, access)
    health = add_health_and_reflection(grpc_server, [SERVICE_NAME])
    await mark_not_serving(health, [SERVICE_NAME])  # until the cluster state is loaded
    grpc_address = f"{args.grpc_host}:{args.grpc_port}"
    if add_port(grpc_server, grpc_address, args.tls_files, require_client_cert=args.mtls) == 0:
        log.error("cannot listen for gRPC on %s", grpc_address)
        http_socket.close()
        return 1
    await grpc_server.start()

    http_gate = HttpGate(create_app(router, relay, metrics, access))
    http_server = _HttpServer(
        uvicorn.Config(
            http_gate,
            host=args.http_host,
            port=args.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
            # uvicorn annotates this int, but hands it only to asyncio.timeout, which takes float seconds:
            # half a second.
            timeout_graceful_shutdown=END_MARGIN_S / 2,  # type: ignore[arg-type]
            timeout_keep_alive=HTTP_KEEP_ALIVE_S,
            ssl_certfile=args.http_tls.cert if args.http_tls else None,
            ssl_keyfile=args.http_tls.key if args.http_tls else None,
        )
    )
    router_task = asyncio.create_task(router.run(), name="router")
    demand_task = asyncio.create_task(demand.run(), name="demand")
    http_task = asyncio.create_task(http_server.serve(sockets=[http_socket]), name="http")

    async def serving_once_ready() -> None:
        await router.wait_ready()
        await mark_serving(health, [SERVICE_NAME])
        log.info(
            "gateway ready: REST on %s://%s:%d, gRPC on %s (%s)",
            "https" if args.http_tls else "http",
            args.http_host,
            args.http_port,
            grpc_address,
            transport_name(args.tls_files, args.mtls),
        )

    ready_task = asyncio.create_task(serving_once_ready(), name="ready")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stop_task = asyncio.create_task(stop.wait(), name="stop")
    await asyncio.wait({stop_task, http_task, router_task}, return_when=asyncio.FIRST_COMPLETED)

    exit_code = 0
    for serving_task in (http_task, router_task):
        if serving_task.done():  # either ending on its own is a failure (uvicorn exits when it cannot bind)
            exit_code = 1
            log.error(
                "%s stopped unexpectedly: %r",
                serving_task.get_name(),
                serving_task.exception() if not serving_task.cancelled() else "cancelled",
            )
    log.info("gateway stopping: new requests are refused")
    await mark_not_serving(health, [SERVICE_NAME])
    if exit_code == 0:
        await drain(http_gate, grpc_gate, relay)
    http_server.should_exit = True
    await asyncio.gather(grpc_server.stop(grace=END_MARGIN_S / 2), http_task, return_exceptions=True)
    for task in (ready_task, demand_task, router_task, stop_task):
        task.cancel()
    await asyncio.gather(ready_task, demand_task, router_task, stop_task, return_exceptions=True)
    await router.close()
    log.info("gateway stopped")
    return exit_code


def main(argv: list[str] | None = None) -> None:
    setup_logging("gateway")
    raise SystemExit(asyncio.run(serve(parse_args(argv))))


if __name__ == "__main__":
    main()
