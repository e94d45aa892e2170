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
import os
import struct
import tempfile
from pathlib import Path

SLOTS = 64  # engines on one device at most that the board tells apart (more: their steps count as not alone)
_SLOT = struct.Struct("<QQ")  # steps begun, steps ended
# Every slot's counters in one read: a step reads the board twice, and slot by slot that took 25 us a step.
_BOARD = struct.Struct(f"<{2 * SLOTS}Q")
SIZE = _BOARD.size


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

    def _others(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The other slots' counters: (steps begun, steps ended), slot by slot."""
        counters = _BOARD.unpack_from(self._map)
        own = 2 * self.slot
        others = counters[:own] + counters[own + 2 :]
        return others[0::2], others[1::2]

    def begin(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A step begins: marks it, and returns what the others' counters were (for `end`)."""
        self._begun += 1
        self._write()
        return self._others()

    def end(self, at_begin: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
        """The step ended: marks it, and says whether no other engine was in a step meanwhile (none was
        mid-step when it began, and none began or ended one since)."""
        self._ended = self._begun
        self._write()
        begun, ended = at_begin
        return begun == ended and self._others() == at_begin

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
