"""Which step costs the live scheduler prices compute with: the fitted costs of the card its agents
name (an H100 cluster was priced with H200 constants before: a decode step a third cheaper than it
is), or an operator's own profile (--compute-costs)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.common import placement_config as pc
from services.common import records
from services.scheduler.policies import (
    H100_COMPUTE_COSTS,
    H200_COMPUTE_COSTS,
    compute_costs_for,
    compute_costs_from_profile,
)
from services.scheduler.scheduler_service import SchedulerService
from services.scheduler.server import PlacementLoop, parse_args

ROOT = Path(__file__).resolve().parent.parent
H100_NAME, H200_NAME = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
EIGHT_B = 16_060_522_496


def test_the_cards_named_choose_the_costs():
    assert compute_costs_for([("cuda", H100_NAME)]) is H100_COMPUTE_COSTS
    assert compute_costs_for([("cuda", H200_NAME), ("cuda", H200_NAME)]) is H200_COMPUTE_COSTS
    # A mix is priced as its slowest card; an unknown card as the H100 (the slower fit).
    assert compute_costs_for([("cuda", H200_NAME), ("cuda", H100_NAME)]) is H100_COMPUTE_COSTS
    assert compute_costs_for([("cuda", "NVIDIA A100-SXM4-80GB")]) is H100_COMPUTE_COSTS
    # CPU devices keep the constants the CPU cluster has always been priced with.
    assert compute_costs_for([("cpu", "cpu (2 cores)")]) is H200_COMPUTE_COSTS
    assert H100_COMPUTE_COSTS.at(EIGHT_B, "decode_base_s") > 1.3 * H200_COMPUTE_COSTS.at(EIGHT_B, "decode_base_s")


@pytest.mark.parametrize("card, constants", [("h100", H100_COMPUTE_COSTS), ("h200", H200_COMPUTE_COSTS)])
def test_the_built_in_costs_are_the_committed_fits_rounded(card, constants):
    fitted = compute_costs_from_profile(json.loads((ROOT / f"bench/results/sim-profile-{card}.json").read_text()))
    for size in (2_471_628_800, 6_425_499_648, EIGHT_B):
        for field in ("decode_base_s", "decode_per_seq_s", "prefill_per_token_s"):
            assert constants.at(size, field) == pytest.approx(fitted.at(size, field), rel=0.02, abs=1e-7), (size, field)
    assert constants.attention_bytes_per_s == pytest.approx(fitted.attention_bytes_per_s, rel=0.01)


def test_a_profile_that_is_not_one_is_refused_with_what_it_lacks(tmp_path):
    with pytest.raises(ValueError, match="not a latency profile"):
        compute_costs_from_profile({"points": [{"weight_bytes": 1}]})
    with pytest.raises(ValueError, match="must not be negative"):
        compute_costs_from_profile(
            {
                "attention_bytes_per_s": 1e12,
                "points": [
                    {
                        "weight_bytes": 1,
                        "decode_base_s": -1e-3,
                        "decode_per_seq_s": 0,
                        "prefill_base_s": 0,
                        "prefill_per_token_s": 0,
                    }
                ],
            }
        )
    bad = tmp_path / "costs.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit):
        parse_args(["--config", "x.json", "--compute-costs", str(bad)])
    assert (
        parse_args(["--config", "x.json", "--compute-costs", str(ROOT / "bench/results/sim-profile-h100.json")])
        .compute.points[0]
        .weight_bytes
        == 2_471_628_800
    )


def test_the_placement_loop_prices_compute_as_its_agents_cards():
    config = pc.parse([{"model_name": "a", "model_path": "/m/a", "init_placements": [{"gpu_ids": [0]}]}])

    def agent(name: str, kind: str = "cuda") -> records.AgentRecord:
        return records.AgentRecord(
            agent_id=name,
            address="127.0.0.1:1",
            started_at=0.0,
            devices=[vars(records.DeviceRecord(0, kind, f"NVIDIA {name}" if kind == "cuda" else "cpu", 80 << 30))],
        )

    loop = PlacementLoop(
        config, None, "prism", SchedulerService(asyncio.Event()), asyncio.Event(), 1.0, 1.0, compute_from_devices=True
    )
    loop._price_compute_for({"x": agent("H100")}, [])
    assert loop.params.compute is H100_COMPUTE_COSTS
    loop._price_compute_for({"x": agent("H200")}, [])
    assert loop.params.compute is H200_COMPUTE_COSTS
    operator = PlacementLoop(config, None, "prism", SchedulerService(asyncio.Event()), asyncio.Event(), 1.0, 1.0)
    operator._price_compute_for({"x": agent("H100")}, [])  # --compute-costs given: left as it was
    assert operator.params.compute is H200_COMPUTE_COSTS


def test_the_placement_loop_counts_prefill_steps_with_its_devices_step_budget():
    """The compute model counts a model's prefill steps as its prompt tokens over the engines' step budget:
    2048 tokens on CUDA (the built-in engine's there), 512 on CPUs. Priced with the CPU's budget, a 3B at
    45 req/s of 512-token prompts on an H200 cost 1.37 GPUs; with its engines' own, 0.98."""
    from services.common.step_costs import CUDA_STEP_TOKENS, DEFAULT_STEP_TOKENS
    from services.scheduler.policies import ClusterSnapshot, ModelDemand, PolicyParams, compute_load

    config = pc.parse([{"model_name": "a", "model_path": "/m/a", "init_placements": [{"gpu_ids": [0]}]}])

    def agent(kind: str) -> records.AgentRecord:
        return records.AgentRecord(
            agent_id="x",
            address="127.0.0.1:1",
            started_at=0.0,
            devices=[vars(records.DeviceRecord(0, kind, "NVIDIA H200" if kind == "cuda" else "cpu", 80 << 30))],
        )

    loop = PlacementLoop(config, None, "prism", SchedulerService(asyncio.Event()), asyncio.Event(), 1.0, 1.0)
    assert loop.params.step_tokens == DEFAULT_STEP_TOKENS
    loop._price_compute_for({"x": agent("cuda")}, [])
    assert loop.params.step_tokens == CUDA_STEP_TOKENS
    loop._price_compute_for({"x": agent("cpu")}, [])
    assert loop.params.step_tokens == DEFAULT_STEP_TOKENS

    model = config.models[0]
    snapshot = ClusterSnapshot(
        models=(model,),
        agents=(),
        weight_bytes={"a": 6_425_499_648},
        demand={
            "a": ModelDemand(
                arrival_rate=45.0, busy_fraction=1.0, running=100, mean_prompt_tokens=512, mean_output_tokens=128
            )
        },
    )
    cpu_budget, cuda_budget = (
        compute_load(snapshot, model, PolicyParams(step_tokens=n)) for n in (DEFAULT_STEP_TOKENS, CUDA_STEP_TOKENS)
    )
    assert cuda_budget < 0.8 * cpu_budget
