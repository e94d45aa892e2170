"""Gateway process: the OpenAI-compatible REST API (uvicorn) and the
prism.v1.Gateway gRPC API, in one asyncio loop over one router.

    python -m services.gateway.server --etcd 127.0.0.1:2379 \
        --http-host 127.0.0.1 --http-port 8000 --grpc-host 127.0.0.1 --grpc-port 50050 \
        [--request-timeout-s 600] [--cold-start-timeout-s 30] [--gateway-id ID]

Both servers listen at once; until the router has loaded the cluster state
from etcd, /health answers 503 and requests fail with 503 / UNAVAILABLE.
SIGINT or SIGTERM stops it: health goes NOT_SERVING, in-flight requests get
a few seconds to finish, then everything closes.

A request for a model that no live agent serves yet waits for it (up to the
model's TTFT SLO plus --cold-start-timeout-s) while the gateway publishes the
demand in etcd for the scheduler: services/gateway/cold_start.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import grpc
import uvicorn

from services.common.grpc_util import add_health_and_reflection, mark_not_serving, mark_serving
from services.common.logs import setup_logging
from services.gateway.cold_start import DEFAULT_ALLOWANCE_S, ColdStart, DemandPublisher
from services.gateway.grpc_gateway import SERVICE_NAME, add_gateway_service
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_api import create_app
from services.gateway.relay import Relay
from services.gateway.router import Router

log = logging.getLogger("gateway")

SHUTDOWN_GRACE_S = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Prism gateway: OpenAI-compatible REST and prism.v1.Gateway gRPC")
    p.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoint host:port")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=50050)
    p.add_argument("--request-timeout-s", type=float, default=600.0,
                   help="deadline of every agent call, a whole streamed generation included")
    p.add_argument("--cold-start-timeout-s", type=float, default=DEFAULT_ALLOWANCE_S,
                   help="how long beyond its TTFT SLO a request waits for its model to become servable "
                        "(loaded and switched on somewhere) before it fails with 503; 0: fail at once")
    p.add_argument("--gateway-id", default=None,
                   help="names this gateway's demand records in etcd (default: HOSTNAME-HTTP_PORT)")
    args = p.parse_args(argv)
    if args.request_timeout_s <= 0:
        p.error("--request-timeout-s must be positive")
    if args.cold_start_timeout_s < 0:
        p.error("--cold-start-timeout-s must not be negative")
    return args


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
    http_socket = _bind(args.http_host, args.http_port)
    if http_socket is None:
        return 1
    router = Router(args.etcd, channel_close_grace_s=args.request_timeout_s)
    metrics = GatewayMetrics()
    demand = DemandPublisher(router, args.gateway_id or f"{socket.gethostname()}-{args.http_port}")
    relay = Relay(router, args.request_timeout_s, ColdStart(router, metrics, args.cold_start_timeout_s, demand))

    grpc_server = grpc.aio.server()
    add_gateway_service(grpc_server, router, relay, metrics)
    health = add_health_and_reflection(grpc_server, [SERVICE_NAME])
    await mark_not_serving(health, [SERVICE_NAME])  # until the cluster state is loaded
    grpc_address = f"{args.grpc_host}:{args.grpc_port}"
    try:
        bound = grpc_server.add_insecure_port(grpc_address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        log.error("cannot listen for gRPC on %s", grpc_address)
        http_socket.close()
        return 1
    await grpc_server.start()

    http_server = _HttpServer(uvicorn.Config(
        create_app(router, relay, metrics), host=args.http_host, port=args.http_port,
        log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    router_task = asyncio.create_task(router.run(), name="router")
    demand_task = asyncio.create_task(demand.run(), name="demand")
    http_task = asyncio.create_task(http_server.serve(sockets=[http_socket]), name="http")

    async def serving_once_ready() -> None:
        await router.wait_ready()
        await mark_serving(health, [SERVICE_NAME])
        log.info("gateway ready: REST on http://%s:%d, gRPC on %s", args.http_host, args.http_port, grpc_address)

    ready_task = asyncio.create_task(serving_once_ready(), name="ready")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stop_task = asyncio.create_task(stop.wait(), name="stop")
    await asyncio.wait({stop_task, http_task, router_task}, return_when=asyncio.FIRST_COMPLETED)

    exit_code = 0
    for task in (http_task, router_task):
        if task.done():  # either ending on its own is a failure (uvicorn exits when it cannot bind)
            exit_code = 1
            log.error("%s stopped unexpectedly: %r", task.get_name(),
                      task.exception() if not task.cancelled() else "cancelled")
    log.info("gateway stopping")
    await mark_not_serving(health, [SERVICE_NAME])
    http_server.should_exit = True
    await asyncio.gather(grpc_server.stop(grace=SHUTDOWN_GRACE_S), http_task, return_exceptions=True)
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
