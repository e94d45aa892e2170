"""API keys on the gateway (services/gateway/auth.py, access.py): the key
store and its file and environment sources, then a real gateway with keys
(a subprocess over a real etcd, with a scripted fake agent: see
test_gateway_support.py) over REST and gRPC, and the default gateway
without keys, which stays open."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_gateway_support import (  # its fixtures come as a plugin (tests/conftest.py)
    # noqa: F401 - fixtures,
    EtcdWriter,
    FakeAgent,
    GatewayStack,
    start_gateway,
    stop_process,
    wait_until_healthy,
)

from prism_client.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2
from services.common.etcd_server import EmbeddedEtcd, free_port
from services.gateway.access import AccessControl
from services.gateway.auth import (
    ENV_VAR,
    ApiKey,
    KeyFileError,
    KeyStore,
    bearer_token,
    digest_of,
    keys_from_entries,
    keys_from_env,
    load_key_store,
    read_keys_file,
)
from services.gateway.errors import ModelNotAllowed, Unauthenticated
from services.gateway.limits import Limits
from services.gateway.metrics import GatewayMetrics
from tests.prometheus_text import metric_values

# ---- a gateway with flags and keys of a test's choosing ---------------------------------


@dataclass
class KeyedGateway:
    etcd: EtcdWriter
    http_url: str
    grpc_target: str
    process: subprocess.Popen
    log_path: Path
    agent: FakeAgent | None = None  # the fake agent a fixture serves its models on

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def serve_model(self, model: str, agent: FakeAgent, key: str | None, timeout_s: float = 10.0) -> None:
        """Records `model` on `agent` and waits until the gateway lists it to `key`."""
        self.etcd.serve_model(model, {f"fake-{agent.port}": agent.address})
        headers = bearer(key) if key else {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            listed = httpx.get(self.http_url + "/v1/models", headers=headers).json()["data"]
            if any(m["id"] == model and m["available"] for m in listed):
                return
            time.sleep(0.05)
        raise AssertionError(f"the gateway never listed {model}:\n{self.log()}")


def launch_gateway(
    etcd_endpoint: str, log_path: Path, *flags: str, env_keys: str | None = None
) -> tuple[subprocess.Popen, str, str]:
    """The gateway process, with PRISM_API_KEYS set to `env_keys` (never inherited from the test's shell)."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if env_keys is not None:
        env[ENV_VAR] = env_keys
    return start_gateway(etcd_endpoint, log_path, *flags, env=env)


def start_keyed_gateway(etcd: EmbeddedEtcd, log_path: Path, *flags: str, env_keys: str | None = None) -> KeyedGateway:
    process, http_url, grpc_target = launch_gateway(etcd.endpoint, log_path, *flags, env_keys=env_keys)
    try:
        wait_until_healthy(http_url, process, log_path)
    except BaseException:
        stop_process(process)
        raise
    return KeyedGateway(EtcdWriter(etcd.endpoint), http_url, grpc_target, process, log_path)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def grpc_auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def completion(model: str, prompt: str = "echo ok", **fields) -> dict:
    return {"model": model, "prompt": prompt, **fields}


def assert_openai_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---- the key store -----------------------------------------------------------------------


def test_keys_are_found_by_plain_or_hashed_entries_and_only_digests_are_kept():
    store = KeyStore(
        keys_from_entries(
            [
                {"name": "plain", "key": "sk-plain-1"},
                {"name": "hashed", "key_sha256": sha256_hex("sk-hashed-2").upper(), "models": ["a", "b"]},
            ],
            "keys.yaml",
        )
    )
    plain, hashed = store.keys
    assert store.find("sk-plain-1") is plain and plain.models is None
    assert store.find("sk-hashed-2") is hashed and hashed.models == frozenset({"a", "b"})
    for wrong in ("sk-plain-", "sk-plain-1 ", "SK-PLAIN-1", "", sha256_hex("sk-hashed-2")):
        assert store.find(wrong) is None
    assert plain.digest == hashlib.sha256(b"sk-plain-1").digest()
    assert "sk-plain-1" not in repr(store.keys) and not any("sk-plain-1" in str(v) for v in vars(plain).values())


def test_per_key_limits_are_parsed():
    [key] = keys_from_entries(
        [{"name": "k", "key": "sk-k", "limits": {"rate_limit_rps": 2, "max_tokens_cap": 64}}], "f"
    )
    assert key.limits == {"rate_limit_rps": 2.0, "max_tokens_cap": 64}


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"name": "x", "key": "k"}, "expected a list"),
        (["sk-bare"], "must be a mapping"),
        ([{"key": "sk-1"}], "name is required"),
        ([{"name": "", "key": "sk-1"}], "name is required"),
        ([{"name": "n"}], "exactly one of key and key_sha256"),
        ([{"name": "n", "key": "sk-1", "key_sha256": sha256_hex("sk-1")}], "exactly one of key and key_sha256"),
        ([{"name": "n", "key": "has space"}], "visible ASCII"),
        ([{"name": "n", "key": 12345}], "visible ASCII"),
        ([{"name": "n", "key_sha256": "abc"}], "64 hex digits"),
        ([{"name": "n", "key_sha256": "z" * 64}], "64 hex digits"),
        ([{"name": "n", "key": "sk-1", "models": "tiny-llama"}], "models must be a list"),
        ([{"name": "n", "key": "sk-1", "models": [""]}], "models must be a list"),
        ([{"name": "n", "key": "sk-1", "modles": ["a"]}], "unknown field"),
        ([{"name": "n", "key": "sk-1", "limits": {"rate_limit_rps": -1}}], "rate_limit_rps must be at least 0"),
        ([{"name": "n", "key": "sk-1", "limits": {"max_tokens_cap": 0}}], "max_tokens_cap must be at least 1"),
        ([{"name": "n", "key": "sk-1", "limits": {"max_tokens_cap": 1.5}}], "max_tokens_cap must be a whole number"),
        ([{"name": "n", "key": "sk-1", "limits": {"max_concurrent_streams": True}}], "must be a whole number"),
        ([{"name": "n", "key": "sk-1", "limits": {"requests_per_day": 5}}], "unknown limit"),
        ([{"name": "n", "key": "sk-1", "limits": [1]}], "limits must be a mapping"),
    ],
    ids=repr,
)
def test_bad_entries_are_refused_with_a_reason(entries, message):
    with pytest.raises(KeyFileError, match=message) as caught:
        keys_from_entries(entries, "keys.yaml")
    assert "keys.yaml" in str(caught.value)


def test_names_and_keys_must_be_unique():
    with pytest.raises(KeyFileError, match="unique"):
        KeyStore(keys_from_entries([{"name": "a", "key": "sk-1"}, {"name": "a", "key": "sk-2"}], "f"))
    with pytest.raises(KeyFileError, match="twice"):
        KeyStore(
            keys_from_entries([{"name": "a", "key": "sk-1"}, {"name": "b", "key_sha256": sha256_hex("sk-1")}], "f")
        )


def test_environment_keys_allow_every_model():
    keys = keys_from_env(" sk-env-1, ,sk-env-2,")
    assert [k.name for k in keys] == ["env-1", "env-2"]
    assert all(k.models is None and k.limits == {} for k in keys)
    assert KeyStore(keys).find("sk-env-2") is keys[1]
    assert keys_from_env(None) == [] and keys_from_env("") == []
    with pytest.raises(KeyFileError, match=ENV_VAR):
        keys_from_env("sk-ok,sk bad")


def test_keys_files_in_yaml_and_json_and_the_environment_together(tmp_path):
    yaml_file = tmp_path / "keys.yaml"
    yaml_file.write_text(f"- name: a\n  key: sk-a\n- name: b\n  key_sha256: {sha256_hex('sk-b')}\n  models: [m]\n")
    json_file = tmp_path / "keys.json"
    json_file.write_text(json.dumps([{"name": "c", "key": "sk-c", "limits": {"max_concurrent_streams": 2}}]))
    assert [k.name for k in read_keys_file(yaml_file)] == ["a", "b"]
    assert read_keys_file(json_file)[0].limits == {"max_concurrent_streams": 2}
    store = load_key_store(yaml_file, "sk-env")
    assert [k.name for k in store.keys] == ["a", "b", "env-1"] and store.enabled
    assert not load_key_store(None, None).enabled


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("keys.yaml", "- name: a\n  key: [unclosed", "not valid YAML"),
        ("keys.json", '[{"name": "a",}]', "not valid JSON"),
        ("keys.yaml", "", "expected a list"),
    ],
    ids=["yaml", "json", "empty"],
)
def test_unreadable_keys_files_are_refused(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(KeyFileError, match=message):
        read_keys_file(path)
    with pytest.raises(KeyFileError, match="cannot read"):
        read_keys_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "header, token",
    [
        ("Bearer sk-1", "sk-1"),
        ("bearer  sk-1 ", "sk-1"),
        ("BEARER sk-1", "sk-1"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic c2stMQ==", None),
        ("sk-1", None),
    ],
)
def test_bearer_tokens(header, token):
    assert bearer_token(header) == token


def test_access_control_without_keys_is_anonymous_and_with_keys_refuses_and_counts():
    metrics = GatewayMetrics()
    open_access = AccessControl(KeyStore(), Limits(), metrics, metrics_auth=True)
    client = open_access.authenticate(None, "rest")
    assert client.name == "anonymous" and client.may_use("anything")
    assert not open_access.metrics_auth  # nothing to ask for without keys

    keys = KeyStore([ApiKey("team", digest_of("sk-team"), frozenset({"m"}), {"max_tokens_cap": 5})])
    access = AccessControl(keys, Limits(max_tokens_cap=50, max_prompt_chars=7), metrics)
    team = access.authenticate("Bearer sk-team", "grpc")
    assert team.limits.max_tokens_cap == 5 and team.limits.max_prompt_chars == 7  # overridden, inherited
    for header in (None, "Bearer sk-other", "Token sk-team"):
        with pytest.raises(Unauthenticated):
            access.authenticate(header, "rest")
    with pytest.raises(ModelNotAllowed):
        access.check_model(team, "not-m", "grpc")
    access.check_model(team, "m", "grpc")
    sample = metrics.registry.get_sample_value
    assert (
        sample("prism_gateway_rejected_requests_total", {"api": "rest", "reason": "auth", "key": "unauthenticated"})
        == 3
    )
    assert sample("prism_gateway_rejected_requests_total", {"api": "grpc", "reason": "forbidden", "key": "team"}) == 1


# ---- a gateway with keys ----------------------------------------------------------------

ADMIN_KEY = "sk-admin-0001"  # every model, given in plain in the file
TEAM_KEY = "sk-team-0002"  # auth-open only, given as its sha256
ENV_KEY = "sk-env-0003"  # from PRISM_API_KEYS
OPEN_MODEL, SECRET_MODEL = "auth-open", "auth-secret"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> Iterator[KeyedGateway]:
    state = tmp_path_factory.mktemp("keyed-gateway")
    keys_file = state / "keys.yaml"
    keys_file.write_text(f"""\
- name: admin
  key: {ADMIN_KEY}
- name: team
  key_sha256: {sha256_hex(TEAM_KEY)}
  models: [{OPEN_MODEL}]
""")
    etcd = EmbeddedEtcd(state / "etcd")
    etcd.start()
    agent = FakeAgent()
    try:
        gateway = start_keyed_gateway(
            etcd, state / "gateway.log", "--api-keys-file", str(keys_file), "--metrics-auth", env_keys=ENV_KEY
        )
        try:
            gateway.serve_model(OPEN_MODEL, agent, ADMIN_KEY)
            gateway.serve_model(SECRET_MODEL, agent, ADMIN_KEY)
            gateway.agent = agent
            yield gateway
        finally:
            stop_process(gateway.process)
    finally:
        agent.stop()
        etcd.stop()


@pytest.fixture(scope="module")
def keyed_stub(keyed: KeyedGateway) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(keyed.grpc_target) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def test_the_log_says_auth_is_on_and_names_the_keys_not_their_values(keyed):
    log = keyed.log()
    assert "authentication is on: 3 API key(s) (admin, team, env-1); /metrics needs a key" in log
    assert ADMIN_KEY not in log and ENV_KEY not in log


def test_health_stays_open(keyed):
    assert httpx.get(keyed.http_url + "/health").status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("sk-wrong"),
        {"Authorization": f"Basic {ADMIN_KEY}"},
        {"Authorization": "Bearer"},
        bearer(ADMIN_KEY + "x"),
    ],
    ids=["none", "unknown", "basic", "empty", "longer"],
)
@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", f"/v1/models/{OPEN_MODEL}"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    ],
)
def test_a_missing_or_bad_key_is_401(keyed, headers, method, path):
    request_id = f"no-key-{time.monotonic_ns()}"
    response = httpx.request(
        method,
        keyed.http_url + path,
        headers={**headers, "x-request-id": request_id},
        json=completion(OPEN_MODEL) if method == "POST" else None,
    )
    error = assert_openai_error(response, 401, "invalid_api_key")
    assert error["type"] == "invalid_request_error"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "sk-wrong" not in error["message"] and ADMIN_KEY not in error["message"]
    assert not keyed.agent.received(request_id)


def test_keys_from_the_file_and_the_environment_serve(keyed):
    for key in (ADMIN_KEY, TEAM_KEY, ENV_KEY):
        response = httpx.post(
            keyed.http_url + "/v1/completions", json=completion(OPEN_MODEL, "echo a b"), headers=bearer(key)
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == "a b "


def test_the_openai_client_sends_its_key(keyed):
    client = openai.OpenAI(base_url=keyed.http_url + "/v1", api_key=TEAM_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [OPEN_MODEL]
    done = client.chat.completions.create(model=OPEN_MODEL, messages=[{"role": "user", "content": "echo hi"}])
    assert done.choices[0].message.content == "hi "
    with pytest.raises(openai.PermissionDeniedError):
        client.completions.create(model=SECRET_MODEL, prompt="echo hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.http_url + "/v1", api_key="sk-nope", max_retries=0).models.list()


def test_models_list_only_what_the_key_may_use(keyed):
    def listed(key: str) -> set[str]:
        return {m["id"] for m in httpx.get(keyed.http_url + "/v1/models", headers=bearer(key)).json()["data"]}

    assert listed(TEAM_KEY) == {OPEN_MODEL}
    assert listed(ADMIN_KEY) >= {OPEN_MODEL, SECRET_MODEL} and listed(ENV_KEY) == listed(ADMIN_KEY)
    assert httpx.get(f"{keyed.http_url}/v1/models/{OPEN_MODEL}", headers=bearer(TEAM_KEY)).status_code == 200
    assert_openai_error(
        httpx.get(f"{keyed.http_url}/v1/models/{SECRET_MODEL}", headers=bearer(TEAM_KEY)),
        403,
        "model_not_allowed",
        "model",
    )


@pytest.mark.parametrize("model", [SECRET_MODEL, "no-such-model"])  # alike: a 403 tells nothing about existence
@pytest.mark.parametrize("stream", [False, True])
def test_a_model_outside_the_keys_list_is_403(keyed, model, stream):
    request_id = f"forbidden-{time.monotonic_ns()}"
    response = httpx.post(
        keyed.http_url + "/v1/completions",
        json=completion(model, stream=stream),
        headers={**bearer(TEAM_KEY), "x-request-id": request_id},
    )
    error = assert_openai_error(response, 403, "model_not_allowed", "model")
    assert model in error["message"]
    assert not keyed.agent.received(request_id)


def test_metrics_need_a_key_and_count_refusals(keyed):
    httpx.get(keyed.http_url + "/v1/models", headers=bearer("sk-wrong"))
    httpx.post(keyed.http_url + "/v1/completions", json=completion(SECRET_MODEL), headers=bearer(TEAM_KEY))
    assert httpx.get(keyed.http_url + "/metrics").status_code == 401
    response = httpx.get(keyed.http_url + "/metrics", headers=bearer(TEAM_KEY))
    assert response.status_code == 200
    samples = metric_values(response.text)
    assert samples['prism_gateway_rejected_requests_total{api="rest",key="unauthenticated",reason="auth"}'] >= 2
    assert samples['prism_gateway_rejected_requests_total{api="rest",key="team",reason="forbidden"}'] >= 1


# ---- the same over gRPC --------------------------------------------------------------


def prompt_request(model: str, prompt: str = "echo ok", request_id: str = "") -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(request_id=request_id, model=model, prompt=prompt)


@pytest.mark.parametrize(
    "metadata", [(), grpc_auth("sk-wrong"), (("authorization", ADMIN_KEY),)], ids=["none", "unknown", "no-scheme"]
)
def test_grpc_without_a_good_key_is_unauthenticated(keyed, keyed_stub, metadata):
    request_id = f"grpc-no-key-{time.monotonic_ns()}"
    with pytest.raises(grpc.RpcError) as caught:
        list(keyed_stub.Generate(prompt_request(OPEN_MODEL, request_id=request_id), metadata=metadata, timeout=5))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(caught.value.trailing_metadata())["x-request-id"] == request_id
    assert not keyed.agent.received(request_id)
    with pytest.raises(grpc.RpcError) as caught:
        keyed_stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=metadata, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_with_a_key(keyed, keyed_stub):
    responses = list(
        keyed_stub.Generate(prompt_request(OPEN_MODEL, "echo x y"), metadata=grpc_auth(TEAM_KEY), timeout=5)
    )
    assert "".join(r.text for r in responses) == "x y "
    models = keyed_stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=grpc_auth(TEAM_KEY), timeout=5).models
    assert [m.name for m in models] == [OPEN_MODEL]
    everything = keyed_stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=grpc_auth(ENV_KEY), timeout=5)
    assert {m.name for m in everything.models} >= {OPEN_MODEL, SECRET_MODEL}


def test_grpc_model_outside_the_keys_list_is_permission_denied(keyed, keyed_stub):
    request_id = f"grpc-forbidden-{time.monotonic_ns()}"
    with pytest.raises(grpc.RpcError) as caught:
        list(
            keyed_stub.Generate(
                prompt_request(SECRET_MODEL, request_id=request_id), metadata=grpc_auth(TEAM_KEY), timeout=5
            )
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and SECRET_MODEL in caught.value.details()
    assert not keyed.agent.received(request_id)


def test_grpc_health_needs_no_key(keyed):
    with grpc.insecure_channel(keyed.grpc_target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---- a bad keys file stops the gateway --------------------------------------------------------


def test_a_bad_keys_file_stops_the_gateway_with_its_reason(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("- name: a\n  key: sk-a\n  models: tiny-llama\n")
    process, _, _ = launch_gateway(
        f"127.0.0.1:{free_port()}", tmp_path / "gateway.log", "--api-keys-file", str(keys_file)
    )
    try:
        assert process.wait(30) == 1
    finally:
        stop_process(process)
    assert "entry 0 (a): models must be a list" in (tmp_path / "gateway.log").read_text()


# ---- without keys: open, as before -------------------------------------------------------------


def test_without_keys_everything_is_open_and_any_authorization_is_ignored(gateway_stack: GatewayStack, echo_model):
    assert "authentication is off" in gateway_stack.log()
    for headers in ({}, bearer("unused"), {"Authorization": "garbage"}):
        response = httpx.post(
            gateway_stack.http_url + "/v1/completions", json=completion(echo_model, "echo hi"), headers=headers
        )
        assert response.status_code == 200, response.text
        assert echo_model in {
            m["id"] for m in httpx.get(gateway_stack.http_url + "/v1/models", headers=headers).json()["data"]
        }
    assert httpx.get(gateway_stack.http_url + "/metrics").status_code == 200
    with grpc.insecure_channel(gateway_stack.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        assert "".join(r.text for r in stub.Generate(prompt_request(echo_model, "echo g"), timeout=5)) == "g "
        assert echo_model in {m.name for m in stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5).models}


# ---- the SDK's api_key ------------------------------------------------------------------


def test_the_sdk_sends_its_key_and_types_the_refusals(keyed, monkeypatch):
    from prism_client import AuthenticationError, PermissionDeniedError, PrismClient

    monkeypatch.delenv("PRISM_API_KEY", raising=False)
    with PrismClient(keyed.grpc_target, api_key=TEAM_KEY, timeout_s=10) as client:
        assert [m.name for m in client.list_models()] == [OPEN_MODEL]
        assert client.generate(OPEN_MODEL, "echo x y").text == "x y "
        with pytest.raises(PermissionDeniedError):
            client.generate(SECRET_MODEL, "echo x")
    with PrismClient(keyed.grpc_target, timeout_s=10) as client, pytest.raises(AuthenticationError):
        client.list_models()
    # The key from the environment, when none is given.
    monkeypatch.setenv("PRISM_API_KEY", ADMIN_KEY)
    with PrismClient(keyed.grpc_target, timeout_s=10) as client:
        assert {m.name for m in client.list_models()} >= {OPEN_MODEL, SECRET_MODEL}


async def test_the_async_sdk_sends_its_key(keyed, monkeypatch):
    from prism_client import AsyncPrismClient, AuthenticationError

    monkeypatch.delenv("PRISM_API_KEY", raising=False)
    async with AsyncPrismClient(keyed.grpc_target, api_key=TEAM_KEY, timeout_s=10) as client:
        assert (await client.generate(OPEN_MODEL, "echo a b")).text == "a b "
        chunks = [c.text async for c in client.generate_stream(OPEN_MODEL, "echo c")]
        assert "".join(chunks) == "c "
    async with AsyncPrismClient(keyed.grpc_target, api_key="sk-wrong", timeout_s=10) as client:
        with pytest.raises(AuthenticationError):
            await client.list_models()
