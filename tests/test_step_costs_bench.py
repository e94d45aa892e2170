"""bench/step_costs.py as a dry run on the CPU: a real cluster serves a tiny model at a few batch sizes,
its engine's steps are fitted by the scheduler (--step-costs-from all on a CPU cluster), and the bench
reads the published costs back and compares them with the profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_cpu_dry_run_reads_back_the_costs_the_scheduler_fitted(tmp_path):
    out = tmp_path / "step_costs.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "step_costs.py"),
            "--device",
            "cpu",
            "--out",
            str(out),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    payload = json.loads(out.read_text())
    assert payload["completed"] == {"tiny": 2 * (1 + 4 + 16 + 32)}  # every request ran its 24 tokens
    (size,) = payload["sizes"]
    assert size["steps"] >= 200  # the scheduler fits a size from 200 steps on
    # A decode step's fixed cost is what every step has; the smaller costs may fit at 0 on a noisy CPU.
    assert size["decode_base_s"] > 0
    assert all(size[k] >= 0 for k in ("decode_per_seq_s", "prefill_base_s", "prefill_per_token_s", "prefill_per_seq_s"))
    assert [tuple(s["shape"]) for s in size["shapes"]][0] == (1, 512, 0, 0)
    assert all(s["measured_ms"] > 0 and s["profile_ms"] > 0 for s in size["shapes"])
    assert "measured / profile" in done.stdout.splitlines()[-len(size["shapes"]) - 2]  # the table is last
