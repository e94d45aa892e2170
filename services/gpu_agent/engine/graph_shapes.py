"""The shapes the decode CUDA graphs are captured for (cuda_graphs.py): a batch
bucket and a context-width bucket. Torch-free, so the simulator
(prism/simulator/engine.py) charges a capture for the same shapes the engine
captures."""

from __future__ import annotations

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
MIN_WIDTH_BUCKET = 512
DEFAULT_MAX_WIDTH = 16384  # longer contexts are attention-bound: eager launches cost little there


def graph_batch_buckets(max_batch: int = BATCH_BUCKETS[-1]) -> list[int]:
    return [b for b in BATCH_BUCKETS if b <= max_batch]


def graph_width_buckets(max_width: int = DEFAULT_MAX_WIDTH) -> list[int]:
    """Every slot-table width a graph is captured for, up to max_width's bucket."""
    doublings = (width_bucket(max_width) // MIN_WIDTH_BUCKET).bit_length()  # the bucket is MIN_WIDTH_BUCKET * 2**k
    return [MIN_WIDTH_BUCKET << i for i in range(doublings)]


def batch_bucket(batch: int) -> int | None:
    for bucket in BATCH_BUCKETS:
        if bucket >= batch:
            return bucket
    return None


def width_bucket(longest: int) -> int:
    width = MIN_WIDTH_BUCKET
    while width < longest:
        width *= 2
    return width


def graph_shape(batch: int, longest: int, max_width: int = DEFAULT_MAX_WIDTH) -> tuple[int, int] | None:
    """The (batch bucket, width bucket) of the graph a pure decode step of `batch` sequences, the longest
    `longest` tokens, runs from; None where it runs eagerly (too large a batch or too long a context)."""
    bucket = batch_bucket(batch)
    if bucket is None or longest > max_width:
        return None
    return bucket, width_bucket(longest)
