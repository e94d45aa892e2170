"""Test support for the gateway tests (imported by test_gateway_http.py and
test_gateway_grpc.py; it holds no tests itself).

`gateway_stack` is a module-scoped stack without the real engine: a real
etcd, the real gateway as a subprocess (`python -m services.gateway.server`)
and fake agents. A FakeAgent is a real gRPC server of the Agent service
whose Generate follows a script named in the prompt (or the last chat
message), so the gateway's relaying, error mapping and cancellation can be
checked for every case:

    "echo a b c"         one piece per word ("a ", "b ", "c "), then STOP;
                         LENGTH when max_tokens cuts it short
    "slow N"             N pieces of "t " 30 ms apart (until cancelled)
    "hang"               nothing, until cancelled
    "fail CODE message"  aborts with grpc.StatusCode.CODE before any output
    "fail-after N CODE"  N pieces, then aborts with CODE
    "no-finish"          one piece without a finish reason, then ends
    "eof"                ends without any response

GetStatus answers `status` when a test sets it (UNIMPLEMENTED otherwise, as
an agent that cannot report).
"""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from prism_client.v1 import agent_pb2, agent_pb2_grpc, generate_pb2
from services.common import records
from services.common.etcd_server import EmbeddedEtcd, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT_S = 2.0  # the stack's gateway deadline: short, so a hung agent costs a test little
# How long beyond its TTFT SLO (1 s unless its record says otherwise) a request waits for a model
# with no servable engine: short, so a model that never comes costs a test little.
COLD_START_S = 0.5


@dataclass
class Call:
    request: generate_pb2.GenerateRequest
    metadata: dict[str, str]
    ended: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # the caller ended the call before the script did


class FakeAgent(agent_pb2_grpc.AgentServicer):
    def __init__(self, port: int | None = None) -> None:
        self.calls: list[Call] = []
        self.status: agent_pb2.AgentStatus | None = None  # what GetStatus answers
        self._lock = threading.Lock()
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        agent_pb2_grpc.add_AgentServicer_to_server(self, self._server)
        self._server.add_insecure_port(self.address)
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None)

    def call_for(self, request_id: str) -> Call:
        with self._lock:
            return next(c for c in self.calls if c.request.request_id == request_id)

    def received(self, request_id: str) -> bool:
        with self._lock:
            return any(c.request.request_id == request_id for c in self.calls)

    def wait_for_call(self, request_id: str, timeout_s: float = 5.0) -> Call:
        deadline = time.monotonic() + timeout_s
        while not self.received(request_id):
            if time.monotonic() > deadline:
                raise AssertionError(f"the agent never received {request_id}")
            time.sleep(0.01)
        return self.call_for(request_id)

    def GetStatus(self, request: agent_pb2.GetStatusRequest, context: grpc.ServicerContext) -> agent_pb2.AgentStatus:
        if self.status is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this fake agent reports no status")
        return self.status

    def Generate(self, request: generate_pb2.GenerateRequest, context: grpc.ServicerContext):
        call = Call(request=request, metadata={k: v for k, v in context.invocation_metadata()})
        with self._lock:
            self.calls.append(call)
        finished = threading.Event()

        def on_end() -> None:
            call.cancelled = not finished.is_set()
            call.ended.set()

        context.add_callback(on_end)
        script = request.prompt if request.WhichOneof("input") == "prompt" else request.chat.messages[-1].content
        words = script.split()
        max_tokens = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else None
        kind, args = words[0], words[1:]

        def piece(text: str, n: int, finish: int = 0, prompt_tokens: int = 0) -> generate_pb2.GenerateResponse:
            response = generate_pb2.GenerateResponse(
                request_id=request.request_id, text=text, token_ids=[n], finish_reason=finish
            )
            if finish:
                response.usage.prompt_tokens = prompt_tokens
                response.usage.completion_tokens = n + 1
            return response

        if kind == "echo":
            limit = len(args) if max_tokens is None else min(max_tokens, len(args))
            for i, word in enumerate(args[:limit]):
                last = i == limit - 1
                finish = (
                    0
                    if not last
                    else (generate_pb2.FINISH_REASON_STOP if limit == len(args) else generate_pb2.FINISH_REASON_LENGTH)
                )
                yield piece(word + " ", i, finish, prompt_tokens=len(words))
        elif kind == "slow":
            count = int(args[0])
            for i in range(count):
                if not context.is_active():
                    return
                time.sleep(0.03)
                yield piece("t ", i, generate_pb2.FINISH_REASON_LENGTH if i == count - 1 else 0, len(words))
        elif kind == "hang":
            while context.is_active():
                time.sleep(0.02)
            return
        elif kind == "fail":
            finished.set()
            context.abort(grpc.StatusCode[args[0]], " ".join(args[1:]) or args[0])
        elif kind == "fail-after":
            for i in range(int(args[0])):
                yield piece("t ", i)
            finished.set()
            context.abort(grpc.StatusCode[args[1]], "failed mid-stream")
        elif kind == "no-finish":
            yield piece("t ", 0)
        elif kind == "eof":
            pass
        finished.set()


class EtcdWriter:
    """Writes records through etcd's JSON gateway, so sync tests need no event loop."""

    def __init__(self, endpoint: str):
        self._url = f"http://{endpoint}/v3/kv"

    @staticmethod
    def _b64(text: str | bytes) -> str:
        return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()

    def put(self, key: str, value: bytes) -> None:
        httpx.post(f"{self._url}/put", json={"key": self._b64(key), "value": self._b64(value)}).raise_for_status()

    def delete(self, key: str) -> None:
        httpx.post(f"{self._url}/deleterange", json={"key": self._b64(key)}).raise_for_status()

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every key under `prefix` with its value."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        reply = httpx.post(f"{self._url}/range", json={"key": self._b64(prefix), "range_end": self._b64(end)})
        reply.raise_for_status()
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]) for kv in reply.json().get("kvs", [])
        }

    def serve_model(
        self, model: str, agents: dict[str, str], state: str = "active", max_context: int = 256, ttft_ms: float = 0.0
    ) -> None:
        """Records as scheduler and agents would write them: `model` placed on
        `agents` (agent_id -> address), each with an engine in `state`."""
        self.put(
            records.MODELS + model, records.ModelRecord(name=model, path=f"/models/{model}", ttft_ms=ttft_ms).to_json()
        )
        for agent_id, address in agents.items():
            self.put(records.AGENTS + agent_id, records.AgentRecord(agent_id=agent_id, address=address).to_json())
            engine = records.EngineRecord(
                agent_id=agent_id, model=model, state=state, gpu_ids=[0], max_context=max_context
            )
            self.put(engine.key(), engine.to_json())
        placement = records.PlacementRecord(
            model=model, revision=1, replicas=[{"agent_id": agent_id, "gpu_ids": [0]} for agent_id in agents]
        )
        self.put(placement.key(), placement.to_json())


@dataclass
class GatewayStack:
    etcd: EtcdWriter
    etcd_endpoint: str
    http_url: str
    grpc_target: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_model(
        self, model: str, available: bool = True, max_context: int | None = None, timeout_s: float = 10.0
    ) -> dict:
        """Waits until the gateway's /v1/models shows `model` with that
        availability (and max_context, which it reads from the engine
        records of live agents: seeing it means every record has arrived)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            listed = {m["id"]: m for m in httpx.get(self.http_url + "/v1/models").json()["data"]}
            found = listed.get(model)
            if found and found["available"] == available and max_context in (None, found["max_context"]):
                return found
            time.sleep(0.05)
        raise AssertionError(f"gateway never listed {model} with available={available}, max_context={max_context}")

    def wait_for_absence(self, model: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if model not in {m["id"] for m in httpx.get(self.http_url + "/v1/models").json()["data"]}:
                return
            time.sleep(0.05)
        raise AssertionError(f"gateway still lists {model}")

    def serve_model(
        self, model: str, agents: list[FakeAgent] | dict[str, str], state: str = "active", max_context: int = 256
    ) -> None:
        if isinstance(agents, list):
            agents = {f"fake-{a.port}": a.address for a in agents}
        self.etcd.serve_model(model, agents, state=state, max_context=max_context)
        self.wait_for_model(model, available=state in ("active", "inactive"), max_context=max_context)


def wait_until_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"gateway not healthy within {timeout_s}s:\n{log_path.read_text()}")


def start_gateway(
    etcd_endpoint: str, log_path: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str, str]:
    """The gateway process on free ports (env: its whole environment; default the test's), as (process,
    its REST URL, its gRPC target)."""
    http_port, grpc_port = free_port(), free_port()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.gateway.server",
                "--etcd",
                etcd_endpoint,
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(http_port),
                "--grpc-host",
                "127.0.0.1",
                "--grpc-port",
                str(grpc_port),
                *extra,
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"


def stop_process(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@pytest.fixture(scope="module")
def gateway_stack(tmp_path_factory) -> Iterator[GatewayStack]:
    state = tmp_path_factory.mktemp("gateway-stack")
    etcd = EmbeddedEtcd(state / "etcd")
    etcd.start()
    log_path = state / "gateway.log"
    process, http_url, grpc_target = start_gateway(
        etcd.endpoint,
        log_path,
        "--request-timeout-s",
        str(REQUEST_TIMEOUT_S),
        "--cold-start-timeout-s",
        str(COLD_START_S),
    )
    try:
        wait_until_healthy(http_url, process, log_path)
        yield GatewayStack(EtcdWriter(etcd.endpoint), etcd.endpoint, http_url, grpc_target, process, log_path)
    finally:
        stop_process(process)
        etcd.stop()


@pytest.fixture(scope="module")
def fake_agent() -> Iterator[FakeAgent]:
    agent = FakeAgent()
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def echo_model(gateway_stack: GatewayStack, fake_agent: FakeAgent) -> str:
    """A model served by `fake_agent` alone."""
    gateway_stack.serve_model("fake-echo", [fake_agent])
    return "fake-echo"
