"""An engine worker process: initializes its device before any model is
known, then serves prism.v1.EngineWorker on a unix socket and holds at most
one engine. Its agent starts it (see worker_pool.py); it never outlives the
agent.

    python -m services.gpu_agent.workers.worker_main --device cuda:0|cpu --socket PATH [--parent-fd FD]

Life: it ends on Shutdown, SIGTERM or SIGINT (stopping the engine first),
and at once when its parent dies: the end of --parent-fd (a pipe whose only
writer is the agent) reads EOF when the agent exits in any way, even by
SIGKILL; without --parent-fd it watches its parent pid instead."""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before the heavy imports, so their cost is measured

import argparse  # noqa: E402  after _STARTED, on purpose
import asyncio  # noqa: E402  after _STARTED, on purpose
import logging  # noqa: E402  after _STARTED, on purpose
import os  # noqa: E402  after _STARTED, on purpose
import signal  # noqa: E402  after _STARTED, on purpose
import threading  # noqa: E402  after _STARTED, on purpose

log = logging.getLogger("engine_worker")
PARENT_POLL_S = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Prism engine worker (started by the gpu agent)")
    p.add_argument("--device", required=True, help="torch device: cuda:N or cpu")
    p.add_argument("--socket", required=True, help="unix socket path to serve EngineWorker on")
    p.add_argument(
        "--parent-fd",
        type=int,
        default=None,
        help="read end of a pipe the parent holds open; EOF means the parent died",
    )
    return p.parse_args(argv)


def _exit_now(why: str) -> None:
    # os._exit: no clean-up that could hang (engine threads, CUDA); the kernel
    # frees the process's memory, and the agent is gone anyway.
    log.warning("%s; exiting", why)
    logging.shutdown()
    os._exit(0)


def watch_parent(parent_fd: int | None) -> None:
    """Ends this process when the parent dies (a daemon thread)."""
    parent = os.getppid()

    def by_pipe(fd: int) -> None:
        while os.read(fd, 4096):
            pass
        _exit_now("parent gone (its pipe closed)")

    def by_pid() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        _exit_now(f"parent {parent} gone")

    if parent_fd is not None:
        threading.Thread(target=by_pipe, args=(parent_fd,), name="parent-watch", daemon=True).start()
    else:
        threading.Thread(target=by_pid, name="parent-watch", daemon=True).start()


def device_problem(torch, device: str) -> str | None:
    """Why this worker cannot use the device, or None."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        return str(exc)
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"device type {dev.type!r} is not supported (cuda:N or cpu)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"there are only {torch.cuda.device_count()} CUDA GPU(s)"
    return None


async def serve(args: argparse.Namespace, warmup, import_s: float) -> None:
    import grpc

    from prism_client.v1 import engine_worker_pb2_grpc
    from services.gpu_agent.workers.worker_service import EngineWorkerService

    stop = asyncio.Event()
    service = EngineWorkerService(args.device, warmup, import_s, on_shutdown=stop.set)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    server = grpc.aio.server()
    engine_worker_pb2_grpc.add_EngineWorkerServicer_to_server(service, server)
    if server.add_insecure_port(f"unix:{args.socket}") == 0:
        raise SystemExit(f"engine worker: cannot listen on unix:{args.socket}")
    await server.start()
    log.info(
        "worker %d on %s serving at %s (imports %.2fs, device warm-up %.2fs)",
        os.getpid(),
        args.device,
        args.socket,
        service.import_s,
        service.warmup.seconds,
    )
    await stop.wait()
    log.info("worker %d stopping", os.getpid())
    await server.stop(grace=1)
    await asyncio.to_thread(service.stop_engine)
    try:
        os.unlink(args.socket)
    except FileNotFoundError:
        pass


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Until the server's own handlers are in place, SIGTERM (a pool closing
    # while this worker still warms up) is a clean, immediate exit.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    from services.common.logs import setup_logging

    setup_logging(f"worker-{os.getpid()}")
    watch_parent(args.parent_fd)  # first: a parent dying during the warm-up ends us too

    import torch  # the point of a warm worker: this is paid before any model is known

    problem = device_problem(torch, args.device)
    if problem:
        log.error("cannot serve %s: %s", args.device, problem)
        raise SystemExit(2)

    from services.gpu_agent.engine import Engine  # noqa: F401
    from services.gpu_agent.workers.device_warmup import warm_up

    import_s = time.perf_counter() - _STARTED
    report = warm_up(args.device)
    asyncio.run(serve(args, report, import_s))


if __name__ == "__main__":
    main()
