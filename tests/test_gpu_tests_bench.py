"""bench/gpu_tests.py: the GPU-only test files' run leaves a record of every outcome (here, without a
GPU, the CUDA file skips with its reason) and a failure fails the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_record_has_every_outcome_and_a_failure_fails_the_run(tmp_path):
    failing = tmp_path / "test_gpu_record_probe.py"
    failing.write_text("def test_passes():\n    pass\n\n\ndef test_fails():\n    assert 1 == 2, 'one is not two'\n")
    out = tmp_path / "gpu_tests.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/gpu_tests.py",
            "--out",
            str(out),
            "--files",
            "tests/test_paged_attention_cuda.py",
            str(failing),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    record = json.loads(out.read_text())
    assert record["benchmark"] == "gpu_tests" and record["pytest_exit_status"] == 1
    assert record["environment"]["date"]
    by_test = {row["test"]: row for row in record["tests"]}
    assert by_test["test_passes"]["outcome"] == "passed"
    assert by_test["test_fails"]["outcome"] == "failed" and "one is not two" in by_test["test_fails"]["why"]
    cuda = [row for row in record["tests"] if row["file"] == "tests/test_paged_attention_cuda.py"]
    assert cuda and all(row["outcome"] == "skipped" and "CUDA" in row["why"] for row in cuda)
    files = {f["file"]: f for f in record["files"]}
    assert files["tests/test_paged_attention_cuda.py"]["skipped"] == len(cuda)
    assert done.stdout.rstrip().splitlines()[-4].split() == ["file", "passed", "failed", "error", "skipped"]
