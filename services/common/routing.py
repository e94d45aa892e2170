"""Which replica a request goes to: the gateway's rule (route_order), shared
with the simulator's gateway (prism/simulator/cluster.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

R = TypeVar("R")


def least_busy_first(replicas: list[R], in_flight: Callable[[R], int], turn: int) -> list[R]:
    """The replicas in the order a request tries them: the fewest requests in
    flight first (join the shortest queue: when a burst gets a new replica,
    the new requests go to it instead of queueing behind the backlog of the
    first), round robin from `turn` among equals."""
    if not replicas:
        return []
    turn %= len(replicas)
    return sorted(replicas[turn:] + replicas[:turn], key=in_flight)  # stable: the rotation breaks ties


def route_order(replicas: list[R], active: Callable[[R], bool], in_flight: Callable[[R], int], turn: int) -> list[R]:
    """The active replicas by least_busy_first, then the switched-off ones the
    same way: a request goes to a switched-off replica (its agent switches it
    on) only when none is active, since the scheduler switches replicas on and
    off, and a request that switched one on beside an active one would undo
    that; they stay fallbacks."""
    on = [r for r in replicas if active(r)]
    off = [r for r in replicas if not active(r)]
    return least_busy_first(on, in_flight, turn) + least_busy_first(off, in_flight, turn)
