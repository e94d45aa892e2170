"""When `prism up` restarts a process of its cluster that died, and when it gives up on one.

A pure policy over each child's history (no processes here: prism/cli.py's `up` loop asks it and
acts), so it is tested on its own. A child that dies is restarted after a backoff that doubles with
each death that came soon after its start (base_s, 2 base_s, ... up to max_s); one that ran at least
healthy_s before dying counts as healthy again and is restarted after base_s. A child is restarted
at most give_up_after times in a row for deaths soon after its start; the next such death gives it
up: the rest keep serving what they can, and the console says so with the child's log."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    base_s: float = 1.0
    max_s: float = 30.0
    healthy_s: float = 30.0
    give_up_after: int = 5


@dataclass
class ChildHistory:
    started_at: float
    quick_deaths: int = 0  # deaths in a row, each within healthy_s of its start
    restarts: int = 0
    died_at: float | None = None
    given_up: bool = False


@dataclass
class Supervisor:
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    children: dict[str, ChildHistory] = field(default_factory=dict)

    def started(self, name: str, now: float) -> None:
        child = self.children.setdefault(name, ChildHistory(started_at=now))
        child.started_at, child.died_at = now, None

    def died(self, name: str, now: float) -> bool:
        """`name` was found dead at `now`; True when that is a new death (not one already counted and
        waiting for its restart, nor a child given up)."""
        child = self.children.setdefault(name, ChildHistory(started_at=now))
        if child.died_at is not None or child.given_up:
            return False
        child.died_at = now
        child.quick_deaths = child.quick_deaths + 1 if now - child.started_at < self.policy.healthy_s else 1
        child.given_up = child.quick_deaths > self.policy.give_up_after
        return True

    def restart_at(self, name: str) -> float | None:
        """When a dead child is to be started again; None while it runs, or once given up."""
        child = self.children.get(name)
        if child is None or child.died_at is None or child.given_up:
            return None
        return child.died_at + min(self.policy.max_s, self.policy.base_s * 2 ** (child.quick_deaths - 1))

    def restarted(self, name: str, now: float) -> None:
        self.children[name].restarts += 1
        self.started(name, now)
