"""A split model's step messages carry each sequence's slots a step at a time
(services/gpu_agent/engine/slot_mirror.py): the followers' spans are always
rank 0's, through growth, a rebuilt list (preemption, a prefix-cache match)
and the end of a sequence, and a decoding step's message does not grow with
the context."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

from services.gpu_agent.engine.slot_mirror import SlotsKnown, SlotsSent


@dataclass(eq=False)
class Seq:
    slots: list[int] = field(default_factory=list)
    finished: bool = False


def step(sent: SlotsSent, known: SlotsKnown, plan: list[tuple[Seq, int, int]]):
    """One step over the wire (pickled, as the step channel sends it): the followers' spans."""
    updates, finished = sent.updates((seq, start, count, seq.slots) for seq, start, count in plan)
    wire = pickle.dumps((updates, finished))
    return known.spans(*pickle.loads(wire)), len(wire)


def test_the_followers_spans_are_rank_0s_through_growth_rebuilds_and_ends():
    sent, known = SlotsSent(), SlotsKnown()
    a, b = Seq(list(range(0, 8))), Seq(list(range(100, 104)))
    spans, _ = step(sent, known, [(a, 0, 8), (b, 0, 4)])  # two prefills
    assert spans == [(0, 8, a.slots), (0, 4, b.slots)]
    for n in range(3):  # decoding: one more slot each, in place
        a.slots.append(50 + n)
        b.slots.append(150 + n)
        spans, _ = step(sent, known, [(a, 8 + n, 1), (b, 4 + n, 1)])
        assert spans == [(8 + n, 1, a.slots), (4 + n, 1, b.slots)]
    b.slots = [7, 8, 9]  # rebuilt: preempted and admitted again, or matched in the prefix cache
    spans, _ = step(sent, known, [(b, 2, 1)])  # a skips this step: the followers keep its slots
    assert spans == [(2, 1, [7, 8, 9])]
    a.slots.append(60)
    spans, _ = step(sent, known, [(a, 11, 1)])
    assert spans == [(11, 1, a.slots)]
    b.finished = True
    step(sent, known, [(a, 11, 1)])
    assert len(sent) == len(known) == 1  # b forgotten on both sides
    a.finished = True
    step(sent, known, [])
    assert len(sent) == len(known) == 0


def test_a_decoding_steps_message_does_not_grow_with_the_context():
    sent, known = SlotsSent(), SlotsKnown()
    seqs = [Seq(list(range(i * 4096, i * 4096 + 2048))) for i in range(64)]
    _, first = step(sent, known, [(s, 0, 2048) for s in seqs])
    for s in seqs:
        s.slots.append(s.slots[-1] + 1)
    spans, decode = step(sent, known, [(s, 2048, 1) for s in seqs])
    assert spans == [(2048, 1, s.slots) for s in seqs]
    assert decode * 50 < first  # 64 sequences of 2k tokens: a few bytes each, not their 2k slots


def test_switching_off_forgets_everything_on_both_sides():
    sent, known = SlotsSent(), SlotsKnown()
    a = Seq([1, 2, 3])
    step(sent, known, [(a, 0, 3)])
    sent.clear()
    known.clear()
    a.slots.append(4)  # were it still running, it would go whole again
    spans, _ = step(sent, known, [(a, 3, 1)])
    assert spans == [(3, 1, [1, 2, 3, 4])]
