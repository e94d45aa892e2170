"""The kvpr policy (the original Prism's KV-pressure-ratio placement) on hand-built snapshots, and
in `prism simulate` on a small trace."""

from __future__ import annotations

import json
from pathlib import Path

from services.common.placement_config import InitPlacement, ModelConfig
from services.scheduler.policies import (
    MANAGES_ACTIVITY,
    POLICIES,
    AgentView,
    ClusterSnapshot,
    ModelDemand,
    PolicyParams,
    ReplicaTarget,
)
from services.scheduler.policies.kvpr import kvpr_policy, pressure_weight

GB = 1 << 30


def model(name: str, ttft_ms: float | None = None) -> ModelConfig:
    return ModelConfig(
        model_name=name,
        model_path=f"/m/{name}",
        tp_size=1,
        ttft_slo_ms=ttft_ms,
        init_placements=(InitPlacement(gpu_ids=(0,), on=False),),
    )


def gpus(*names: str, memory_gb: int = 80) -> tuple[AgentView, ...]:
    return tuple(AgentView(n, frozenset({0}), {0: memory_gb * GB}) for n in names)


def rate(r: float) -> ModelDemand:
    return ModelDemand(arrival_rate=r, recent_arrival_rate=r)


def active_sets(placement) -> dict[str, str]:
    return {m: r[0].agent_id for m, r in placement.items() if r and r[0].active}


def test_kvpr_is_a_registered_policy_that_switches_engines_on_and_off():
    assert POLICIES["kvpr"] is kvpr_policy and "kvpr" in MANAGES_ACTIVITY


def test_the_weight_is_rate_over_the_ttft_slo():
    snap = ClusterSnapshot(
        models=(model("a"), model("tight", ttft_ms=500)), agents=gpus("x"), demand={"a": rate(4.0), "tight": rate(4.0)}
    )
    assert pressure_weight(snap, snap.models[0]) == 4.0
    assert pressure_weight(snap, snap.models[1]) == 8.0  # a tighter SLO weighs more


def test_models_go_by_weight_each_where_the_worst_ratio_stays_lowest():
    # Equal weights on two equal GPUs: the heaviest first on x, the next on y, the lightest beside the
    # second (y's ratio 5+1 stays below x's 10).
    models = (model("light"), model("heavy"), model("middle"))
    snap = ClusterSnapshot(
        models=models,
        agents=gpus("x", "y"),
        demand={"heavy": rate(10.0), "middle": rate(5.0), "light": rate(1.0)},
        weight_bytes={"heavy": 16 * GB, "middle": 16 * GB, "light": 16 * GB},
    )
    assert active_sets(kvpr_policy(snap)) == {"heavy": "x", "middle": "y", "light": "y"}


def test_the_kv_left_after_weights_is_the_denominator():
    # Same w: the model goes where its weights leave more KV per unit of pressure.
    models = (model("big"), model("small"), model("new"))
    snap = ClusterSnapshot(
        models=models,
        agents=gpus("x", "y"),
        demand={"big": rate(1.0), "small": rate(1.0), "new": rate(1.0)},
        weight_bytes={"big": 60 * GB, "small": 2 * GB, "new": 2 * GB},
        current={"big": [ReplicaTarget("x", (0,), True)], "small": [ReplicaTarget("y", (0,), True)]},
    )
    assert active_sets(kvpr_policy(snap))["new"] == "y"


def test_a_model_whose_weights_leave_no_kv_is_switched_off_and_cold_ones_stay_off():
    models = (model("a"), model("b"), model("cold"))
    snap = ClusterSnapshot(
        models=models,
        agents=gpus("x"),
        demand={"a": rate(5.0), "b": rate(1.0)},
        weight_bytes={"a": 50 * GB, "b": 40 * GB, "cold": 1 * GB},
    )
    placement = kvpr_policy(snap)
    assert active_sets(placement) == {"a": "x"}
    assert placement["b"] == [ReplicaTarget("x", (0,), False)]  # its requests switch it on where room is made
    assert placement["cold"] == [ReplicaTarget("x", (0,), False)]


def test_tau_keeps_a_placement_whose_worst_ratio_is_close_and_moves_one_far_worse():
    # a and b both run on x; y is empty. Fresh, the heuristic would split them. With both on x the worst
    # ratio is (wa + wb) / kv, against wa / kv split: twice (b as heavy as a) or 1.25 times (b a quarter).
    models = (model("a"), model("b"))
    current = {"a": [ReplicaTarget("x", (0,), True)], "b": [ReplicaTarget("x", (0,), True)]}
    weights = {"a": 8 * GB, "b": 8 * GB}

    def plan(rate_b: float, tau: float) -> dict[str, str]:
        snap = ClusterSnapshot(
            models=models,
            agents=gpus("x", "y"),
            demand={"a": rate(4.0), "b": rate(rate_b)},
            weight_bytes=weights,
            current=current,
        )
        return active_sets(kvpr_policy(snap, PolicyParams(kvpr_tau=tau)))

    assert plan(rate_b=1.0, tau=0.5) == {"a": "x", "b": "x"}  # 1.25x worse: within tau, nothing moves
    # 2x worse: past tau, one of them moves to y (the first by w, each deciding with the other in place)
    assert plan(rate_b=4.0, tau=0.5) == {"a": "y", "b": "x"}
    assert plan(rate_b=1.0, tau=0.1) == {"a": "y", "b": "x"}  # a smaller tau moves one at 1.25x


def test_tau_applies_to_each_model_so_a_move_moves_only_the_models_that_gain():
    # a and b (as heavy) share x, c runs alone on y, z is empty. Taking a whole fresh plan (a on x, b
    # on y, c on z: the worst ratio halved) would move c too; per model, one of a and b moves to z
    # and c stays where it is.
    models = (model("a"), model("b"), model("c"))
    current = {
        "a": [ReplicaTarget("x", (0,), True)],
        "b": [ReplicaTarget("x", (0,), True)],
        "c": [ReplicaTarget("y", (0,), True)],
    }
    snap = ClusterSnapshot(
        models=models,
        agents=gpus("x", "y", "z"),
        demand={"a": rate(4.0), "b": rate(4.0), "c": rate(1.0)},
        weight_bytes=dict.fromkeys(("a", "b", "c"), 8 * GB),
        current=current,
    )
    placed = active_sets(kvpr_policy(snap))
    assert placed["c"] == "y" and sorted((placed["a"], placed["b"])) == ["x", "z"]


def test_a_model_whose_engine_is_still_loading_stays_where_it_loads():
    # b was placed on z and its engine loads there (it reads inactive). Fresh, the heuristic puts b on
    # y (as good, and first in order): within tau, b stays on z; re-placing it each pass moved a model
    # whose load had not ended (200 models on 64 GPUs: 11 loads a model in 5 simulated seconds).
    models = (model("a"), model("b"))
    snap = ClusterSnapshot(
        models=models,
        agents=gpus("x", "y", "z"),
        demand={"a": rate(4.0), "b": rate(2.0)},
        weight_bytes={"a": 8 * GB, "b": 8 * GB},
        current={"a": [ReplicaTarget("x", (0,), True)], "b": [ReplicaTarget("z", (0,), False)]},
    )
    assert active_sets(kvpr_policy(snap)) == {"a": "x", "b": "z"}


def test_prism_simulate_runs_kvpr_on_a_small_trace(tmp_path):
    from typer.testing import CliRunner

    from prism.cli import app
    from prism.workload.generator import BurstyGroupParams, bursty_group_trace

    root = Path(__file__).resolve().parent.parent
    config = [
        {
            "model_name": f"m{i}",
            "model_path": str(root / "bench" / "configs" / "llama-3.2-1b"),
            "load_format": "dummy",
            "init_placements": [{"gpu_ids": [0], "on": False}],
        }
        for i in range(3)
    ]
    (tmp_path / "models.json").write_text(json.dumps(config))
    bursty_group_trace(
        BurstyGroupParams(num_models=3, num_groups=3, shift_s=5, rate=4, duration_s=15, seed=1), ["m0", "m1", "m2"]
    ).save(tmp_path / "trace.jsonl")
    done = CliRunner().invoke(
        app,
        [
            "simulate",
            str(tmp_path / "trace.jsonl"),
            "--config",
            str(tmp_path / "models.json"),
            "--gpus",
            "1",
            "--gpus-per-agent",
            "1",
            "--policy",
            "kvpr",
            "--out",
            str(tmp_path / "out.json"),
        ],
    )
    assert done.exit_code == 0, done.output
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["simulation"]["policy"] == "kvpr"
    assert result["overall"]["requests"] > 0 and result["overall"]["slo_attainment"] > 0.9
