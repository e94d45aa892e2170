"""The agent's CUDA MPS daemon (services/gpu_agent/cuda_mps.py). No MPS
runs on these machines, so the control binary is a fake (a shell script
named so) that records how it was called; the real one was run on the H100
(bench/results/colocated_steps-6engines-h100-mps.json)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.gpu_agent.cuda_mps import LOG_ENV, PIPE_ENV, MpsError, start_mps


def fake_control(tmp_path: Path, daemon_exit: int = 0) -> tuple[str, Path]:
    calls = tmp_path / "calls.txt"
    script = tmp_path / "fake-nvidia-cuda-mps-control"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "-d" ]; then
  echo "start pipe=${PIPE_ENV} log=${LOG_ENV}" >> {calls}
  [ {daemon_exit} -eq 0 ] || {{ echo "An instance of this daemon is already running" >&2; exit {daemon_exit}; }}
  exit 0
fi
echo "stdin=$(cat) pipe=${PIPE_ENV}" >> {calls}
""")
    script.chmod(0o755)
    return str(script), calls


@pytest.fixture
def clean_env(monkeypatch):
    for name in (PIPE_ENV, LOG_ENV):  # set, then removed: monkeypatch puts back what was there before
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)


def test_off_starts_nothing(clean_env, tmp_path):
    binary, calls = fake_control(tmp_path)
    assert start_mps("off", binary) is None
    assert not calls.exists() and PIPE_ENV not in os.environ


def test_missing_binary_is_skipped_on_auto_and_an_error_on_on(clean_env):
    assert start_mps("auto", "no-such-mps-control-binary") is None
    with pytest.raises(MpsError, match="not on PATH"):
        start_mps("on", "no-such-mps-control-binary")


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="auto, on, off"):
        start_mps("sometimes")


def test_started_daemon_is_exported_to_workers_and_quit_on_stop(clean_env, tmp_path):
    binary, calls = fake_control(tmp_path)
    daemon = start_mps("auto", binary)
    assert daemon is not None and daemon.owned
    pipe = os.environ[PIPE_ENV]
    assert Path(pipe) == daemon.pipe_dir and daemon.pipe_dir.is_dir() and Path(os.environ[LOG_ENV]).is_dir()
    assert calls.read_text().splitlines() == [f"start pipe={pipe} log={os.environ[LOG_ENV]}"]
    daemon.stop()
    daemon.stop()  # once only
    assert calls.read_text().splitlines()[1:] == [f"stdin=quit pipe={pipe}"]


def test_failed_start_is_an_error_on_on_and_a_fallback_on_auto(clean_env, tmp_path):
    binary, _ = fake_control(tmp_path, daemon_exit=1)
    with pytest.raises(MpsError, match="already running"):
        start_mps("on", binary)
    assert start_mps("auto", binary) is None
    assert PIPE_ENV not in os.environ


def test_operators_daemon_is_used_and_left_running(clean_env, tmp_path, monkeypatch):
    binary, calls = fake_control(tmp_path)
    pipe = tmp_path / "operator-pipe"
    pipe.mkdir()
    (pipe / "control").touch()
    monkeypatch.setenv(PIPE_ENV, str(pipe))
    daemon = start_mps("on", binary)
    assert daemon is not None and not daemon.owned and daemon.pipe_dir == pipe
    daemon.stop()
    assert not calls.exists()
