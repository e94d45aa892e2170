"""GPU agent process: discovers devices, serves the Agent gRPC API, keeps its
registration alive in etcd and reports load to the scheduler.

    python -m services.gpu_agent.server --etcd 127.0.0.1:2379 --scheduler 127.0.0.1:50051 \
        --listen 127.0.0.1:50061 [--advertise HOST:PORT] [--device auto|cpu|cuda] [--cpu-memory-gb 4] \
        [--engine-isolation auto|process|inline] [--spare-workers 1] \
        [--memory-policy balloon|static] [--memory-reserve-gb GB] [--kv-budget-gb GB] [--starvation-s 5] \
        [--cuda-mps auto|on|off] \
        [--drain-timeout-s 30] [--shutdown-grace-s 10] [--tls-cert PEM --tls-key PEM --tls-ca PEM [--mtls]] \
        [--etcd-ca PEM --etcd-cert PEM --etcd-key PEM] [--etcd-user USER]  (its password: $PRISM_ETCD_PASSWORD)

Engine isolation: `process` runs each engine in its own worker process, with
`--spare-workers` pre-started, device-initialized workers per device so a new
model starts warm (services/gpu_agent/workers/); `inline` runs engines in the
agent's process. `auto` (the default) is `process` on CUDA and `inline` on the
CPU, where a worker's start-up would cost more than it isolates.

SIGTERM (or SIGINT) drains the agent: gRPC health goes NOT_SERVING; new
Generate calls are sent back unstarted (UNAVAILABLE with the draining
marker, so the gateway gives them to another replica at once, or answers
503 where there is none) and LoadModel is refused; every engine drains
(published as draining, its requests waiting for admission sent back the
same way, its running ones finishing) for up to --shutdown-grace-s less
END_MARGIN_S, after which the requests left end with UNAVAILABLE saying the
agent shut down; then the lease is revoked and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
import socket
import time
from pathlib import Path

import grpc

from prism_client.v1 import agent_pb2, agent_pb2_grpc
from services.common import records
from services.common.etcd import EtcdLoginRefused, LeasedKeys, add_etcd_args, connect, etcd_access_from_args
from services.common.grpc_decode import add_servicer
from services.common.grpc_util import (
    DRAINING_KEY,
    REUSE_NO_PORT,
    add_health_and_reflection,
    mark_not_serving,
    mark_serving,
)
from services.common.logs import setup_logging
from services.common.tls import TlsConfigError, add_port, add_tls_args, tls_from_args, transport_name
from services.gpu_agent.admission import DEFAULT_STARVATION_S, AdmissionQueue, AgentAdmission
from services.gpu_agent.agent_service import DEFAULT_BUSY_WINDOW_S, AgentService
from services.gpu_agent.cuda_mps import CHOICES as MPS_CHOICES
from services.gpu_agent.cuda_mps import MpsError, start_mps
from services.gpu_agent.devices import Device, discover_devices
from services.gpu_agent.engine.shared_weights import check_shared_dir, default_shared_dir
from services.gpu_agent.engine_manager import DEFAULT_DRAIN_TIMEOUT_S, EngineManager, ManagedEngine
from services.gpu_agent.host_checks import FAIL, WARN, gather_facts, verdicts
from services.gpu_agent.kvcached_env import apply_to_this_process
from services.gpu_agent.load_reporter import LoadReporter
from services.gpu_agent.memory_coordinator import DEFAULT_RELIEVE_IDLE_S, MemoryCoordinator, prepare_activation_on
from services.gpu_agent.memory_policy import POLICIES
from services.gpu_agent.model_roots import resolved_roots
from services.gpu_agent.request_stats import DEFAULT_WINDOW_S
from services.gpu_agent.workers.worker_pool import WorkerPool

log = logging.getLogger("gpu_agent")
SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name
DEFAULT_SHUTDOWN_GRACE_S = 10.0
# The gateway pings the agents it has calls open on, to find a frozen one (services/gateway/router.py): the
# pings are welcome however often they come (gRPC's default answers a second ping within 5 minutes without
# data, as in a long prefill, with GOAWAY too_many_pings, failing every call on the connection).
SERVER_OPTIONS = [
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    REUSE_NO_PORT,
]
# Of the grace, what is kept for the gRPC server to send the last responses and errors.
END_MARGIN_S = 1.0


class ShutdownGate(grpc.aio.ServerInterceptor):
    """Once closed (the agent is shutting down), new Generate calls are sent
    back unstarted, as a draining engine sends back the requests it has not
    started: UNAVAILABLE with the draining marker, so the gateway routes them
    again at once; LoadModel is refused (UNAVAILABLE), so the scheduler
    cannot place a model here again and cancel its drain. Everything else
    (status, unloads) still answers."""

    def __init__(self, agent_id: str):
        self.agent_id = agent_id
        self.closed = False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if (
            not self.closed
            or handler is None
            or method not in (f"/{SERVICE_NAME}/Generate", f"/{SERVICE_NAME}/LoadModel")
        ):
            return handler
        generate = method.endswith("/Generate")
        message = (
            f"agent {self.agent_id} is shutting down: the request was not started; sent back for another replica"
            if generate
            else f"agent {self.agent_id} is shutting down: it loads no model"
        )
        metadata = ((DRAINING_KEY, "1"),) if generate else ()

        async def refuse(request, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, message, trailing_metadata=metadata)

        make = (
            grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
        )
        return make(
            refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


async def drain_for_shutdown(
    manager: EngineManager, admission: AgentAdmission | None, gate: ShutdownGate, grace_s: float
) -> None:
    """Closes the gate and drains every engine (see the module docstring);
    returns once all are unloaded, within grace_s."""
    gate.closed = True
    agent = gate.agent_id
    why = f"agent {agent} is shutting down and its grace of {grace_s:g}s passed"
    start = time.monotonic()
    in_flight = sum(m.request_stats.in_flight for m in manager.engines.values())
    if in_flight:
        log.info("draining: %d request(s) in flight get up to %.1fs", in_flight, grace_s)
    for model in list(manager.engines):
        if model not in manager.engines:
            continue
        managed = await manager.drain(model, grace_s, why)
        if admission is not None:  # not started: back to the gateway at once, for another replica
            admission.send_back_unstarted(
                managed,
                (
                    f"model {model!r}: agent {agent} is shutting down; the request had not started: sent back for "
                    "another replica"
                ),
            )
    await manager.drain_all(grace_s, why)
    log.info("drained in %.2fs", time.monotonic() - start)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Prism GPU agent")
    p.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoint host:port")
    p.add_argument(
        "--scheduler",
        default="127.0.0.1:50051",
        help="scheduler gRPC address, used while etcd names no leading scheduler replica",
    )
    p.add_argument("--listen", default="127.0.0.1:50061", help="address to serve gRPC on")
    p.add_argument("--advertise", default=None, help="address others reach this agent at (default: --listen)")
    p.add_argument("--agent-id", default=None, help="stable id (default: hostname-port)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cpu-memory-gb", type=float, default=4.0, help="memory budget of the CPU device")
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=0.0,
        help="plan each GPU as having at most this much memory, GiB (default 0: all of it): a card shared "
        "with something else, or a larger card standing in for a smaller one",
    )
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=1,
        help="on the CPU, this many devices (GPU ids 0..n-1) with --cpu-memory-gb each, on the same cores: "
        "multi-GPU placements (tp_size > 1) on a machine without GPUs",
    )
    p.add_argument(
        "--model-root",
        action="append",
        default=[],
        metavar="DIR",
        help="load models only from under this folder (repeatable); none: from any path",
    )
    p.add_argument("--lease-ttl-s", type=int, default=5, help="etcd lease; the agent vanishes this long after dying")
    p.add_argument(
        "--engine-isolation",
        default="auto",
        choices=["auto", "process", "inline"],
        help="engines in worker processes or in the agent (auto: process on CUDA, inline on the CPU)",
    )
    p.add_argument(
        "--spare-workers",
        type=int,
        default=1,
        help="pre-started engine workers per device (process isolation; 0: every load starts cold)",
    )
    p.add_argument(
        "--shared-weights-dir",
        default="auto",
        help="engine workers keep host weights in shared-memory files here, so a replacement worker "
        "maps them instead of loading (auto: /dev/shm where it exists; none: private copies)",
    )
    p.add_argument(
        "--memory-policy",
        default="balloon",
        choices=sorted(POLICIES),
        help="how a device's KV budget is split among its engines: balloon (by demand and priority) "
        "or static (equal shares)",
    )
    p.add_argument(
        "--memory-reserve-gb",
        type=float,
        default=None,
        help="device memory kept out of the KV budget (default: 5%% of a GPU, at most 4 GiB; 0 on the CPU)",
    )
    p.add_argument(
        "--kv-budget-gb",
        type=float,
        default=0.0,
        help="cap on each device's KV budget (default 0: no cap; the budget is memory - weights - reserve)",
    )
    p.add_argument(
        "--busy-window-s",
        type=float,
        default=DEFAULT_BUSY_WINDOW_S,
        help="an engine that had a request this recently is not switched off unless the call forces it",
    )
    p.add_argument(
        "--relieve-idle-s",
        type=float,
        default=DEFAULT_RELIEVE_IDLE_S,
        help="when the serving engines need more KV than a device has, engines idle this long are "
        "switched off to give it their memory (balloon policy)",
    )
    p.add_argument(
        "--stats-window-s",
        type=float,
        default=DEFAULT_WINDOW_S,
        help="window of each model's request stats; a model with no request in it reports no demand",
    )
    p.add_argument(
        "--starvation-s",
        type=float,
        default=DEFAULT_STARVATION_S,
        help="a request waiting this long for admission goes first, whatever its deadline",
    )
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        help="an engine the scheduler removes first finishes its requests (new ones go to the model's "
        "other replicas); after this long it is unloaded anyway and the requests left fail",
    )
    p.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=DEFAULT_SHUTDOWN_GRACE_S,
        help="on SIGTERM, how long the requests in flight may take to finish (new ones go to other "
        "replicas) before they end with an error and the agent exits",
    )
    p.add_argument(
        "--cuda-mps",
        default="auto",
        choices=MPS_CHOICES,
        help="run the engine processes of each GPU through CUDA MPS, so their kernels share the GPU at "
        "once instead of time-slicing it (auto: when nvidia-cuda-mps-control is found; a daemon "
        "already at $CUDA_MPS_PIPE_DIRECTORY is used). Trade-off: a fatal GPU fault in one engine "
        "ends all engines on that GPU (services/gpu_agent/cuda_mps.py)",
    )
    add_tls_args(p)
    add_etcd_args(p)
    args = p.parse_args(argv)
    if args.spare_workers < 0:
        p.error("--spare-workers must be >= 0")
    if args.memory_reserve_gb is not None and args.memory_reserve_gb < 0:
        p.error("--memory-reserve-gb must be >= 0")
    if args.kv_budget_gb < 0:
        p.error("--kv-budget-gb must be >= 0")
    if args.stats_window_s <= 0:
        p.error("--stats-window-s must be positive")
    if args.starvation_s <= 0:
        p.error("--starvation-s must be positive")
    if args.drain_timeout_s < 0:
        p.error("--drain-timeout-s must not be negative")
    if args.shutdown_grace_s < 0:
        p.error("--shutdown-grace-s must not be negative")
    try:
        args.tls_files = tls_from_args(args)
        args.etcd_access = etcd_access_from_args(args)
    except TlsConfigError as exc:
        p.error(str(exc))
    return args


def log_host_checks(device: str) -> None:
    """prism doctor's host checks, without the ones that touch the GPU (host_checks.py): a warning for
    each one that finds something to fix."""
    for check in verdicts(gather_facts(measure=False), device):
        (log.warning if check.status in (WARN, FAIL) else log.info)("host check: %s", check.line())


def shared_weights_dir(choice: str, devices: list[Device]) -> Path | None:
    if choice == "none":
        return None
    if choice == "auto":
        return default_shared_dir()
    path = Path(choice)
    if any(d.kind == "cuda" for d in devices):
        check_shared_dir(path)
    elif not path.is_dir():
        raise ValueError(f"shared weights directory {path} does not exist")
    return path


def engine_isolation(choice: str, devices: list[Device]) -> str:
    if choice != "auto":
        return choice
    return "process" if any(d.kind == "cuda" for d in devices) else "inline"


async def serve(args: argparse.Namespace) -> None:
    # Before any CUDA use here: the engine workers inherit the daemon's directories from this process.
    try:
        mps = None if args.device == "cpu" else start_mps(args.cuda_mps)
    except MpsError as exc:
        raise SystemExit(f"agent: {exc}") from None
    try:
        await serve_engines(args)
    finally:
        if mps is not None:
            mps.stop()


async def serve_engines(args: argparse.Namespace) -> None:
    try:
        devices = discover_devices(args.device, args.cpu_memory_gb, args.cpu_devices, args.gpu_memory_gb)
    except ValueError as exc:
        raise SystemExit(f"agent: {exc}") from None
    try:
        shared_dir = shared_weights_dir(args.shared_weights_dir, devices)
    except ValueError as exc:
        raise SystemExit(f"agent: --shared-weights-dir: {exc}") from None
    log_host_checks(args.device)
    advertise = args.advertise or args.listen
    agent_id = args.agent_id or f"{socket.gethostname()}-{advertise.rsplit(':', 1)[-1]}"
    etcd = await connect(args.etcd, access=args.etcd_access)
    leased = LeasedKeys(etcd, ttl_s=args.lease_ttl_s)
    # Engine keys of an earlier life of this agent id would make its models
    # look served until their lease ran out; nothing of that life survives.
    await etcd.delete_prefix(f"{records.ENGINES}{agent_id}/".encode())

    coordinators: dict[int, MemoryCoordinator] = {}

    async def publish(managed: ManagedEngine) -> None:
        # Loaded, switched off, failed or gone: the device's KV split changes.
        for gpu in managed.gpu_ids:
            if gpu in coordinators:
                coordinators[gpu].poke()
        key = records.engine_key(agent_id, managed.spec.name)
        if managed.state == "unloaded":
            await leased.delete(key)
            return
        record = records.EngineRecord(
            agent_id=agent_id,
            model=managed.spec.name,
            state=managed.published_state,
            gpu_ids=list(managed.gpu_ids),
            max_context=managed.engine.max_context if managed.engine else 0,
            error=managed.error,
        )
        await leased.put(key, record.to_json())

    pool = None
    if engine_isolation(args.engine_isolation, devices) == "process":
        pool = WorkerPool([d.torch_device for d in devices], args.spare_workers)
        await pool.start()  # the spares warm up while the agent registers
    manager = EngineManager(
        devices,
        publish,
        pool,
        coordinated=True,
        stats_window_s=args.stats_window_s,
        shared_weights_dir=shared_dir,
        drain_timeout_s=args.drain_timeout_s,
        shared_weights_prefix=f"prism-{hashlib.sha256(agent_id.encode()).hexdigest()[:10]}",
    )
    reserve = None if args.memory_reserve_gb is None else int(args.memory_reserve_gb * (1 << 30))
    for d in devices:
        coordinators[d.index] = MemoryCoordinator(
            d,
            manager,
            args.memory_policy,
            reserve,
            kv_budget_cap_bytes=int(args.kv_budget_gb * (1 << 30)),
            make_room_idle_s=args.busy_window_s,
            relieve_idle_s=args.relieve_idle_s,
        )
    admission = AgentAdmission({i: AdmissionQueue(c, args.starvation_s) for i, c in coordinators.items()})

    async def before_activate(managed: ManagedEngine) -> None:
        # Idle engines step aside if its weights do not fit (make_room.py), then the KV limits make
        # room: on every device of a split engine.
        await prepare_activation_on([coordinators[gpu] for gpu in managed.gpu_ids], managed)

    manager.before_activate = before_activate
    roots = resolved_roots(args.model_root)
    if roots:
        log.info("loading models only from under %s (--model-root)", ", ".join(map(str, roots)))
    else:
        log.warning("loading models from any path on this host: give --model-root to bound where from")
    service = AgentService(
        agent_id,
        devices,
        manager,
        coordinators=coordinators,
        admission=admission,
        busy_window_s=args.busy_window_s,
        model_roots=roots,
    )

    gate = ShutdownGate(agent_id)
    server = grpc.aio.server(interceptors=[gate], options=SERVER_OPTIONS)
    add_servicer(agent_pb2_grpc.add_AgentServicer_to_server, service, server)  # undecodable: INVALID_ARGUMENT
    health = add_health_and_reflection(server, [SERVICE_NAME])
    if add_port(server, args.listen, args.tls_files, require_client_cert=args.mtls) == 0:
        raise SystemExit(f"agent: cannot listen on {args.listen}")
    await server.start()

    agent_record = records.AgentRecord(
        agent_id=agent_id,
        address=advertise,
        devices=[vars(records.DeviceRecord(d.index, d.kind, d.name, d.memory_bytes)) for d in devices],
        started_at=time.time(),
    )
    await leased.put(agent_record.key(), agent_record.to_json())
    await mark_serving(health, [SERVICE_NAME])
    log.info(
        "agent %s serving on %s (%s) with %s; engines %s",
        agent_id,
        advertise,
        transport_name(args.tls_files, args.mtls),
        ", ".join(f"{d.kind}:{d.index} {d.memory_bytes >> 20} MB" for d in devices),
        "inline" if pool is None else f"in worker processes ({args.spare_workers} spare a device)",
    )

    reporter = LoadReporter(
        args.scheduler,
        agent_id,
        advertise,
        devices,
        manager,
        coordinators=coordinators,
        admission=admission,
        etcd=etcd,  # reports follow the scheduler leader in etcd
        tls=args.tls_files,
    )
    tasks = [
        asyncio.create_task(leased.run()),
        asyncio.create_task(reporter.run()),
        *(asyncio.create_task(c.run()) for c in coordinators.values()),
        *(asyncio.create_task(q.run()) for q in admission.queues.values()),
    ]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("agent %s stopping", agent_id)
    await mark_not_serving(health, [SERVICE_NAME])
    # The coordinators, the admission queues and the lease go on while the engines drain.
    await drain_for_shutdown(manager, admission, gate, max(0.0, args.shutdown_grace_s - END_MARGIN_S))
    for task in tasks:
        task.cancel()
    try:
        await leased.revoke()
    except Exception as exc:
        log.warning("could not revoke lease: %s", exc)
    await server.stop(grace=END_MARGIN_S)
    await manager.stop_all()
    if pool is not None:
        await pool.close()
    await etcd.close()


def main(argv: list[str] | None = None) -> None:
    setup_logging("agent")
    args = parse_args(argv)
    apply_to_this_process()  # inline engines' kvcached, imported later in this process
    try:
        asyncio.run(serve(args))
    except EtcdLoginRefused as exc:
        raise SystemExit(f"agent: {exc}") from None


if __name__ == "__main__":
    main()
