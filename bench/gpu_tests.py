"""Every test file that needs a GPU (CUDA, its Triton kernels, kvcached), run in one go, and a dated
record of what passed, failed and was skipped, with the card: CI has no GPU, so these tests leave
their evidence here (bench/results/gpu_tests-<card>.json, committed from the GPU machine).

On the lent GPU machine (bench/gpu_tests.sh does the same):

    source .device/setup-kvcached.sh .device
    python bench/gpu_tests.py --out $OUT/gpu_tests-h100.json

Skips are recorded with their reasons (the two-GPU file on one card, SGLang where it is absent); the
exit status is pytest's. On a machine without a GPU everything skips, which the record says."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import common  # noqa: F401  first: puts the project on sys.path
from common import ROOT, environment, table, write_json

GPU_TEST_FILES = (
    "tests/test_engine_cuda.py",
    "tests/test_paged_attention_cuda.py",
    "tests/test_triton_decode.py",
    "tests/test_fused_ops.py",
    "tests/test_tensor_parallel_cuda.py",
    "tests/test_sglang_driver.py",
    "tests/test_gguf_cuda.py",
)


def file_of(classname: str) -> str:
    """The test file a JUnit classname ("tests.test_x" or "tests.test_x.TestClass") names."""
    parts = classname.split(".")
    for end in range(len(parts), 0, -1):
        path = "/".join(parts[:end]) + ".py"
        if (ROOT / path).exists():
            return path
    return classname


def outcomes(junit_xml: Path) -> list[dict]:
    """One row per test case of a pytest JUnit report: file, test, outcome, and why where not passed."""
    rows = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        row = {
            "file": file_of(case.get("classname", "")),
            "test": case.get("name", ""),
            "seconds": float(case.get("time", 0.0)),
            "outcome": "passed",
        }
        for tag, outcome in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                why = (found.get("message") or found.text or "").strip()
                row.update(outcome=outcome, why=why.splitlines()[0][:300] if why else "")
                break
        rows.append(row)
    return rows


def per_file(rows: list[dict]) -> list[dict]:
    files: dict[str, dict] = {}
    for row in rows:
        entry = files.setdefault(row["file"], {"file": row["file"], "passed": 0, "failed": 0, "error": 0, "skipped": 0})
        entry[row["outcome"]] += 1
    return list(files.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where the record goes (JSON)")
    p.add_argument("--files", nargs="+", default=list(GPU_TEST_FILES))
    p.add_argument("--timeout-s", type=float, default=540.0, help="the whole run's limit")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="prism-gpu-tests-") as tmp:
        report = Path(tmp) / "junit.xml"
        try:
            rc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-rs", f"--junitxml={report}", *args.files],
                cwd=ROOT,
                timeout=args.timeout_s,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124  # what the report holds so far is still recorded
        rows = outcomes(report) if report.exists() else []
    files = per_file(rows)
    write_json(
        args.out,
        {
            "benchmark": "gpu_tests",
            "environment": environment(),
            "pytest_exit_status": rc,
            "files": files,
            "tests": rows,
        },
    )
    print(
        table(
            files,
            [
                ("file", "file", "s"),
                ("passed", "passed", "d"),
                ("failed", "failed", "d"),
                ("error", "error", "d"),
                ("skipped", "skipped", "d"),
            ],
        )
    )
    sys.exit(rc)


if __name__ == "__main__":
    main()
