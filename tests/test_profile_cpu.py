"""bench/profile_cpu.py: the tiny models' engine on the CPU, timed in-process,
gives positive step times that grow with the batch and a profile that loads
back and drives the simulator. No assertions on absolute times."""

from __future__ import annotations

from pathlib import Path

from bench_scripts import load_bench_script

from prism.simulator.profile import LatencyProfile

ROOT = Path(__file__).resolve().parent.parent


def _profile_cpu_module():
    return load_bench_script("profile_cpu")


def batch_costs_more(measured: list[dict]) -> bool:
    """Whether every model's 16-sequence steps and prefills took longer than its one-sequence ones."""
    for m in measured:
        rows = sorted(m["rows"], key=lambda r: r["batch"])
        if not (rows[-1]["step_s"] > rows[0]["step_s"] and rows[-1]["prefill_s"] > rows[0]["prefill_s"]):
            return False
    return True


# A measurement is a mean over a few steps of a few milliseconds: one step slowed by the machine's other
# work (the suite runs on two workers) can invert it (CI, 2026-12-07: 13.0 ms for one sequence, 8.8 for
# 16; and a prefill: 11.1 ms for one prompt, 9.8 for 16). Such a measurement is taken again, up to this many
# times in all.
MEASUREMENTS = 3


def test_cpu_profile_step_times_are_positive_and_grow_with_batch(tmp_path):
    module = _profile_cpu_module()
    for attempt in range(MEASUREMENTS):
        profile, measured = module.profile_cpu(
            tmp_path / f"models-{attempt}", batches=(1, 16), prompts=(16, 32), new_tokens=6
        )
        if batch_costs_more(measured):
            break
    assert {m["model"] for m in measured} == {"tiny-llama", "tiny-qwen2"}
    for m in measured:
        rows = sorted(m["rows"], key=lambda r: r["batch"])
        assert all(r["step_s"] > 0 and r["prefill_s"] > 0 for r in rows)
        assert rows[-1]["step_s"] > rows[0]["step_s"]  # 16 sequences cost more than one
        assert rows[-1]["prefill_s"] > rows[0]["prefill_s"]
    kv = {m["weight_bytes"]: m["kv_bytes_per_token"] for m in measured}
    for point in profile.points:
        w = point.weight_bytes  # a step at 20 tokens of context per sequence, as measured
        one, many = profile.step_s(w, 1, 20 * kv[w], 0), profile.step_s(w, 16, 16 * 20 * kv[w], 0)
        assert 0 < one < many
        assert profile.prefill_s(w, 256) > profile.prefill_s(w, 16) > 0
    path = tmp_path / "profile.json"
    profile.save(path)
    assert LatencyProfile.load(path) == profile


def test_committed_cpu_profile_loads():
    profile = LatencyProfile.load(ROOT / "bench" / "results" / "sim-profile-cpu.json")
    assert profile.device.startswith("CPU")
    assert profile.metadata["source"] == "bench/profile_cpu.py"
    assert all(p.decode_base_s > 0 and p.prefill_per_token_s > 0 for p in profile.points)


def test_a_profile_measured_through_a_real_cluster(tmp_path):
    # Its numbers against the engine alone's are for the benchmark to show (bench/results), not a test to time.
    module = _profile_cpu_module()
    served, measured = module.profile_cpu(
        tmp_path / "models", through_cluster=True, batches=(1, 8), prompts=(16,), new_tokens=6
    )
    assert served.metadata["source"] == "bench/profile_cpu.py --through-cluster"
    assert {m["model"] for m in measured} == {"tiny-llama", "tiny-qwen2"}
    for m in measured:
        rows = sorted(m["rows"], key=lambda r: r["batch"])
        assert [r["batch"] for r in rows] == [1, 8] and all(r["step_s"] > 0 and r["prefill_s"] > 0 for r in rows)
        assert m["weight_bytes"] > 0 and m["kv_bytes_per_token"] > 0
    assert len(served.points) >= 1 and all(p.decode_base_s >= 0 for p in served.points)
    assert served.metadata["rows"] == {m["model"]: m["rows"] for m in measured}


def test_committed_cluster_profile_loads():
    profile = LatencyProfile.load(ROOT / "bench" / "results" / "sim-profile-cpu-cluster.json")
    assert profile.metadata["source"] == "bench/profile_cpu.py --through-cluster"
    assert all(p.decode_base_s > 0 and p.prefill_per_token_s > 0 for p in profile.points)
