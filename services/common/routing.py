"""Which replica a request goes to: the gateway's rule, shared with the
simulator's gateway (prism/simulator/cluster.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

R = TypeVar("R")


def least_busy_first(replicas: list[R], in_flight: Callable[[R], int], turn: int) -> list[R]:
    """The replicas in the order a request tries them: the fewest requests in
    flight first (join the shortest queue: when a burst gets a new replica,
    the new requests go to it instead of queueing behind the backlog of the
    first), round robin from `turn` among equals. The gateway's router and
    the simulator's gateway route by it."""
    turn %= len(replicas)
    return sorted(replicas[turn:] + replicas[:turn], key=in_flight)  # stable: the rotation breaks ties
