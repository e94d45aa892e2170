"""Which replica a request goes to: the gateway's rule (route_order), shared
with the simulator's gateway (prism/simulator/cluster.py).

Requests that begin alike go to the same replica while it is not loaded much
past the others (prefix affinity), so that its prefix cache holds their
shared beginning: each key has a home among the active replicas by
rendezvous hashing (a replica coming or going moves only the keys it is or
becomes home of), and the home goes first while its requests in flight are
within AFFINITY_LOAD_BOUND of the mean (consistent hashing with bounded
loads); otherwise the least busy does."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import TypeVar

R = TypeVar("R")

# The home replica of a prefix takes its requests while it has at most this many times the mean number
# in flight (plus one): bounded loads, so one hot prefix cannot pile onto one replica.
AFFINITY_LOAD_BOUND = 1.25


def least_busy_first(replicas: list[R], in_flight: Callable[[R], int], turn: int) -> list[R]:
    """The replicas in the order a request tries them: the fewest requests in
    flight first (join the shortest queue: when a burst gets a new replica,
    the new requests go to it instead of queueing behind the backlog of the
    first), round robin from `turn` among equals."""
    if not replicas:
        return []
    turn %= len(replicas)
    return sorted(replicas[turn:] + replicas[:turn], key=in_flight)  # stable: the rotation breaks ties


def prefix_home(replicas: list[R], key: str) -> R:
    """The replica a prefix key belongs to (rendezvous hashing over the replicas' names)."""

    def weight(replica: R) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()

    return max(replicas, key=weight)


def affinity_first(ordered: list[R], in_flight: Callable[[R], int], key: str | None) -> list[R]:
    """`ordered` with the key's home first where its load is within the bound; as it was otherwise."""
    if key is None or len(ordered) < 2:
        return ordered
    home = prefix_home(ordered, key)
    mean = sum(in_flight(r) for r in ordered) / len(ordered)
    if in_flight(home) > math.floor(AFFINITY_LOAD_BOUND * mean) + 1:
        return ordered
    return [home] + [r for r in ordered if r != home]


def route_order(
    replicas: list[R],
    active: Callable[[R], bool],
    in_flight: Callable[[R], int],
    turn: int,
    prefix_key: str | None = None,
) -> list[R]:
    """The active replicas by least_busy_first (the prefix key's home first, within its load bound),
    then the switched-off ones the same way: a request goes to a switched-off replica (its agent
    switches it on) only when none is active, since the scheduler switches replicas on and off, and a
    request that switched one on beside an active one would undo that; they stay fallbacks."""
    on = [r for r in replicas if active(r)]
    off = [r for r in replicas if not active(r)]
    return affinity_first(least_busy_first(on, in_flight, turn), in_flight, prefix_key) + least_busy_first(
        off, in_flight, turn
    )
