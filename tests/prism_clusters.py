"""A real local cluster under the `prism` placement policy with the two tiny
default models (CPU, engines inline, re-planning every 0.5 s), for the
scheduler's end-to-end tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prism.cluster import LocalCluster
from prism.tiny_models import ensure_default_models
from services.common.etcd_server import free_port


@contextmanager
def prism_cluster(
    state: Path,
    *,
    agents: int = 1,
    on: bool = True,
    agent_args: tuple[str, ...] = (),
    scheduler_args: tuple[str, ...] = (),
    gateway_args: tuple[str, ...] = (),
) -> Iterator[LocalCluster]:
    models = ensure_default_models(state / "models")
    config = {
        "policy": "prism",
        "models": [
            {"model_name": name, "model_path": str(path), "init_placements": [{"gpu_ids": [0], "on": on}]}
            for name, path in sorted(models.items())
        ],
    }
    path = state / "models.json"
    path.write_text(json.dumps(config))
    cluster = LocalCluster(
        state_dir=state,
        config_path=path,
        http_port=free_port(),
        grpc_port=free_port(),
        device="cpu",
        cpu_memory_gb=1.0,
        engine_isolation="inline",
        agents=agents,
        agent_args=agent_args,
        scheduler_args=("--replan-interval-s", "0.5", *scheduler_args),
        gateway_args=gateway_args,
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def until(check: Callable, what: str, timeout_s: float, poll_s: float = 0.05):
    """check()'s first truthy result, polled; fails the test after timeout_s, naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f}s for {what}"
        time.sleep(poll_s)
    return found
