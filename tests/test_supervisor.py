"""prism up as it runs a cluster: its supervision policy (prism/supervisor.py: a dead child is
restarted after a backoff that doubles while it keeps dying soon after its start, resets once it ran
long enough, and is given up after a bound), and what it says while the cluster starts."""

from __future__ import annotations

from prism.supervisor import RestartPolicy, Supervisor


def test_a_child_dying_at_start_backs_off_doubling_then_is_given_up():
    s = Supervisor(RestartPolicy(base_s=1.0, max_s=5.0, healthy_s=30.0, give_up_after=3))
    s.started("gateway", 0.0)
    assert s.restart_at("gateway") is None  # running
    now, waits = 0.0, []
    for _ in range(3):
        now += 2.0
        assert s.died("gateway", now)
        assert not s.died("gateway", now + 0.5)  # found dead again before its restart: the same death
        waits.append(s.restart_at("gateway") - now)
        now = s.restart_at("gateway")
        s.restarted("gateway", now)
    assert waits == [1.0, 2.0, 4.0]
    assert s.died("gateway", now + 1.0)  # a fourth death soon after its start: given up
    assert s.children["gateway"].given_up and s.restart_at("gateway") is None
    assert not s.died("gateway", now + 2.0)  # given up: not counted, not said again
    assert s.children["gateway"].restarts == 3


def test_a_child_that_ran_long_enough_is_restarted_after_the_base_wait_again():
    s = Supervisor(RestartPolicy(base_s=1.0, max_s=30.0, healthy_s=30.0, give_up_after=5))
    s.started("agent", 0.0)
    s.died("agent", 1.0)
    s.restarted("agent", 2.0)
    s.died("agent", 3.0)  # soon after its restart: 2 s
    assert s.restart_at("agent") == 5.0
    s.restarted("agent", 5.0)
    s.died("agent", 100.0)  # ran 95 s: healthy, the count starts over
    assert s.restart_at("agent") == 101.0 and s.children["agent"].quick_deaths == 1


def test_a_starting_cluster_says_each_model_as_it_is_served_and_what_it_still_waits_for():
    """prism up's lines between "starting Prism" and "Prism is up" (prism/cluster.py ReadinessProgress)."""
    from prism.cluster import ReadinessProgress

    clock = iter([0.0, 2.0, 2.0, 13.0, 14.5, 15.0])
    said: list[str] = []
    progress = ReadinessProgress(["smollm2", "tiny"], said.append, every_s=10.0, clock=lambda: next(clock))  # at 0
    progress.update({"tiny"})  # 2 s
    progress.update({"tiny"})  # 2 s: nothing new
    progress.update({"tiny"})  # 13 s: 11 s since the last line
    progress.update({"tiny", "smollm2"})  # 14.5 s
    progress.update({"tiny", "smollm2"})  # 15 s: all served, nothing more to say
    assert said == ["  tiny served (2.0s)", "  waiting for smollm2 (13s)", "  smollm2 served (14.5s)"]


def test_readiness_progress_says_each_change_of_a_waiting_models_engine_state():
    from prism.cluster import ReadinessProgress

    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    said: list[str] = []
    progress = ReadinessProgress(["big", "bad", "tiny"], said.append, every_s=60.0, clock=lambda: next(clock))
    progress.update(set(), {"big": "loading", "tiny": "loading"})  # 1 s
    progress.update(set(), {"big": "loading", "tiny": "active"})  # 2 s: active is said as served, later
    progress.update({"tiny"}, {"big": "loading", "bad": "failed: no such file", "tiny": "active"})  # 3 s
    progress.update({"tiny"}, {"big": "switched off", "bad": "failed: no such file", "tiny": "active"})  # 4 s
    progress.update({"tiny"}, {})  # 5 s: an agent that did not answer changes nothing
    progress.update({"tiny", "big"}, {"big": "active", "tiny": "active"})  # 6 s
    assert said == [
        "  big loading (1.0s)",
        "  tiny loading (1.0s)",
        "  bad failed: no such file (3.0s)",
        "  tiny served (3.0s)",
        "  big switched off (4.0s)",
        "  big served (6.0s)",
    ]
