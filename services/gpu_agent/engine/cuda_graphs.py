"""Decode steps replayed from CUDA graphs.

A decode step of a small batch is a few hundred small kernels; launched one by
one from Python, the launches (not the GPU) set the step time: measured on an
H200, 16 ms a step for Llama-3.2-1B against a 0.6 ms memory floor. A CUDA
graph launches the whole step at once.

One graph per (batch bucket, table width bucket; graph_shapes.py), captured on first use. A
graph's inputs live in one static device buffer, [5, max batch] int64 (token
ids, positions, new slots, sequence lengths, slot-table rows), filled by one
host-to-device copy per step; a batch smaller than its bucket is padded with
rows that write only the pool's padding slot (KVPool.padding_slot: kvcached's
slot 0, which it keeps mapped and never hands out; the page pool's extra row)
and read through the slot table's padding row (what they read is thrown away). The
slot table (slot_table.py) is read inside the graph, so a graph is only valid
for the table tensor it was captured with: a table that grows (its `version`)
drops every graph. The graph also writes each sequence's new slot into its
row of the table (rows_for(..., last_by_step=True) leaves that to it: no
host-to-device copy of the table in a steady decode), and takes the greedy
token of every row (argmax) along with the logits.

Graphs capture weight and KV-buffer addresses too: the engine drops the runner
when it deactivates (both are freed) and makes a new one on activation."""

from __future__ import annotations

import logging
import time
from collections import deque

import torch

from services.gpu_agent.engine.graph_shapes import BATCH_BUCKETS, DEFAULT_MAX_WIDTH, batch_bucket, graph_shape
from services.gpu_agent.engine.kv_pool import KVPool
from services.gpu_agent.engine.paged_attention import StepAttention
from services.gpu_agent.engine.slot_table import PADDING_ROW, DeviceSlotTable

log = logging.getLogger(__name__)

_IDS, _POSITIONS, _SLOTS, _LENS, _ROWS = range(5)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax of every row (the first of equal maxima), int64 [batch]."""
    from services.gpu_agent.engine import fused_ops

    if fused_ops.fused_ops_enabled():
        return fused_ops.argmax_rows(logits)
    return logits.argmax(dim=-1)


class DecodeGraphRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        pool: KVPool,
        table: DeviceSlotTable,
        device: torch.device,
        max_batch: int = BATCH_BUCKETS[-1],
        max_width: int = DEFAULT_MAX_WIDTH,
    ):
        if pool.padding_slot is None:
            raise ValueError(f"{type(pool).__name__} has no padding slot: decode graphs cannot pad a batch on it")
        self.model = model
        self.pool = pool
        self.padding_slot = pool.padding_slot
        self.table = table
        self.device = device
        self.max_batch = batch_bucket(min(max_batch, BATCH_BUCKETS[-1])) or BATCH_BUCKETS[-1]
        self.max_width = max_width
        self._inputs = torch.zeros((5, self.max_batch), dtype=torch.int64, device=device)
        self._staging = torch.zeros((5, self.max_batch), dtype=torch.int64).pin_memory()
        # (batch, width) -> (graph, logits [batch, vocab] float32, greedy tokens [batch] int64)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._graph_pool = torch.cuda.graph_pool_handle()
        self._table_version = table.version
        self.capture_seconds = 0.0
        # GPU time of recent replays (ms), read one step late: by then the step's
        # tokens were copied to the host, so its end event is done. Separates
        # the GPU's share of a step from the host's.
        self.replay_gpu_ms: deque[float] = deque(maxlen=1024)
        # Two pairs of timing events, used in turn: a pair is read (one step late)
        # before it is recorded again, and none is made per step.
        self._events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(2)]
        self._recorded: list[bool] = [False, False]
        self._turn = 0

    def can_run(self, batch: int, longest: int) -> bool:
        return batch <= self.max_batch and graph_shape(batch, longest, self.max_width) is not None

    def run(
        self, input_ids: list[int], positions: list[int], new_slots: list[int], seq_lens: list[int], rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of len(input_ids) sequences: float32 logits [batch, vocab]
        and the greedy tokens [batch] (int64), both on the device (views of the
        graph's outputs: read them before the next run). Also writes new_slots
        into the rows' slot-table entries at seq_lens - 1."""
        batch = len(input_ids)
        shape = graph_shape(batch, max(seq_lens), self.max_width)  # the simulator charges captures by it
        if shape is None:
            raise ValueError(f"no decode graph for {batch} sequences of up to {max(seq_lens)} tokens (see can_run)")
        bucket, width = shape
        if self.table.version != self._table_version:  # the table tensor the graphs read was replaced
            self._graphs.clear()
            # The private memory pool went with its last graph: its handle cannot be used again.
            self._graph_pool = torch.cuda.graph_pool_handle()
            self._table_version = self.table.version
        staging = self._staging.numpy()
        staging[_IDS, :batch] = input_ids
        staging[_POSITIONS, :batch] = positions
        staging[_SLOTS, :batch] = new_slots
        staging[_LENS, :batch] = seq_lens
        staging[_ROWS, :batch] = rows
        if batch < bucket:
            self._pad(staging, batch, bucket, self.padding_slot)
        self._inputs[:, :bucket].copy_(self._staging[:, :bucket], non_blocking=True)
        graph = self._graphs.get((bucket, width))
        if graph is None:
            graph = self._graphs[(bucket, width)] = self._capture(bucket, width)
        start, end = self._events[self._turn]
        start.record()
        graph[0].replay()
        end.record()
        # While the GPU runs the step: the GPU time of the replay before last.
        self._recorded[self._turn] = True
        self._turn ^= 1
        if self._recorded[self._turn]:
            before, after = self._events[self._turn]
            if after.query():
                self.replay_gpu_ms.append(before.elapsed_time(after))
            self._recorded[self._turn] = False
        return graph[1][:batch], graph[2][:batch]

    @staticmethod
    def _pad(staging, start: int, end: int, padding_slot: int) -> None:
        staging[_IDS, start:end] = 0
        staging[_POSITIONS, start:end] = 0
        staging[_SLOTS, start:end] = padding_slot
        staging[_LENS, start:end] = 1
        staging[_ROWS, start:end] = PADDING_ROW

    def _step(self, bucket: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured work: everything from the input buffer to the logits and
        the greedy tokens."""
        inputs = self._inputs[:, :bucket]
        table = self.table.tensor
        # The new token's slot into its sequence's row (padding rows write the padding
        # slot into the padding row's first entry, the only one a padded row reads).
        table[inputs[_ROWS], inputs[_LENS] - 1] = inputs[_SLOTS].to(table.dtype)
        slot_table = table.index_select(0, inputs[_ROWS])[:, :width]
        step = StepAttention(
            slot_mapping=inputs[_SLOTS],
            spans=[],
            num_decode=bucket,
            decode_slot_table=slot_table,
            decode_seq_lens=inputs[_LENS].to(torch.int32),
        )
        every_row = torch.arange(bucket, device=self.device)
        logits = self.model(inputs[_IDS], inputs[_POSITIONS], self.pool, step, every_row)
        return logits, greedy_tokens(logits)

    def _capture(self, bucket: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        # The staged inputs of this step are already in self._inputs; run it once
        # eagerly on a side stream first (Triton compiles, cuBLAS picks kernels),
        # as torch.cuda.graph's documentation asks.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step(bucket, width)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: kvcached's page thread maps memory while we capture.
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            logits, greedy = self._step(bucket, width)
        seconds = time.perf_counter() - start
        self.capture_seconds += seconds
        log.info("captured the decode graph for batch %d, width %d in %.3fs", bucket, width, seconds)
        return graph, logits, greedy
