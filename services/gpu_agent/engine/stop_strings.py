"""Stop strings on streamed text: where the first one starts, and how much of
the text's end must be held back because it could still grow into one."""

from __future__ import annotations


def find_stop(text: str, stops: list[str], start: int = 0) -> int:
    """Index of the earliest stop string in text[start:] (as an index into
    text), or -1."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found, default=-1)


def held_back_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a stop
    string: that much must not be streamed yet."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
