"""The device slot table (slot_table.py) on the CPU: rows hold exactly each
sequence's slots, follow preemption, grow, and keep the padding row at slot 0."""

from __future__ import annotations

import torch

from services.gpu_agent.engine.sampling import SamplingParams
from services.gpu_agent.engine.sequence import Sequence
from services.gpu_agent.engine.slot_table import PADDING_ROW, DeviceSlotTable


def make_seq(slots: list[int]) -> Sequence:
    seq = Sequence("r", [1, 2], 8, SamplingParams(temperature=0.0), [], True, None, None, lambda _: True)
    seq.slots = list(slots)
    return seq


def row_slots(table: DeviceSlotTable, row: int, n: int) -> list[int]:
    return table.tensor[row, :n].tolist()


def test_rows_hold_each_sequence_slots_and_only_new_ones_are_written():
    table = DeviceSlotTable(torch.device("cpu"), max_width=4096, rows=4, width=256)
    a, b = make_seq([5, 9, 7]), make_seq([11])
    ra, rb = table.rows_for([a, b])
    assert PADDING_ROW not in (ra, rb) and ra != rb
    a.slots.append(40)
    b.slots.append(41)
    assert table.rows_for([a, b]) == [ra, rb]  # rows are stable while a sequence lives
    assert row_slots(table, ra, 4) == [5, 9, 7, 40] and row_slots(table, rb, 2) == [11, 41]
    assert table.tensor[PADDING_ROW].eq(0).all()


def test_preempted_sequence_is_rewritten_from_its_new_slots():
    table = DeviceSlotTable(torch.device("cpu"), max_width=4096, rows=4, width=256)
    seq = make_seq([3, 4, 5])
    (row,) = table.rows_for([seq])
    seq.slots = [20, 21]  # freed and allocated anew: a new list, shorter
    seq.slots.append(22)
    assert table.rows_for([seq]) == [row]
    assert row_slots(table, row, 3) == [20, 21, 22]


def test_growth_keeps_rows_and_bumps_the_version():
    table = DeviceSlotTable(torch.device("cpu"), max_width=100_000, rows=2, width=256)
    first = make_seq(list(range(1, 300)))  # wider than the table
    (row,) = table.rows_for([first])
    assert table.version == 1 and table.width >= 299
    others = [make_seq([1000 + i]) for i in range(3)]  # more rows than the table has
    rows = table.rows_for([first, *others])
    assert table.version > 1 and len(set(rows)) == 4 and rows[0] == row
    assert row_slots(table, row, 299) == list(range(1, 300))
    assert [table.tensor[r, 0].item() for r in rows[1:]] == [1000, 1001, 1002]


def test_finished_sequences_give_their_rows_back():
    table = DeviceSlotTable(torch.device("cpu"), max_width=4096, rows=3, width=256)
    a, b = make_seq([1]), make_seq([2])
    rows = table.rows_for([a, b])
    a.finished = b.finished = True
    c, d = make_seq([3]), make_seq([4])
    assert sorted(table.rows_for([c, d])) == sorted(rows) and table.version == 0


def test_last_slots_left_to_the_step_and_written_after_unsync():
    table = DeviceSlotTable(torch.device("cpu"), max_width=4096, rows=4, width=256)
    seq = make_seq([5, 9, 7])
    table.tensor.fill_(-1)
    (row,) = table.rows_for([seq], last_by_step=True)
    assert row_slots(table, row, 3) == [5, 9, -1]  # the step writes the last one
    table.tensor[row, 2] = 7  # as a graph step does
    seq.slots.append(40)
    assert table.rows_for([seq], last_by_step=True) == [row]  # nothing new to copy
    assert row_slots(table, row, 4) == [5, 9, 7, -1]
    table.unsync_last([seq])  # that step did not run after all
    assert table.rows_for([seq]) == [row]
    assert row_slots(table, row, 4) == [5, 9, 7, 40]
