"""The difference between the target placement and what agents run, as the
ordered commands that close it. Pure: the loop in server.py executes them."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.records import EngineRecord
from services.scheduler.policies import Placement, ReplicaTarget


@dataclass(frozen=True)
class Action:
    kind: str  # "load" | "unload" | "activate" | "deactivate"
    agent_id: str
    model: str
    gpu_ids: tuple[int, ...] = ()
    activate: bool = True
    memory_limit_bytes: int = 0
    drain: bool = False  # unload: let the engine finish its requests first (the model stays placed elsewhere)
    # deactivate: the engine goes once no request ran or waited in it for this long, in place of the
    # agent's busy window (0: the agent's; see plan_actions)
    busy_window_s: float = 0.0


def current_placement(engines: dict[tuple[str, str], EngineRecord]) -> Placement:
    """What the agents run: their engines that are loaded or loading (a loading one counts as inactive); a
    draining one is on its way out and does not count."""
    out: Placement = {}
    for (agent_id, model), rec in sorted(engines.items()):
        if rec.state in ("active", "inactive", "loading"):
            out.setdefault(model, []).append(ReplicaTarget(agent_id, tuple(rec.gpu_ids), rec.state == "active"))
    return out


# How recent a request keeps an engine the target switches off on: enough to cover the lag of the
# scheduler's view of demand (load reports every 0.5 s), so a model whose first request just ended is not
# switched off on a report that does not show it yet.
DEACTIVATE_BUSY_WINDOW_S = 2.0


# An engine the scheduler switched on less than this long ago and finds off again was switched off by its
# agent (its KV pressure relief, or room for another activation): the scheduler leaves it off that long.
# Switching it straight back on fought the agent: on an H100 (kvpr, 14 req/s) one model went on and off
# every 0.12 s for 1.3 s, and two such activations at once ran the GPU out of memory.
REACTIVATE_HOLD_S = 5.0


def still_held_off(activated_at: dict[tuple[str, str], float], now: float) -> dict[tuple[str, str], float]:
    """Of (agent_id, model) -> when the scheduler switched it on, those switched on within
    REACTIVATE_HOLD_S of `now`: plan_actions' held_off."""
    return {key: t for key, t in activated_at.items() if now - t < REACTIVATE_HOLD_S}


def plan_actions(
    target: Placement,
    engines: dict[tuple[str, str], EngineRecord],
    live_agents: set[str],
    manage_activity: bool = False,
    deactivate_busy_window_s: float = DEACTIVATE_BUSY_WINDOW_S,
    held_off: frozenset[tuple[str, str]] = frozenset(),
) -> list[Action]:
    """engines: (agent_id, model) -> what that agent reports in etcd.

    Unloads come first so their memory is free before loads need it, then
    deactivations (they free GPU memory too), then loads and activations. A
    failed engine is loaded again (the agent replaces it); a loading one is
    left alone. Removing a replica of a model the target still places
    elsewhere (a move, fewer replicas) drains it: the agent finishes its
    requests first. A model the target places nowhere (its policy sheds or
    drops it) is unloaded at once: draining would keep the load its policy
    means to take off the GPU. An engine already draining is not unloaded
    again, and one the target wants back is loaded, which cancels its drain. manage_activity: switch
    engines on and off to match the target (policies that time-share); otherwise a replica's `active` only
    applies when it is loaded, and agents switch engines on by demand.
    deactivate_busy_window_s: deactivations hold an engine on only this long after its last request, in
    place of the agent's busy window (0: the agent's, 10 s). The policies' own hysteresis decides when a
    model is idle; the agent's window on top kept every engine a request had touched on for 10 s more,
    and on one GPU of more models than fit, those engines' weights left their neighbours no KV
    (simulated, bench/one_gpu.py's 12 models on an H100 at 12 req/s: time-share 78.5% of requests
    within SLO with it, 90.2% without).
    held_off: (agent_id, model) the scheduler does not switch on now (REACTIVATE_HOLD_S); their
    requests still switch them on at the agent.
    """
    wanted: dict[tuple[str, str], Action] = {}
    for model, replicas in target.items():
        for r in replicas:
            wanted[(r.agent_id, model)] = Action("load", r.agent_id, model, r.gpu_ids, r.active, r.memory_limit_bytes)
    unloads = [
        Action("unload", agent_id, model, drain=bool(target.get(model)))
        for (agent_id, model), record in sorted(engines.items())
        if (agent_id, model) not in wanted and agent_id in live_agents and record.state != "draining"
    ]
    loads, activations, deactivations = [], [], []
    for key, action in sorted(wanted.items()):
        record = engines.get(key)
        if action.agent_id not in live_agents:
            continue
        if record is None or record.state in ("failed", "draining"):
            loads.append(action)
        elif manage_activity and record.state == "inactive" and action.activate and key not in held_off:
            activations.append(Action("activate", action.agent_id, action.model, action.gpu_ids))
        elif manage_activity and record.state == "active" and not action.activate:
            deactivations.append(
                Action(
                    "deactivate",
                    action.agent_id,
                    action.model,
                    action.gpu_ids,
                    False,
                    busy_window_s=deactivate_busy_window_s,
                )
            )
    return unloads + deactivations + loads + activations
