"""Which engines on one device are in the middle of a step: a 1 KiB shared
file per device (the agent makes it and gives each engine a slot), so an
engine can tell whether a step of its ran alone on the device.

Why: the scheduler prices compute from engines' step times
(services/common/step_costs.py) and adds the loads of the engines sharing a
GPU, as if their steps took turns. A step timed while a neighbour's step ran
beside it (under CUDA MPS, or on CPU threads) already holds the neighbour's
interference: on an H100 shared by six engines the 8B's decode steps took
14 ms against 7 ms alone. Fitting from those and then adding the loads up
would count the interference twice, so only steps that ran alone are fitted.

Each slot has two counters, steps begun and steps ended, each written by its
engine alone (so no locks): another engine was busy during a step if, at the
step's start, its counters differed (mid-step), or they moved by its end."""

from __future__ import annotations

import mmap
import tempfile
import os
import struct
from pathlib import Path

SLOTS = 64  # engines on one device at most that the board tells apart (more: their steps count as not alone)
_SLOT = struct.Struct("<QQ")  # steps begun, steps ended
SIZE = SLOTS * _SLOT.size


def create_board(path: Path) -> None:
    """A board of idle slots (the agent, once per device before it starts engines)."""
    path.write_bytes(bytes(SIZE))


class StepBoard:
    """One engine's view of its device's board: its own slot to write, the others to read."""

    def __init__(self, path: str | os.PathLike, slot: int):
        if not 0 <= slot < SLOTS:
            raise ValueError(f"a step board has slots 0-{SLOTS - 1}, got {slot}")
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), SIZE)
        self.slot = slot
        begun, ended = _SLOT.unpack_from(self._map, slot * _SLOT.size)
        # A slot taken over from an engine that died mid-step: idle from now on.
        self._begun = self._ended = max(begun, ended)
        self._write()

    def _write(self) -> None:
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, self._begun, self._ended)

    def _others(self) -> list[tuple[int, int]]:
        return [_SLOT.unpack_from(self._map, i * _SLOT.size) for i in range(SLOTS) if i != self.slot]

    def begin(self) -> list[tuple[int, int]]:
        """A step begins: marks it, and returns what the others' counters were (for `alone`)."""
        self._begun += 1
        self._write()
        return self._others()

    def end(self, at_begin: list[tuple[int, int]]) -> bool:
        """The step ended: marks it, and says whether no other engine was in a step meanwhile."""
        self._ended = self._begun
        self._write()
        now = self._others()
        return all(b == e for b, e in at_begin) and now == at_begin

    def close(self) -> None:
        self._ended = self._begun
        self._write()
        self._map.close()


class DeviceBoards:
    """The agent's boards, one per device, in a temporary folder (shared memory where there is some;
    removed when the agent exits), and which model holds which slot (until it is unloaded)."""

    def __init__(self, device_indexes: list[int]):
        shm = Path("/dev/shm")
        self._dir = tempfile.TemporaryDirectory(prefix="prism-step-boards-", dir=shm if shm.is_dir() else None)
        self._paths = {i: Path(self._dir.name) / f"device-{i}" for i in device_indexes}
        for path in self._paths.values():
            create_board(path)
        self._slots: dict[int, dict[str, int]] = {i: {} for i in device_indexes}

    def slot_for(self, device_index: int, model: str) -> tuple[str, int] | None:
        """(board path, slot) for a model's engine on a device; None when the board is full."""
        taken = self._slots[device_index]
        if model not in taken:
            free = next((s for s in range(SLOTS) if s not in taken.values()), None)
            if free is None:
                return None
            taken[model] = free
        return str(self._paths[device_index]), taken[model]

    def release(self, model: str) -> None:
        for taken in self._slots.values():
            taken.pop(model, None)

    def close(self) -> None:
        self._dir.cleanup()
