"""The KV slots of the decoding sequences, kept on the device between steps.

The Triton decode kernel reads each sequence's keys and values through a row
of slots ([batch, width] int32). Rebuilt from Python lists every step, that
table costs O(batch x context) host work and a large copy per step; here
every sequence owns a row of one persistent device table instead, and a step
writes only the slots that are new since the last one (one per decoding
sequence): one small host-to-device copy and one scatter, or nothing at all
where a CUDA graph step writes those slots itself (cuda_graphs.py; a pinned
copy and two eager kernels each step cost about 0.3 ms of host time).

Row 0 is the padding row, for the padded rows of a CUDA graph: they read it
(what they read is thrown away) and write its first entry with the pool's
padding slot (KVPool.padding_slot).

The table grows (rows and width, doubling) when it must; each growth bumps
`version`, since a captured CUDA graph holds the old tensor's address."""

from __future__ import annotations

import numpy as np
import torch

from services.gpu_agent.engine.sequence import Sequence

PADDING_ROW = 0
_MIN_WIDTH = 256


class DeviceSlotTable:
    # Sized so that growing (which makes CUDA graphs be captured again) is rare:
    # rows for the largest graph batch and the padding row; 4 MiB in all.
    def __init__(self, device: torch.device, max_width: int, rows: int = 257, width: int = 4096):
        self.device = device
        self.max_width = max(max_width, 1)
        self.version = 0
        self.tensor = torch.zeros((rows, min(max(width, _MIN_WIDTH), self.max_width)), dtype=torch.int32, device=device)
        self._free_rows = list(range(rows - 1, PADDING_ROW, -1))  # pop() takes the lowest first
        # seq -> (row, the slot list that was copied, how many of its slots are on the device)
        self._rows: dict[Sequence, tuple[int, list[int], int]] = {}

    @property
    def width(self) -> int:
        return self.tensor.shape[1]

    def rows_for(self, seqs: list[Sequence], last_by_step: bool = False) -> list[int]:
        """The rows of `seqs`, with every slot they hold written to the device
        (in one copy): call once per step, before the step's kernels run.
        last_by_step: the step itself writes each sequence's last slot into its
        row (a CUDA graph decode step does, at position len(slots) - 1), so it is
        not copied here: a steady decode step then copies nothing. Should the
        step not run, unsync_last() and a second call write those slots too."""
        if self._rows and any(s.finished for s in self._rows):
            for seq in [s for s in self._rows if s.finished]:
                self.release(seq)
        longest = max((len(seq.slots) for seq in seqs), default=0)
        if longest > self.width:
            self._grow(rows=self.tensor.shape[0], width=longest)
        rows, cols, values = [], [], []
        result = []
        for seq in seqs:
            entry = self._rows.get(seq)
            if entry is None or entry[1] is not seq.slots or entry[2] > len(seq.slots):
                # New, or its slots were freed and allocated anew (preemption): copy them all.
                row = entry[0] if entry is not None else self._take_row()
                synced = 0
            else:
                row, _, synced = entry
            end = len(seq.slots) - 1 if last_by_step else len(seq.slots)
            if end > synced:
                rows.append(np.full(end - synced, row, dtype=np.int64))
                cols.append(np.arange(synced, end, dtype=np.int64))
                values.append(np.asarray(seq.slots[synced:end], dtype=np.int64))
            self._rows[seq] = (row, seq.slots, len(seq.slots))
            result.append(row)
        if rows:
            self._scatter(np.concatenate(rows), np.concatenate(cols), np.concatenate(values))
        return result

    def unsync_last(self, seqs: list[Sequence]) -> None:
        """Undoes last_by_step for a step that did not run: the next rows_for
        copies these sequences' last slots too."""
        for seq in seqs:
            entry = self._rows.get(seq)
            if entry is not None and entry[1] is seq.slots and entry[2] == len(seq.slots) and entry[2] > 0:
                self._rows[seq] = (entry[0], entry[1], entry[2] - 1)

    def release(self, seq: Sequence) -> None:
        """Only from the thread that calls rows_for (the engine's step thread)."""
        entry = self._rows.pop(seq, None)
        if entry is not None:
            self._free_rows.append(entry[0])

    def _take_row(self) -> int:
        if not self._free_rows:
            self._grow(rows=2 * self.tensor.shape[0], width=self.width)
        return self._free_rows.pop()

    def _grow(self, rows: int, width: int) -> None:
        old_rows = self.tensor.shape[0]
        new_width = self.width
        while new_width < width:
            new_width *= 2
        new_width = min(new_width, max(self.max_width, width))
        grown = torch.zeros((rows, new_width), dtype=torch.int32, device=self.device)
        grown[:old_rows, : self.width] = self.tensor
        self.tensor = grown
        self._free_rows = list(range(rows - 1, old_rows - 1, -1)) + self._free_rows
        self.version += 1

    def _scatter(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        packed = torch.from_numpy(np.stack([rows, cols, values]))
        if self.device.type == "cuda":
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        else:
            packed = packed.to(self.device)
        self.tensor[packed[0], packed[1]] = packed[2].to(torch.int32)
