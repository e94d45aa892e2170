"""The scheduler's demand memory (services/scheduler/demand.py): a model's rates are its requests over
the report window, whichever engine took them (a departed engine's still counted while within it, a
new replica's not counted as if it had served the whole window); its counts are its engines' summed."""

import pytest

from services.scheduler.demand import MIN_RATE_SPAN_S, RECENT_RATE_S, DemandMemory, EngineLoad
from services.scheduler.policies import ModelDemand


def load(
    rate: float, recent: float | None = None, busy: float = 0.0, window_s: float = 60.0, running: int = 0
) -> EngineLoad:
    return EngineLoad(
        ModelDemand(
            arrival_rate=rate,
            recent_arrival_rate=rate if recent is None else recent,
            busy_fraction=busy,
            running=running,
            mean_prompt_tokens=500.0,
            mean_output_tokens=100.0,
        ),
        window_s,
    )


def test_the_spans_are_the_agents():
    from services.gpu_agent import request_stats

    assert (RECENT_RATE_S, MIN_RATE_SPAN_S) == (request_stats.RECENT_RATE_S, request_stats.MIN_RATE_SPAN_S)


def test_engines_of_one_model_add_up():
    memory = DemandMemory()
    demand = memory.demand(
        0.0, {("a", "m"): load(3.0, busy=0.5), ("b", "m"): load(1.0, busy=0.25), ("a", "other"): load(2.0)}
    )
    assert demand["m"].arrival_rate == pytest.approx(4.0)
    assert demand["m"].busy_fraction == pytest.approx(0.75)
    assert demand["other"].arrival_rate == pytest.approx(2.0)


def test_an_unloaded_replica_still_counts_its_window_fading_over_it():
    """Three replicas of 5 req/s each; one is unloaded. Its 5 req/s stay in the sum, fading over its 60 s
    window, its recent rate over 10 s; its running requests do not (it has none left)."""
    memory = DemandMemory()
    three = {(agent, "m"): load(5.0, busy=0.6, running=4) for agent in "abc"}
    assert memory.demand(0.0, three)["m"].arrival_rate == pytest.approx(15.0)
    two = {k: v for k, v in three.items() if k[0] != "c"}

    at_once = memory.demand(1.0, two)["m"]
    assert at_once.arrival_rate == pytest.approx(10.0 + 5.0)  # left at 1.0: all of it still in its window
    assert at_once.running == 8
    assert at_once.busy_fraction == pytest.approx(1.2 + 0.6)

    later = memory.demand(31.0, two)["m"]
    assert later.arrival_rate == pytest.approx(10.0 + 2.5)  # half its window later: half
    assert later.recent_arrival_rate == pytest.approx(10.0)  # its last 10 s have gone by
    assert later.busy_fraction == pytest.approx(1.2 + 0.3)
    assert memory.demand(61.0, two)["m"].arrival_rate == pytest.approx(10.0)  # a window later: nothing


def test_a_model_unloaded_everywhere_reads_its_fading_rate_and_no_load():
    memory = DemandMemory()
    memory.demand(0.0, {("a", "m"): load(2.0, running=3)})
    assert memory.demand(1.0, {})["m"].arrival_rate == pytest.approx(2.0)  # the first plan without it
    gone = memory.demand(16.0, {})["m"]
    assert gone.arrival_rate == pytest.approx(1.5)
    assert gone.recent_arrival_rate == 0.0
    assert (gone.running, gone.queued, gone.kv_demand_bytes) == (0, 0, 0)
    assert (gone.mean_prompt_tokens, gone.mean_output_tokens) == (500.0, 100.0)
    assert "m" not in memory.demand(61.0, {})


def test_a_young_engine_fades_over_its_shorter_span():
    memory = DemandMemory()
    memory.demand(0.0, {("a", "m"): load(4.0, window_s=20.0)})
    memory.demand(1.0, {})
    assert memory.demand(11.0, {})["m"].arrival_rate == pytest.approx(2.0)
    assert "m" not in memory.demand(21.0, {})


def test_a_late_report_is_not_a_departure():
    """An agent whose report was missing from one plan (late) reports the same engine again, its window
    reaching back before it 'left': its own window counts those requests, so they are not counted twice."""
    memory = DemandMemory()
    memory.demand(0.0, {("a", "m"): load(5.0)})
    assert memory.demand(2.0, {})["m"].arrival_rate == pytest.approx(5.0)
    assert memory.demand(4.0, {("a", "m"): load(5.0)})["m"].arrival_rate == pytest.approx(5.0)


def test_a_reloaded_engine_counts_beside_its_predecessor():
    """Unloaded and loaded again on the same agent: the new engine's window starts at its load, so the
    old one's requests, before it, still count beside it: the model's over the window."""
    memory = DemandMemory()
    memory.demand(0.0, {("a", "m"): load(6.0)})
    memory.demand(10.0, {})  # unloaded at 10 s
    demand = memory.demand(40.0, {("a", "m"): load(1.0, window_s=5.0)})["m"]  # loaded again at 35 s
    # 5 requests in the new engine's 5 s, the old one's last 30 s of 6/s: over the 60 s window
    assert demand.arrival_rate == pytest.approx((1.0 * 5 + 6.0 * 30) / 60)


def test_a_new_replica_does_not_count_the_share_it_took_over_twice():
    """A model at 40 req/s on one replica gets a second: 5 s later each takes 20/s. The new one's rate is
    its 5 s; the old one's minute still counts 40/s for 55 s of it. The model's rate is its requests over
    the minute (40.0), not the sum of the two rates (60); its recent rate its last 10 s's (40.0)."""
    memory = DemandMemory()
    old = EngineLoad(
        ModelDemand(arrival_rate=(40 * 55 + 20 * 5) / 60, recent_arrival_rate=(40 * 5 + 20 * 5) / 10), 60.0
    )
    new = EngineLoad(ModelDemand(arrival_rate=20.0, recent_arrival_rate=20.0), 5.0)
    demand = memory.demand(0.0, {("a", "m"): old, ("b", "m"): new})["m"]
    assert demand.arrival_rate == pytest.approx(40.0)
    assert demand.recent_arrival_rate == pytest.approx(40.0)


def test_young_engines_alone_are_read_over_their_span():
    memory = DemandMemory()
    demand = memory.demand(0.0, {("a", "m"): load(3.0, window_s=4.0), ("b", "m"): load(1.0, window_s=2.0)})["m"]
    assert demand.arrival_rate == pytest.approx((3 * 4 + 1 * 2) / 4)
