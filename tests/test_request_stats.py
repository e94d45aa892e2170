"""ModelRequestStats: the sliding-window numbers behind load reports,
/metrics and `prism top`, driven by a fake clock."""

from __future__ import annotations

import pytest

from services.gpu_agent.request_stats import ModelRequestStats, percentile
from services.gpu_agent.slo import ModelSlo


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


def make_stats(clock: FakeClock, window_s: float = 10.0, **kwargs) -> ModelRequestStats:
    return ModelRequestStats(ModelSlo(ttft_ms=500, tpot_ms=50), window_s=window_s, clock=clock, **kwargs)


def test_nothing_recorded_is_all_zero_and_full_attainment(clock):
    snap = make_stats(clock).snapshot()
    assert snap.arrival_rate == 0 and snap.finished_requests == 0
    assert (snap.ttft_p50_ms, snap.ttft_p99_ms, snap.tpot_p50_ms, snap.tpot_p99_ms) == (0, 0, 0, 0)
    assert snap.slo_attainment == 1.0
    assert snap.shed_requests == 0 and snap.failed_requests == 0


def test_arrival_rate_over_a_full_window(clock):
    stats = make_stats(clock, window_s=10.0)
    clock.advance(20)  # the window is full
    for _ in range(30):
        stats.arrived()
        clock.advance(0.1)
    snap = stats.snapshot()
    assert snap.window_s == 10.0
    assert snap.arrival_rate == pytest.approx(3.0)


def test_arrival_rate_just_after_start_divides_by_the_time_seen(clock):
    stats = make_stats(clock, window_s=60.0)
    clock.advance(4)
    for _ in range(8):
        stats.arrived()
    snap = stats.snapshot()
    assert snap.window_s == pytest.approx(4.0)
    assert snap.arrival_rate == pytest.approx(2.0)  # 8 in 4 s, not 8 in 60 s


def test_stats_started_before_now_count_the_time_since(clock):
    # The simulator backdates the stats of engines that were up before its trace began.
    stats = make_stats(clock, window_s=60.0, started_at=clock.now - 30)
    for _ in range(15):
        stats.arrived()
    snap = stats.snapshot()
    assert snap.window_s == pytest.approx(30.0)
    assert snap.arrival_rate == pytest.approx(0.5)  # 15 over the 30 s seen, not 15 over the 1 s minimum


def test_the_recent_arrival_rate_shows_a_burst_the_window_rate_hides(clock):
    stats = make_stats(clock, window_s=60.0)
    for _ in range(30):  # a quiet minute: one request every 2 s
        clock.advance(2)
        stats.arrived()
    quiet = stats.snapshot()
    # Both spans take their ends: 30 arrivals in the minute, 6 in the last 10 s.
    assert quiet.arrival_rate == pytest.approx(0.5) and quiet.recent_arrival_rate == pytest.approx(0.6)
    for _ in range(50):  # then 10 requests/s for 5 s
        clock.advance(0.1)
        stats.arrived()
    burst = stats.snapshot()
    assert burst.recent_arrival_rate == pytest.approx((50 + 3) / 10)  # the last 10 s: the burst and 3 before it
    assert burst.arrival_rate < 1.5  # the minute's rate barely moved


def test_arrival_rate_span_is_at_least_a_second(clock):
    stats = make_stats(clock)
    clock.advance(0.001)
    stats.arrived()
    assert stats.snapshot().arrival_rate == pytest.approx(1.0)


def test_events_leave_the_window(clock):
    stats = make_stats(clock, window_s=10.0)
    stats.arrived()
    stats.finished(ttft_s=2.0, tpot_s=0.2)  # misses both SLOs
    stats.shed()
    stats.failed()
    clock.advance(5)
    stats.arrived()
    stats.finished(ttft_s=0.1, tpot_s=0.01)
    snap = stats.snapshot()
    assert snap.finished_requests == 2 and snap.shed_requests == 1 and snap.failed_requests == 1
    assert snap.slo_attainment == 0.5

    clock.advance(5)  # the first events are exactly window_s old: still in
    assert stats.snapshot().finished_requests == 2
    clock.advance(0.5)  # now they are out
    snap = stats.snapshot()
    assert snap.finished_requests == 1 and snap.shed_requests == 0 and snap.failed_requests == 0
    assert snap.slo_attainment == 1.0
    assert snap.ttft_p50_ms == pytest.approx(100) and snap.tpot_p99_ms == pytest.approx(10)
    assert snap.arrival_rate == pytest.approx(1 / 10)

    clock.advance(10)
    snap = stats.snapshot()
    assert snap.finished_requests == 0 and snap.arrival_rate == 0 and snap.slo_attainment == 1.0


def test_percentiles_of_a_hundred_requests(clock):
    stats = make_stats(clock)
    for ms in range(1, 101):  # TTFT 1..100 ms, TPOT 0.1..10 ms
        stats.finished(ttft_s=ms / 1000, tpot_s=ms / 10_000)
    snap = stats.snapshot()
    assert snap.ttft_p50_ms == pytest.approx(50)
    assert snap.ttft_p99_ms == pytest.approx(99)
    assert snap.tpot_p50_ms == pytest.approx(5)
    assert snap.tpot_p99_ms == pytest.approx(9.9)


def test_p99_of_few_requests_is_the_slowest(clock):
    stats = make_stats(clock)
    for ttft in (0.3, 0.1, 0.2):
        stats.finished(ttft_s=ttft, tpot_s=None)
    snap = stats.snapshot()
    assert snap.ttft_p99_ms == pytest.approx(300) and snap.ttft_p50_ms == pytest.approx(200)


def test_single_token_requests_have_no_tpot(clock):
    stats = make_stats(clock)
    stats.finished(ttft_s=0.1, tpot_s=None)
    stats.finished(ttft_s=0.1, tpot_s=0.02)
    snap = stats.snapshot()
    assert snap.tpot_p50_ms == pytest.approx(20) and snap.tpot_p99_ms == pytest.approx(20)
    assert snap.slo_attainment == 1.0  # None TPOT meets the TPOT target


@pytest.mark.parametrize(
    ("ttft_s", "tpot_s", "met"),
    [
        (0.5, 0.05, True),  # exactly at both targets
        (0.51, 0.01, False),  # TTFT late
        (0.1, 0.051, False),  # TPOT slow
        (0.6, None, False),  # one token, late
    ],
)
def test_attainment_follows_the_models_slo(clock, ttft_s, tpot_s, met):
    stats = make_stats(clock)
    stats.finished(ttft_s=0.1, tpot_s=0.01)  # one that meets both
    stats.finished(ttft_s=ttft_s, tpot_s=tpot_s)
    assert stats.snapshot().slo_attainment == (1.0 if met else 0.5)


def test_shed_and_failed_are_not_finished(clock):
    stats = make_stats(clock)
    stats.shed()
    stats.shed()
    stats.failed()
    snap = stats.snapshot()
    assert (snap.shed_requests, snap.failed_requests, snap.finished_requests) == (2, 1, 0)
    assert snap.slo_attainment == 1.0


def test_memory_is_bounded_under_a_flood(clock):
    stats = make_stats(clock, window_s=10.0, max_events=100)
    clock.advance(20)
    for _ in range(1000):  # 1000 arrivals over 1 s, ten times the cap
        stats.arrived()
        stats.finished(ttft_s=0.1, tpot_s=0.01)
        clock.advance(0.001)
    snap = stats.snapshot()
    assert snap.finished_requests == 100
    # The rate comes from the span the retained events cover (0.1 s), not from 100 over the 10 s window.
    assert snap.arrival_rate == pytest.approx(1000.0)
    assert len(stats._arrivals) == 100 and len(stats._finished) == 100


def test_percentile_helper():
    assert percentile([], 0.5) == 0.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([1.0, 2.0], 0.5) == 1.0
    assert percentile([1.0, 2.0], 0.51) == 2.0


def test_window_must_be_positive():
    with pytest.raises(ValueError):
        ModelRequestStats(ModelSlo(), window_s=0)


def test_busy_fraction_is_the_part_of_the_window_with_a_request_in_flight(clock):
    stats = make_stats(clock, window_s=10.0)
    clock.advance(20)  # the window is full
    stats.arrived()
    clock.advance(2)
    stats.arrived()  # overlapping: still one busy interval
    clock.advance(1)
    stats.ended()
    clock.advance(1)
    stats.ended()  # busy from t-4 to now
    clock.advance(3)
    stats.arrived()
    clock.advance(1)  # in flight now: 1 s of an open interval
    snap = stats.snapshot()
    assert snap.busy_fraction == pytest.approx(5 / 10)
    assert stats.in_flight == 1
    clock.advance(9)  # the first interval slides out of the window; the open one covers it all
    assert stats.snapshot().busy_fraction == pytest.approx(1.0)
    stats.ended()
    clock.advance(10)
    assert stats.snapshot().busy_fraction == pytest.approx(0.0)


def test_busy_fraction_just_after_start_and_an_end_without_an_arrival(clock):
    stats = make_stats(clock, window_s=60.0)
    stats.ended()  # ignored: nothing was in flight
    clock.advance(2)
    stats.arrived()
    clock.advance(2)
    stats.ended()
    assert stats.snapshot().busy_fraction == pytest.approx(0.5)  # 2 s busy of the 4 s seen


def test_mean_tokens_of_the_finished_requests_in_the_window(clock):
    stats = make_stats(clock, window_s=10.0)
    stats.finished(0.1, 0.01, prompt_tokens=100, output_tokens=10)
    clock.advance(6)
    stats.finished(0.1, 0.01, prompt_tokens=300, output_tokens=30)
    stats.finished(0.1, None)  # no token counts: not in the means
    snap = stats.snapshot()
    assert (snap.mean_prompt_tokens, snap.mean_output_tokens) == (200, 20)
    clock.advance(5)  # the first one leaves the window
    snap = stats.snapshot()
    assert (snap.mean_prompt_tokens, snap.mean_output_tokens) == (300, 30)
