"""The model on its device: its weights (loading, the pinned host copy, moving
them on and off the device), its kernels' warm-up, and the forward of one step,
eager or a decode step replayed from a CUDA graph.

The engine (engine.py) decides what a step computes and what becomes of its
tokens; the runner only computes. It holds no lock: the engine calls forward()
under its model lock, which activation and deactivation take before moving
weights, so a step never runs on weights in motion."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from services.gpu_agent.engine.batch_scheduler import BatchScheduler, ScheduledSeq
from services.gpu_agent.engine.cuda_graphs import DecodeGraphRunner
from services.gpu_agent.engine.detokenizer import IncrementalDetokenizer
from services.gpu_agent.engine.errors import CapacityError, EngineError
from services.gpu_agent.engine.gguf_file import GGUFModelFile
from services.gpu_agent.engine.graph_shapes import graph_batch_buckets, graph_width_buckets
from services.gpu_agent.engine.host_weights import ActivationTiming, HostWeights
from services.gpu_agent.engine.kv_pool import KVGeometry, KVPool, PagePool
from services.gpu_agent.engine.model import CausalLM
from services.gpu_agent.engine.model_config import ModelConfig
from services.gpu_agent.engine.paged_attention import build_step_attention
from services.gpu_agent.engine.sampling import SamplingParams, sample_batch
from services.gpu_agent.engine.sequence import Sequence
from services.gpu_agent.engine.shard_follower import ForwardStep, StepChannel
from services.gpu_agent.engine.shared_weights import SharedWeightsFile
from services.gpu_agent.engine.slot_mirror import SlotsSent
from services.gpu_agent.engine.slot_table import DeviceSlotTable
from services.gpu_agent.engine.tensor_parallel import SINGLE, TensorParallel
from services.gpu_agent.engine.tokenizer import Tokenizer
from services.gpu_agent.engine.weights import build_empty_model, load_model

log = logging.getLogger(__name__)

# The CUDA warm-up's requests (ModelRunner.warm_up): two prompts, the longer cut into chunks,
# then 16 short ones; request i asks for 2 + i tokens, so decode batches of 16 down to 1 follow.
WARMUP_PROMPT_TOKENS = (40, 150) + (8,) * 14
WARMUP_STEP_TOKENS = 128
WARMUP_NEW_TOKENS = tuple(2 + i for i in range(len(WARMUP_PROMPT_TOKENS)))
WARMUP_MAX_STEPS = 64  # a few steps are enough: bounded all the same
ATTENTIONS = ("auto", "triton", "torch")


def choose_triton(attention: str, device: torch.device) -> bool:
    """Whether decode attention runs the Triton kernel: asked ("triton"), allowed ("auto") and usable (CUDA
    with triton installed)."""
    if attention not in ATTENTIONS:
        raise EngineError(f"attention {attention!r} is not one of {', '.join(ATTENTIONS)}")
    usable = False
    if device.type == "cuda":
        try:
            from services.gpu_agent.engine.triton_decode import triton_available
        except ImportError:
            usable = False
        else:
            usable = triton_available()
    if attention == "triton" and not usable:
        raise EngineError("attention 'triton' needs CUDA and triton")
    return usable and attention != "torch"


class ModelRunner:
    def __init__(
        self,
        name: str,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_context: int,
        *,
        attention: str = "auto",
        cuda_graphs: bool = True,
        tensor_parallel: TensorParallel = SINGLE,
        step_channel: StepChannel | None = None,
    ):
        """The runner of one engine's model; load_weights() brings the weights.

        Args:
            name: the engine's name, for the logs.
            config: the model's configuration.
            dtype: the weights' and the KV's type.
            device: where the model runs.
            max_context: the longest sequence served (the slot table's width).
            attention: "triton", "torch" or "auto" (choose_triton).
            cuda_graphs: replay decode steps from CUDA graphs where they can run (the Triton kernel, no
                tensor parallelism).
            tensor_parallel: this is rank 0 of a model split over tensor_parallel.size devices.
            step_channel: with tensor_parallel, every forward's inputs go over it to the other ranks.
        """
        self.name = name
        self.config = config
        self.dtype = dtype
        self.device = device
        self.max_context = max_context
        self.tp = tensor_parallel
        self.use_triton = choose_triton(attention, device)
        # Decode steps from CUDA graphs: on either pool (each keeps a padding slot for them); not yet
        # with tensor parallelism, where every rank would have to capture and replay in step.
        self.use_graphs = cuda_graphs and self.use_triton and tensor_parallel.size == 1
        self.model: CausalLM | None = None  # None once the engine stops
        self.host_weights: HostWeights | None = None
        self.weights_attached = False  # mapped from another process's shared copy
        # The decoding sequences' slots stay on the device for the Triton kernel (slot_table.py).
        self.slot_table: DeviceSlotTable | None = None
        self.graph_runner: DecodeGraphRunner | None = None  # made on the first decode step after activation
        self.last_step_graph = False  # for the step log
        self._steps = step_channel
        self.slots_sent = SlotsSent()  # what the other ranks know of each sequence's slots

    # ---- weights ----------------------------------------------------------

    def load_weights(
        self, model_path: Path, load_format: str, seed: int, shared_path: str | Path | None, gguf: GGUFModelFile | None
    ) -> None:
        """Loads the model onto the device. On an accelerator the weights always stay in (pinned) host
        memory too, for fast switching; on the CPU the host copy is the weights, kept only where it is
        shared."""
        shared = SharedWeightsFile(Path(shared_path)) if shared_path else None
        pin = self.device.type == "cuda"
        attached = None
        if shared is not None:
            skeleton = build_empty_model(self.config, self.dtype, "cpu")  # uninitialized: no memory touched
            attached = HostWeights.attach(skeleton, shared, pin=pin)
            if attached is not None:
                self.model, self.host_weights, self.weights_attached = skeleton, attached, True
        if attached is None:
            self.model = load_model(self.config, model_path, load_format, self.dtype, self.device, seed, self.tp, gguf)
            if shared is not None or self.device.type != "cpu":
                self.host_weights = HostWeights(self.model, shared, pin=pin)
        # Off the device and back into one buffer, as every activation does:
        # the loaded tensors and the packed copy never both hold device memory.
        self.move_weights(torch.device("cpu"))
        self.move_weights(self.device)
        self.slot_table = self.new_slot_table()

    @property
    def weight_bytes(self) -> int:
        if self.model is None:
            raise EngineError("engine stopped")
        return self.model.weight_bytes

    @property
    def weights_shared(self) -> bool:
        """The host copy is in a shared-memory file other processes can map."""
        return self.host_weights is not None and self.host_weights.shared

    def move_weights(self, device: torch.device) -> ActivationTiming:
        if self.model is not None:
            self.model.forget_joined_weights()
        if self.host_weights is None or device.type == "cpu":
            if self.host_weights is not None:
                self.host_weights.to_host()
            return ActivationTiming(0, 0.0, 0.0, 0.0)  # a CPU engine's weights never move
        return self.host_weights.to_device(device)

    def weights_to_device(self, weight_bytes: int) -> ActivationTiming:
        """The weights to the device; its running out of memory (the agent's count of the device's memory
        is short of what every process there holds: seen on an H100 with 12 engine processes, about 25 GB
        beyond weights and KV) is a CapacityError the agent answers RESOURCE_EXHAUSTED, the engine left
        switched off and whole, not an internal error."""
        try:
            return self.move_weights(self.device)
        except torch.OutOfMemoryError as exc:
            free, total = torch.cuda.mem_get_info(self.device) if self.device.type == "cuda" else (0, 0)
            raise CapacityError(
                f"engine {self.name}: no room on {self.device} for its weights "
                f"({weight_bytes / 2**30:.2f} GiB; {free / 2**30:.2f} of "
                f"{total / 2**30:.2f} GiB free): {exc}"
            ) from None

    def new_slot_table(self) -> DeviceSlotTable | None:
        return DeviceSlotTable(self.device, self.max_context) if self.use_triton else None

    def drop_device_state(self) -> None:
        """Before the weights leave the device: the graphs hold their addresses and the KV pool's."""
        self.graph_runner = None
        self.slot_table = None

    def close(self) -> None:
        """The engine stops: the weights go with it."""
        self.graph_runner = None
        self.model = None
        if self.host_weights is not None:
            self.host_weights.close()
        self.host_weights = None

    # ---- one step ---------------------------------------------------------

    @property
    def capture_seconds(self) -> float:
        """The seconds the decode graphs were captured in, since the graph runner was made."""
        return self.graph_runner.capture_seconds if self.graph_runner is not None else 0.0

    def forward(self, plan: list[ScheduledSeq], num_decode: int, pool: KVPool | None) -> list[int] | None:
        """One model step over the planned tokens on `pool`; a sampled token for each sequence whose step
        reaches its last token. None where the engine stopped or its pool is gone."""
        with torch.inference_mode():
            if self.model is None or pool is None:
                return None
            rows = None
            runner = self._decode_graph_runner(plan, num_decode, pool)
            decoding = [item.seq for item in plan[:num_decode]]
            # A graph step writes each sequence's new slot into the slot table itself.
            last_by_step = runner is not None and all(len(item.seq.slots) == item.start + 1 for item in plan)
            if self.slot_table is not None and num_decode:
                rows = self.slot_table.rows_for(decoding, last_by_step=last_by_step)
            logits = greedy = None
            self.last_step_graph = False
            try:
                if runner is not None and rows is not None:
                    out = self._graph_decode(runner, plan, rows)
                    self.last_step_graph = out is not None
                    if out is not None:
                        logits, greedy = out
                    elif last_by_step and self.slot_table is not None:
                        # eager after all: the table needs the slots the graph would have written
                        self.slot_table.unsync_last(decoding)
                        rows = self.slot_table.rows_for(decoding)
                        last_by_step = False
                if logits is None:
                    logits = self._eager_forward(plan, num_decode, rows, pool)
                samplers = [item.seq for item in plan if item.samples]
                if not samplers:
                    return []
                return sample_batch(
                    logits,
                    [seq.sampling for seq in samplers],
                    [seq.generator for seq in samplers],
                    greedy if len(samplers) == len(plan) else None,
                )
            except torch.OutOfMemoryError:  # the engine tries the step again: the slots it did not write
                if last_by_step and self.slot_table is not None:
                    self.slot_table.unsync_last(decoding)
                raise

    def _eager_forward(
        self, plan: list[ScheduledSeq], num_decode: int, rows: list[int] | None, pool: KVPool
    ) -> torch.Tensor:
        assert self.model is not None  # forward() checked
        input_ids: list[int] = []
        positions: list[int] = []
        spans: list[tuple[int, int, list[int]]] = []
        logits_at: list[int] = []
        for item in plan:
            seq = item.seq
            input_ids.extend(seq.token_ids[item.start : item.start + item.count])
            positions.extend(range(item.start, item.start + item.count))
            spans.append((item.start, item.count, seq.slots))
            if item.samples:
                logits_at.append(len(input_ids) - 1)
        table = self.slot_table.tensor if rows is not None and self.slot_table is not None else None
        if self._steps is not None:  # the other ranks run this forward too, on their shards
            updates, finished = self.slots_sent.updates(
                (item.seq, start, count, slots) for item, (start, count, slots) in zip(plan, spans)
            )
            self._steps.send(ForwardStep(input_ids, positions, updates, logits_at, finished))
        step = build_step_attention(spans, num_decode, self.device, table, rows, self.dtype)
        return self.model(
            torch.tensor(input_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            pool,
            step,
            torch.tensor(logits_at, dtype=torch.long, device=self.device),
        )

    def _decode_graph_runner(self, plan: list[ScheduledSeq], num_decode: int, pool: KVPool) -> DecodeGraphRunner | None:
        """The graph runner, where this step is a pure decode step that a CUDA graph can run."""
        if not (self.use_graphs and self.slot_table is not None and num_decode and num_decode == len(plan)):
            return None
        assert self.model is not None  # forward() checked
        if self.graph_runner is None or self.graph_runner.pool is not pool:  # graphs are bound to their pool
            self.graph_runner = DecodeGraphRunner(self.model, pool, self.slot_table, self.device)
        if not self.graph_runner.can_run(len(plan), max(item.start + 1 for item in plan)):
            return None
        return self.graph_runner

    def _graph_decode(
        self, runner: DecodeGraphRunner, plan: list[ScheduledSeq], rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A pure decode step from a CUDA graph: (logits, greedy tokens); None
        where the graph failed (then the engine decodes eagerly from now on)."""
        try:
            return runner.run(
                [item.seq.token_ids[item.start] for item in plan],
                [item.start for item in plan],
                [item.seq.slots[item.start] for item in plan],
                [item.start + 1 for item in plan],
                rows,
            )
        except torch.OutOfMemoryError:  # the device is full for now, the graphs are fine: the step is retried
            raise
        except Exception:  # a capture that fails must not take serving down: eager from now on
            log.exception("engine %s: CUDA graph decode failed; decoding eagerly from now on", self.name)
            self.use_graphs = False
            self.graph_runner = None
            return None

    # ---- warm-up ----------------------------------------------------------

    def warm_up(self, geometry: KVGeometry, tokenizer: Tokenizer) -> list[tuple[int, int]]:
        """Short requests through every kind of step this engine runs (a prefill from
        position 0, a later prefill chunk, a prefill beside decoding sequences, decoding
        through the Triton kernel, and CUDA-graph decode steps of 16 sequences down to 1),
        so that the kernels of this model's geometry are compiled and loaded now, not on
        its first users' requests: on a fresh H100 those waited up to 1.8 s for their first
        token (bench/step_log_summary.py over bench/validate_simulator.py's cluster), and
        with the graphs left out, the first graph captured after an activation took 0.5-0.9 s
        (Triton compiling the graph path's kernels for batch sizes it had not seen; a later
        capture takes 15-40 ms). Triton specializes integer arguments that equal 1 or divide
        by 16, so batches of 1, 2 and 16 cover the kernels' variants. Runs on a small KV pool
        and batch scheduler of its own, so the engine's pool, its limit and revision are
        untouched; its graphs go at the end (they are bound to that pool); never fatal.
        Returns the (prompt, output) tokens of every request that finished."""
        start = time.perf_counter()
        graphs = self.use_graphs
        finished: list[tuple[int, int]] = []
        scratch = None
        try:
            scratch = PagePool(
                geometry, sum(WARMUP_PROMPT_TOKENS) + sum(WARMUP_NEW_TOKENS) + 1, 0, self.device, padding_slot=True
            )  # for the graphs' padded rows
            scratch.set_memory_limit(scratch.capacity_tokens * geometry.token_bytes, 1)
            batcher = BatchScheduler(scratch, WARMUP_STEP_TOKENS)
            for sequence in self._warm_up_sequences(tokenizer):
                batcher.add(sequence)
            for _ in range(WARMUP_MAX_STEPS):
                if not batcher.has_work():
                    break
                finished += self._warm_up_step(batcher, scratch)
            if self.use_graphs:  # the decode kernel's variants for the other graph shapes
                from services.gpu_agent.engine.triton_decode import compile_decode_variants

                compile_decode_variants(
                    self.config.num_attention_heads // self.tp.size,
                    geometry.num_kv_heads,
                    geometry.head_dim,
                    self.dtype,
                    self.device,
                    graph_batch_buckets(),
                    graph_width_buckets(),
                )
            if batcher.has_work() or len(finished) < len(WARMUP_PROMPT_TOKENS):
                log.warning(
                    "engine %s: kernel warm-up incomplete (%d of %d requests finished)",
                    self.name,
                    len(finished),
                    len(WARMUP_PROMPT_TOKENS),
                )
        except Exception as exc:  # noqa: BLE001  an optimization: serving goes on without it
            log.warning("engine %s: kernel warm-up failed: %s: %s", self.name, type(exc).__name__, exc)
        finally:
            self.use_graphs = graphs
            self.graph_runner = None
            self.slot_table = self.new_slot_table()
            if scratch is not None:
                scratch.close()
        log.info("engine %s: kernels warm in %.2fs", self.name, time.perf_counter() - start)
        return finished

    def _warm_up_sequences(self, tokenizer: Tokenizer) -> list[Sequence]:
        vocab = self.config.vocab_size
        sequences = []
        for i, n in enumerate(WARMUP_PROMPT_TOKENS):
            prompt = [1 + j % (vocab - 1) for j in range(n)]
            sequences.append(
                Sequence(
                    request_id=f"warm-up-{i}",
                    prompt_ids=prompt,
                    max_tokens=WARMUP_NEW_TOKENS[i],
                    sampling=SamplingParams(temperature=0.0),
                    stop=[],
                    ignore_eos=True,
                    detokenizer=IncrementalDetokenizer(tokenizer, prompt),
                    generator=None,
                    deliver=lambda out: True,
                )
            )
        return sequences

    def _warm_up_step(self, batcher: BatchScheduler, pool: KVPool) -> list[tuple[int, int]]:
        """One step of the warm-up's requests; the (prompt, output) tokens of those it finished."""
        result = batcher.schedule()
        if result.too_big:
            raise EngineError(f"{len(result.too_big)} warm-up requests do not fit its pool")
        tokens = self.forward(result.batch, result.num_decode, pool)
        if tokens is None:
            raise EngineError("the model is gone")
        sampled = iter(tokens)
        finished = []
        for item in result.batch:
            token = next(sampled) if item.samples else None
            seq = item.seq
            seq.num_cached = item.start + item.count
            if token is not None:
                seq.token_ids.append(token)
                if seq.num_output >= seq.max_tokens:
                    batcher.remove(seq)
                    finished.append((seq.num_prompt, seq.num_output))
        return finished
