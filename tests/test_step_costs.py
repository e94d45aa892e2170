"""Step costs learned from the steps engines run (issue 22): the engine's least-squares sums, the fit
pulled towards the card's profile, the sizes the scheduler prices compute with, and a real engine's
steps on the CPU through the worker wire and a load report into the placement loop."""

from __future__ import annotations

import asyncio
import random

import pytest

from prism.tiny_models import write_tiny_model
from prism_client.v1 import scheduler_pb2
from services.common import placement_config as pc
from services.common import records
from services.common.step_costs import (
    N,
    StepTimeAccumulator,
    StepTimeSums,
    fit_coefficients,
    step_features,
)
from services.gpu_agent.engine import Engine, GenerationRequest
from services.gpu_agent.engine.step_board import DeviceBoards, StepBoard
from services.gpu_agent.workers.wire import stats_from_proto, stats_to_proto
from services.scheduler.policies import H100_COMPUTE_COSTS, H200_COMPUTE_COSTS
from services.scheduler.policies.compute import coefficients_at, measured_sizes, with_measured
from services.scheduler.scheduler_service import SchedulerService
from services.scheduler.server import PlacementLoop, step_sums_by_weight

ONE_B, EIGHT_B = 2_471_628_800, 16_060_522_496
TRUE = (2e-3, 50e-6, 0.4, 6e-3, 10e-3, 80e-6)  # decode base, per seq, s per KV GB, prefill base, per ktoken, per prompt
PRIOR = (1e-3, 30e-6, 0.3, 5e-3, 5e-3, 0.0)


def cost(features) -> float:
    return sum(c * x for c, x in zip(TRUE, features))


def steps(count: int, prefill: bool = True, seed: int = 0) -> list[tuple[float, ...]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        decode = rng.randint(0, 64)
        tokens = rng.choice([0, 0, rng.randint(1, 2048)]) if prefill else 0
        out.append(
            step_features(
                decode if (decode or tokens) else 1,
                decode * rng.randint(100, 4000) * 32768,
                tokens,
                rng.randint(1, 4) if tokens else 0,
            )
        )
    return out


def summed(features_list, noise_s: float = 0.0, seed: int = 1) -> StepTimeSums:
    rng = random.Random(seed)
    acc = StepTimeAccumulator()
    for f in features_list:
        acc.record(f, cost(f) + rng.gauss(0, noise_s))
    return acc.sums()


def test_the_fit_finds_the_costs_the_steps_took():
    exact = fit_coefficients(summed(steps(3000)), PRIOR)
    assert fit_coefficients(summed(steps(3000)), PRIOR, prior_steps=0) == pytest.approx(TRUE, rel=1e-6)
    assert exact == pytest.approx(TRUE, rel=0.05)  # the prior pulls a few steps' worth
    fitted = fit_coefficients(summed(steps(3000), noise_s=0.5e-3), PRIOR)  # with timing jitter
    assert fitted == pytest.approx(TRUE, rel=0.25)
    # What matters: the steps' times, predicted for steps the fit did not see.
    fresh = steps(500, seed=7)
    error = sum(abs(sum(c * x for c, x in zip(fitted, f)) - cost(f)) for f in fresh) / sum(map(cost, fresh))
    assert error < 0.02


def test_what_the_steps_do_not_tell_apart_stays_at_the_profile():
    # Decode steps alone: nothing says what a prefill costs.
    fitted = fit_coefficients(summed(steps(3000, prefill=False)), PRIOR)
    assert fitted[:3] == pytest.approx(TRUE[:3], rel=0.03)
    assert fitted[3:] == pytest.approx(PRIOR[3:], abs=1e-12)
    # A single step cannot tell six costs apart: the prior keeps the fit defined and the prefill's at the profile.
    one = fit_coefficients(summed(steps(1, prefill=False)), PRIOR)
    assert one[3:] == pytest.approx(PRIOR[3:], abs=1e-12) and all(v >= 0 for v in one)


def test_costs_are_never_negative():
    acc = StepTimeAccumulator()
    for decode in range(1, 65):  # dearer at small batches: a negative slope per sequence
        acc.record(step_features(decode, 0, 0, 0), 5e-3 - 4e-5 * decode)
    assert min(fit_coefficients(acc.sums(), PRIOR)) >= 0.0


def test_old_steps_fade_with_the_half_life():
    acc = StepTimeAccumulator(half_life_steps=100)
    for _ in range(100):
        acc.record(step_features(8, 0, 0, 0), 1.0)
    assert acc.sums().steps == pytest.approx(sum(0.5 ** (i / 100) for i in range(100)))
    first = acc.sums().xty[0]
    for _ in range(100):
        acc.record(step_features(8, 0, 0, 0), 0.0)  # a step that took no time adds nothing to X'y
    assert acc.sums().xty[0] == pytest.approx(first / 2)


def test_sums_add_and_come_back_from_a_reports_numbers():
    a, b = summed(steps(10)), summed(steps(10, seed=3))
    both = a + b
    assert both.steps == pytest.approx(20, rel=1e-3) and len(both.xtx) == N * (N + 1) // 2
    assert StepTimeSums.from_values(both.steps, list(both.xtx), list(both.xty)) == both
    with pytest.raises(ValueError, match="need 21 X'X and 6 X'y"):
        StepTimeSums.from_values(1, [0.0] * 3, [0.0] * 6)


def test_a_measured_size_replaces_the_profile_point_of_its_size_and_others_stay():
    profile = H100_COMPUTE_COSTS
    sums = summed(steps(3000))
    assert measured_sizes(profile, {EIGHT_B: summed(steps(150))}) == {}  # too few steps yet
    measured = measured_sizes(profile, {EIGHT_B: sums})
    costs = with_measured(profile, measured)
    assert [p.weight_bytes for p in costs.points] == [p.weight_bytes for p in profile.points]
    assert costs.at(EIGHT_B, "decode_base_s") == pytest.approx(TRUE[0], rel=0.02)
    assert costs.at(EIGHT_B, "prefill_per_token_s") == pytest.approx(TRUE[4] / 1000, rel=0.02)
    assert costs.at(ONE_B, "decode_base_s") == profile.at(ONE_B, "decode_base_s")  # not measured
    assert costs.attention_bytes_per_s == pytest.approx(1e9 / TRUE[2], rel=0.02)
    # A size the profile lacks is added; nothing measured leaves the profile as it was.
    small = with_measured(profile, measured_sizes(profile, {10_000_000: sums}))
    assert small.points[0].weight_bytes == 10_000_000 and len(small.points) == len(profile.points) + 1
    assert with_measured(profile, {}) is profile
    # The prior is the profile at that size, in the fit's units.
    assert coefficients_at(profile, EIGHT_B)[2] == pytest.approx(1e9 / profile.attention_bytes_per_s)


def report_with(agent_id: str, model: str, weight_bytes: int, sums: StepTimeSums) -> scheduler_pb2.LoadReport:
    report = scheduler_pb2.LoadReport(agent_id=agent_id)
    report.gpus.add(gpu_id=0).engines.add(model=model, weight_bytes=weight_bytes)
    report.models.add(model=model, step_count=sums.steps, step_xtx=sums.xtx, step_xty=sums.xty)
    return report


def agent(agent_id: str, kind: str) -> records.AgentRecord:
    name = "NVIDIA H100 80GB HBM3" if kind == "cuda" else "cpu"
    return records.AgentRecord(
        agent_id=agent_id,
        address="127.0.0.1:1",
        started_at=0.0,
        devices=[vars(records.DeviceRecord(0, kind, name, 80 << 30))],
    )


def test_the_placement_loop_prices_compute_with_the_cuda_engines_measured_steps():
    config = pc.parse([{"model_name": "a", "model_path": "/m/a", "init_placements": [{"gpu_ids": [0]}]}])
    sums = summed(steps(3000))
    reports = [report_with("gpu-host", "a", EIGHT_B, sums), report_with("cpu-host", "b", ONE_B, sums)]
    assert set(step_sums_by_weight(reports)) == {EIGHT_B, ONE_B}
    agents = {"gpu-host": agent("gpu-host", "cuda"), "cpu-host": agent("cpu-host", "cpu")}

    def loop(**kw) -> PlacementLoop:
        made = PlacementLoop(
            config,
            None,
            "prism",
            SchedulerService(asyncio.Event()),
            asyncio.Event(),
            1.0,
            1.0,
            compute_from_devices=True,
            **kw,
        )
        made._price_compute_for(agents, reports)
        return made

    cuda = loop()
    assert set(cuda.measured) == {EIGHT_B}  # the CPU agent's engine is not a GPU's cost
    assert cuda.params.compute.at(EIGHT_B, "decode_base_s") == pytest.approx(TRUE[0], rel=0.02)
    assert cuda.params.compute.at(ONE_B, "decode_base_s") == H100_COMPUTE_COSTS.at(ONE_B, "decode_base_s")
    assert set(loop(step_costs_from="all").measured) == {EIGHT_B, ONE_B}
    none = loop(step_costs_from="none")
    assert none.measured == {} and none.params.compute is H100_COMPUTE_COSTS
    with pytest.raises(ValueError, match="step_costs_from"):
        loop(step_costs_from="sometimes")
    # Reports stop (the engines went): the profile prices compute again.
    cuda._price_compute_for(agents, [])
    assert cuda.params.compute is H100_COMPUTE_COSTS
    assert H100_COMPUTE_COSTS is not H200_COMPUTE_COSTS


def test_a_real_engines_steps_reach_the_sums_through_the_worker_wire(tmp_path):
    engine = Engine(write_tiny_model(tmp_path / "llama", arch="llama"))
    engine.start()
    try:
        assert engine.stats().step_times.steps == 0

        async def generate() -> int:
            outs = [
                o
                async for o in engine.generate(
                    GenerationRequest(
                        prompt="Hello there", max_tokens=40, temperature=0.0, ignore_eos=True, request_id="r"
                    )
                )
            ]
            return sum(len(o.token_ids) for o in outs)

        assert asyncio.run(generate()) == 40
        stats = stats_from_proto(stats_to_proto(engine.stats(), active=True))
    finally:
        engine.stop()
    sums = stats.step_times
    # One prefill step, then a decode step per further token (faded a little by the half-life).
    assert 39 < sums.steps <= 40
    assert sums.xtx[0] == pytest.approx(sums.steps)  # the constant feature's square
    assert sums.xty[0] > 0  # the steps took time
    fitted = fit_coefficients(sums, PRIOR)
    assert fitted[0] > 0 and all(v >= 0 for v in fitted)


def test_the_step_board_tells_a_step_that_ran_alone_from_one_beside_another(tmp_path):
    boards = DeviceBoards([0])
    try:
        a_at, b_at = boards.slot_for(0, "a"), boards.slot_for(0, "b")
        assert a_at[1] != b_at[1] and boards.slot_for(0, "a") == a_at  # a model keeps its slot
        a, b = StepBoard(*a_at), StepBoard(*b_at)
        assert a.end(a.begin())  # nobody else stepped
        seen = a.begin()
        assert a.end(seen)
        seen = a.begin()
        b.end(b.begin())  # b stepped while a's step ran
        assert not a.end(seen)
        b_seen = b.begin()  # b is mid-step when a begins
        seen = a.begin()
        assert not a.end(seen)
        assert not b.end(b_seen)  # a's step ran while b's did
        # An engine that died mid-step leaves its slot busy; the next engine in that slot idles it.
        b.begin()
        b2 = StepBoard(*b_at)
        assert a.end(a.begin())
        for board in (a, b2):
            board.close()
        boards.release("b")
        assert boards.slot_for(0, "c") == b_at  # freed slots are given again
        with pytest.raises(ValueError, match="slots 0-63"):
            StepBoard(a_at[0], 64)
    finally:
        boards.close()


def test_an_engine_with_a_board_fits_only_its_steps_that_ran_alone(tmp_path):
    boards = DeviceBoards([0])
    model = write_tiny_model(tmp_path / "llama", arch="llama")
    engine = Engine(model, step_board=boards.slot_for(0, "llama"))
    neighbour = StepBoard(*boards.slot_for(0, "neighbour"))
    engine.start()

    async def generate(tokens: int) -> None:
        outs = [
            o
            async for o in engine.generate(
                GenerationRequest(
                    prompt="Hello there", max_tokens=tokens, temperature=0.0, ignore_eos=True, request_id="r"
                )
            )
        ]
        assert sum(len(o.token_ids) for o in outs) == tokens

    try:
        asyncio.run(generate(20))
        alone = engine.stats().step_times.steps
        assert 19 < alone <= 20
        long_step = neighbour.begin()  # a neighbour's step that lasts through the whole request
        asyncio.run(generate(20))
        assert engine.stats().step_times.steps == alone  # none of its steps ran alone: none recorded
        neighbour.end(long_step)
    finally:
        engine.stop()
        neighbour.close()
        boards.close()
