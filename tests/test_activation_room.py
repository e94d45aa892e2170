"""An activation never takes the KV that the engines staying on hold for their running requests, or that
their next second of arrivals will need: the room it needs is counted beside that KV
(make_room.kv_kept_bytes), not beside a page bundle each.

The engines are the stand-ins of test_memory_overhead.py (CudaReadingEngineFake: a GPU is not here),
whose stats report the KV their requests hold; the coordinator's room check over them is the real one."""

from __future__ import annotations

from test_memory_overhead import GIB, Clock, CudaReadingEngineFake, coordinator_with

from services.gpu_agent.make_room import ARRIVALS_KEPT_S, DEFAULT_REQUEST_TOKENS, arriving_tokens, kv_kept_bytes


def test_an_engine_keeps_the_kv_its_requests_hold_and_at_least_its_floor():
    assert kv_kept_bytes(floor_bytes=2 << 20, used_bytes=0) == 2 << 20
    assert kv_kept_bytes(floor_bytes=2 << 20, used_bytes=5 * GIB) == 5 * GIB
    assert kv_kept_bytes(floor_bytes=2 << 20, used_bytes=5 * GIB, demand_bytes=7 * GIB) == 7 * GIB
    # ... and beyond what its requests hold or need, what its next arrivals will.
    assert kv_kept_bytes(floor_bytes=2 << 20, used_bytes=5 * GIB, demand_bytes=7 * GIB, arriving_bytes=GIB) == 8 * GIB
    assert kv_kept_bytes(floor_bytes=2 << 20, used_bytes=9 * GIB, demand_bytes=7 * GIB, arriving_bytes=GIB) == 10 * GIB


def test_the_arrivals_kept_for_are_a_second_of_the_recent_rate_at_the_mean_request():
    assert ARRIVALS_KEPT_S == 1.0
    assert arriving_tokens(10.0, 500.0, 140.0) == 6400  # 10 req/s x 1 s x 640 tokens
    assert arriving_tokens(2.0, 0.0, 0.0) == 2 * DEFAULT_REQUEST_TOKENS  # none finished yet
    assert arriving_tokens(0.0, 500.0, 140.0) == 0 and arriving_tokens(4.0, 500.0, 140.0, horizon_s=0.5) == 1280


async def test_an_activation_that_would_take_kv_in_use_is_refused_and_fits_once_it_is_given_back():
    # 80 GiB, 4 in reserve: "busy" (40 GiB of weights) serves requests holding 20 GiB of KV; the
    # switched-off "trickle" has 24 GiB of weights. Beside a page bundle it would fit (36 GiB free);
    # beside the KV in use (16 GiB free) it does not, and the busy engine cannot step aside.
    busy, trickle = CudaReadingEngineFake(40 * GIB, mapped_bytes=20 * GIB), CudaReadingEngineFake(24 * GIB)
    coordinator = coordinator_with({"busy": (busy, "active"), "trickle": (trickle, "inactive")}, Clock())
    engines = coordinator.manager.engines
    engines["busy"].request_stats.arrived()
    assert coordinator.room_to_activate(engines["trickle"]) is None
    error = str(coordinator.no_room_error(engines["trickle"]))
    assert "'trickle' cannot be switched on now" in error and "KV the active engines' requests hold" in error
    assert "20558 MiB" in error, error  # 20 GiB held beyond busy's page bundle, and 80 MiB for its arrivals
    # Its requests done (the KV given back, the engine idle long enough to step aside or not needed to):
    busy.mapped_bytes = 0
    assert coordinator.room_to_activate(engines["trickle"]) == []


async def test_an_activation_under_way_keeps_the_room_it_took():
    # 80 GiB, 4 in reserve: "serving" (30 GiB) is on; "first" and "second" (24 GiB each) are switched on at
    # once. Either fits beside "serving" alone (46 GiB free); both do not (22 GiB after the first).
    serving = CudaReadingEngineFake(30 * GIB)
    first, second = CudaReadingEngineFake(24 * GIB), CudaReadingEngineFake(24 * GIB)
    coordinator = coordinator_with(
        {"serving": (serving, "active"), "first": (first, "inactive"), "second": (second, "inactive")}, Clock()
    )
    engines = coordinator.manager.engines
    engines["serving"].request_stats.arrived()  # serving: it cannot step aside
    assert coordinator.room_to_activate(engines["second"]) == []
    async with engines["first"].activation_lock:  # the first's weights are on their way
        assert coordinator.room_to_activate(engines["second"]) is None
    assert coordinator.room_to_activate(engines["second"]) == []


async def test_kv_spread_over_pages_counts_as_the_pages_it_holds():
    # An engine's requests use 2 GiB of slots spread over 6 GiB of pages: what it keeps through an
    # activation and what its memory policy sees it use are the 6 (a limit below them preempts).
    busy, other = CudaReadingEngineFake(30 * GIB, mapped_bytes=2 * GIB), CudaReadingEngineFake(30 * GIB)
    busy.held_bytes = 6 * GIB
    coordinator = coordinator_with({"busy": (busy, "active"), "other": (other, "inactive")}, Clock())
    engines = coordinator.manager.engines
    engines["busy"].request_stats.arrived()
    arrivals = arriving_tokens(1.0, 0.0, 0.0) * busy.kv_bytes_per_token  # its one arrival: a second's worth
    assert coordinator._kv_kept_bytes(engines["busy"]) == 6 * GIB + arrivals
    assert [e.used_bytes for e in coordinator.snapshot().engines] == [6 * GIB]
    # 80 - 4 reserve - 30 busy - 6 held: 40 GiB left; other's 30 fit beside the 6, not beside 20.
    assert coordinator.room_to_activate(engines["other"]) == []
    busy.held_bytes = 20 * GIB
    assert coordinator.room_to_activate(engines["other"]) is None


async def test_an_activation_leaves_the_kv_that_queued_requests_wait_for():
    # "busy" holds 2 GiB of KV and its running and queued requests need 14 soon (its demand): switching
    # on a 30 GiB model would leave it 10. 80 - 4 reserve - 30 busy = 46; 46 - 14 = 32 >= 30 fits, 46 - 20
    # does not. What its admission queue holds back does not count (a backlog would keep everyone off).
    busy, other = CudaReadingEngineFake(30 * GIB, mapped_bytes=2 * GIB), CudaReadingEngineFake(30 * GIB)
    coordinator = coordinator_with({"busy": (busy, "active"), "other": (other, "inactive")}, Clock())
    engines = coordinator.manager.engines
    engines["busy"].request_stats.arrived()
    busy.demand_tokens = 14 * GIB // busy.kv_bytes_per_token
    coordinator.pending_demand_bytes = lambda model: 40 * GIB  # the agent's queue: not counted here
    # Its one arrival over the last second counts as a second of arrivals to come (arriving_tokens).
    arrivals = arriving_tokens(1.0, 0.0, 0.0) * busy.kv_bytes_per_token
    assert coordinator._kv_kept_bytes(engines["busy"]) == 14 * GIB + arrivals
    assert coordinator.room_to_activate(engines["other"]) == []
    busy.demand_tokens = 20 * GIB // busy.kv_bytes_per_token
    assert coordinator.room_to_activate(engines["other"]) is None
    assert "hold or need soon" in str(coordinator.no_room_error(engines["other"]))


async def test_an_activation_leaves_room_for_a_busy_engines_next_second_of_arrivals():
    # "busy" (30 GiB) holds 14 GiB for its requests; a 31.5 GiB model fits beside them (80 - 4 reserve - 30
    # - 14 = 32 GiB free) while busy takes a request a second (640 tokens of 128 KiB: 80 MiB kept for them),
    # not while it takes 20 (1.6 GiB). (The request stats run on real time: the arrivals are all "now", a
    # second's span.)
    def busy_with(arrivals: int):
        busy, other = CudaReadingEngineFake(30 * GIB, mapped_bytes=14 * GIB), CudaReadingEngineFake(63 * GIB // 2)
        coordinator = coordinator_with({"busy": (busy, "active"), "other": (other, "inactive")}, Clock())
        engines = coordinator.manager.engines
        for _ in range(arrivals):
            engines["busy"].request_stats.arrived()
        return coordinator, engines

    coordinator, engines = busy_with(1)
    assert coordinator._kv_kept_bytes(engines["busy"]) == 14 * GIB + DEFAULT_REQUEST_TOKENS * (128 << 10)
    assert coordinator.room_to_activate(engines["other"]) == []
    coordinator, engines = busy_with(20)
    assert coordinator._kv_kept_bytes(engines["busy"]) == 14 * GIB + 20 * DEFAULT_REQUEST_TOKENS * (128 << 10)
    assert coordinator.room_to_activate(engines["other"]) is None
