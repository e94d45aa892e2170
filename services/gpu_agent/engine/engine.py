"""The built-in PyTorch engine: one model, a background step loop, and an
async generate() for the agent.

Threads: generate() runs on the caller's asyncio loop; the step loop is a
daemon thread. They share the scheduler and sequences under `_lock`; the
model's forward runs outside it (so submitting and aborting never wait for a
step) but under `_model_lock`, which activation and deactivation take before
moving weights. Outputs go back into the request's asyncio.Queue through the
outbox (outbox.py): one loop.call_soon_threadsafe per step, not per output.

The model itself, its weights and its forward are the runner's (model_runner.py): on an
accelerator the weights live on the device while active and in pinned host memory always
(host_weights.py). KV lives in a paged pool (kv_pool_factory.py: kvcached on CUDA when it is
installed, PagePool otherwise) whose mapped memory follows a limit that can change at any
time; the batch scheduler (batch_scheduler.py) batches continuously and preempts under
that limit.

Slots are freed only between steps: a request aborted while a step runs (a
client gone, a deactivation) is marked finished at once, and its slots go
back when the step ends, since the step may still be writing to them."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch

from services.common.step_costs import CUDA_STEP_TOKENS, DEFAULT_STEP_TOKENS, StepTimeAccumulator, step_features
from services.gpu_agent.engine.batch_scheduler import BatchScheduler, ScheduledSeq
from services.gpu_agent.engine.detokenizer import IncrementalDetokenizer
from services.gpu_agent.engine.errors import (
    CapacityError,
    EngineError,
    EngineInactiveError,
    InvalidRequestError,
)
from services.gpu_agent.engine.gguf_file import GGUFModelFile, is_gguf
from services.gpu_agent.engine.host_weights import ActivationTiming
from services.gpu_agent.engine.kv_pool import KVGeometry, KVPool, MemoryLimitState
from services.gpu_agent.engine.kv_pool_factory import KVPoolFactory, choose_pool_kind, default_kv_limit_bytes
from services.gpu_agent.engine.kvcached_pool import KvcachedPool
from services.gpu_agent.engine.model_config import load_model_config
from services.gpu_agent.engine.model_runner import ModelRunner
from services.gpu_agent.engine.outbox import Outbox
from services.gpu_agent.engine.prefix_cache import PrefixCache, PrefixCacheStats
from services.gpu_agent.engine.prompt import prompt_token_ids
from services.gpu_agent.engine.request import (
    DEMAND_GROWTH_TOKENS,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    ServingPath,
)
from services.gpu_agent.engine.sampling import SamplingParams, make_generator
from services.gpu_agent.engine.sequence import Deliver, Sequence
from services.gpu_agent.engine.shard_follower import (
    ShardSetup,
    StepChannel,
    StopFollowing,
    SwitchOff,
    SwitchOn,
)
from services.gpu_agent.engine.step_board import StepBoard
from services.gpu_agent.engine.stop_strings import find_stop, held_back_len
from services.gpu_agent.engine.tensor_parallel import SINGLE, TensorParallel
from services.gpu_agent.engine.tokenizer import Tokenizer
from services.gpu_agent.engine.weights import resolve_dtype, use_device_on_this_thread

__all__ = [
    "CapacityError",
    "Engine",
    "EngineError",
    "EngineInactiveError",
    "EngineStats",
    "GenerationOutput",
    "GenerationRequest",
    "InvalidRequestError",
]

log = logging.getLogger(__name__)
# PRISM_ENGINE_STEP_LOG=1 logs every step (its batch and wall time): for post-mortems of
# serving latency (bench/step_log_summary.py reads these lines), off by default.
STEP_LOG = os.environ.get("PRISM_ENGINE_STEP_LOG", "") not in ("", "0")
# A step that runs the device out of memory is tried again after a wait (OOM_FIRST_WAIT_S, doubling up to
# OOM_MAX_WAIT_S) while the agent, measuring what the device's processes hold, lowers KV limits; its
# requests fail (CapacityError) only once the device has been out of memory for OOM_GIVE_UP_S.
OOM_FIRST_WAIT_S = 0.05
OOM_MAX_WAIT_S = 0.5
OOM_GIVE_UP_S = 10.0


def _rlog(seq: Sequence) -> dict[str, str]:
    return {"request_id": seq.request_id}


class Engine:
    def __init__(
        self,
        model_path: str | Path,
        *,
        name: str | None = None,
        load_format: str = "auto",
        dtype: str = "auto",
        device: str = "cpu",
        seed: int = 0,
        memory_limit_bytes: int | None = None,
        kv_capacity_bytes: int | None = None,
        kv_pool: str = "auto",
        kv_page_bytes: int | None = None,
        step_tokens: int | None = None,
        attention: str = "auto",
        cuda_graphs: bool = True,
        shared_weights_path: str | Path | None = None,
        warm_up: bool = True,
        max_context: int | None = None,
        tensor_parallel: TensorParallel = SINGLE,
        step_channel: StepChannel | None = None,
        step_board: tuple[str, int] | None = None,
        prefix_caching: bool = True,
        on_split_failure: Callable[[str], None] | None = None,
    ):
        """Loads the model and makes its KV pool; `start()` begins serving.

        Args:
            model_path: the model's folder (Hugging Face layout: config.json, safetensors, tokenizer) or a
                .gguf file.
            name: the name it serves under (default: the folder's name).
            load_format: "auto", "safetensors", "gguf" or "dummy" (random weights of the config's shapes).
            dtype: "auto" (the checkpoint's on accelerators, float32 on the CPU), "float32", "float16" or
                "bfloat16".
            device: "cpu", "cuda" or "cuda:N".
            seed: the random weights' seed (load_format "dummy").
            memory_limit_bytes: KV memory the engine may map now (default: 8 contexts).
            kv_capacity_bytes: the KV reservation the limit can later grow to (virtual where the pool is
                elastic; default: the device's memory on CUDA, 32 contexts on the CPU).
            kv_pool: "kvcached" (CUDA), "pages" (PagePool) or "auto" (kvcached where it runs).
            kv_page_bytes: the pool's page size (default: kvcached's 2 MiB page on CUDA, a smaller one on
                the CPU).
            step_tokens: the token budget of one step (decode tokens plus prefill chunks); default
                CUDA_STEP_TOKENS on CUDA, DEFAULT_STEP_TOKENS elsewhere.
            attention: "triton" (decode kernel, CUDA), "torch" or "auto".
            cuda_graphs: replay decode steps from CUDA graphs where they can run (CUDA, the Triton kernel,
                no tensor parallelism; on either KV pool).
            shared_weights_path: the host copy of the weights lives in this shared-memory file
                (shared_weights.py): mapped from there when another process has written it (no load),
                written there otherwise.
            warm_up: on CUDA, compile and load this model's kernels before the first request
                (_warm_up_kernels).
            max_context: serve at most this many tokens a sequence (prompt and output), if fewer than the
                model's own context; its KV defaults and reservation follow it.
            tensor_parallel: this engine is rank 0 of a model split over tensor_parallel.size devices
                (tensor_parallel.py). Its KV pool and kv_bytes_per_token are this rank's share of the KV
                heads; switching off and on moves every rank's weights. Not yet with CUDA graphs,
                kvcached or shared weights.
            step_channel: with tensor_parallel, every forward's inputs go over it to the other ranks
                (shard_follower.py).
            step_board: (path, slot) of its device's step board (step_board.py): only the steps that ran
                alone on the device go into its step-time sums. None: every step does (nothing else
                shares it).
            prefix_caching: full blocks of computed KV stay cached for later requests that begin with the
                same tokens (prefix_cache.py); what only the cache keeps is given back first when memory
                is needed, and does not count as used in stats().
            on_split_failure: a step that fails on a split engine fails the engine (_fail_split);
                on_split_failure(why) hears of it (the worker ends its process on it).
        """
        start = time.perf_counter()
        self.model_path = Path(model_path)
        self.name = name or self.model_path.name
        self._init_device(device)
        self._init_tensor_parallel(tensor_parallel, step_channel, shared_weights_path)
        self._init_model(load_format, dtype, seed, shared_weights_path, max_context, attention, cuda_graphs)
        self._init_kv_pool(kv_pool, kv_page_bytes, kv_capacity_bytes, memory_limit_bytes, step_tokens, prefix_caching)
        self._init_step_loop(step_board, on_split_failure)
        if warm_up and self._device.type == "cuda":
            self._warm_up_kernels()
        self._log_loaded(time.perf_counter() - start)

    def _init_device(self, device: str) -> None:
        self._device = torch.device(device)
        if self._device.type == "cuda" and self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        use_device_on_this_thread(self._device)  # the load and the warm-up's kernels run on this thread
        self.device = str(self._device)

    def _init_tensor_parallel(
        self, tensor_parallel: TensorParallel, step_channel: StepChannel | None, shared_weights_path: str | Path | None
    ) -> None:
        self.tp = tensor_parallel
        if (self.tp.size > 1) != (step_channel is not None):
            raise EngineError("a tensor-parallel engine needs a step channel to its other ranks, and only it")
        if self.tp.rank != 0:
            raise EngineError("only tensor-parallel rank 0 runs an engine (the others follow it: shard_follower.py)")
        if self.tp.size > 1 and shared_weights_path:
            raise EngineError("shared host weights are not supported with tensor parallelism yet")
        self._steps = step_channel

    def _init_model(
        self,
        load_format: str,
        dtype: str,
        seed: int,
        shared_weights_path: str | Path | None,
        max_context: int | None,
        attention: str,
        cuda_graphs: bool,
    ) -> None:
        """The configuration, the tokenizer and the model runner with its weights loaded; what a sequence
        may hold (max_context, its KV bytes a token) and where it ends (EOS)."""
        if max_context is not None and max_context < 1:
            raise EngineError(f"max_context must be at least 1, got {max_context}")
        try:
            gguf = GGUFModelFile(self.model_path) if is_gguf(self.model_path) else None
            self.config = gguf.model_config() if gguf else load_model_config(self.model_path)
            self.tokenizer = Tokenizer.from_gguf(gguf.tokenizer_spec()) if gguf else Tokenizer(self.model_path)
            self.dtype = resolve_dtype(dtype, self.config, self._device)
            cfg = self.config
            self.max_context = min(cfg.max_position_embeddings, max_context or cfg.max_position_embeddings)
            self._runner = ModelRunner(
                self.name,
                cfg,
                self.dtype,
                self._device,
                self.max_context,
                attention=attention,
                cuda_graphs=cuda_graphs,
                tensor_parallel=self.tp,
                step_channel=self._steps,
            )
            self._runner.load_weights(self.model_path, load_format, seed, shared_weights_path, gguf)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"cannot load {self.model_path}: {type(exc).__name__}: {exc}") from exc
        self.weight_bytes = self._runner.weight_bytes
        kv_heads = cfg.num_key_value_heads // self.tp.size  # this rank's share
        self.kv_bytes_per_token = 2 * cfg.num_hidden_layers * kv_heads * cfg.head_dim * self.dtype.itemsize
        self._geometry = KVGeometry(cfg.num_hidden_layers, kv_heads, cfg.head_dim, self.dtype)
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

    def _init_kv_pool(
        self,
        kv_pool: str,
        kv_page_bytes: int | None,
        kv_capacity_bytes: int | None,
        memory_limit_bytes: int | None,
        step_tokens: int | None,
        prefix_caching: bool,
    ) -> None:
        """The KV pool under its first limit, and the batch scheduler over it."""
        kind = choose_pool_kind(kv_pool, self._device)
        if self.tp.size > 1 and kind == "kvcached":
            # The followers would need kvcached's own tensor-parallel mapping (its workers map the pages
            # rank 0's allocator maps); until then their pools are PagePools of rank 0's reservation.
            raise EngineError("tensor parallelism runs on the page pool for now: kv_pool='pages'")
        self._pools = KVPoolFactory(
            kind,
            self._geometry,
            self._device,
            self.max_context,
            self.name,
            page_bytes_asked=kv_page_bytes,
            capacity_bytes=kv_capacity_bytes,
            padding_slot=self._runner.use_graphs,
        )
        limit = memory_limit_bytes or default_kv_limit_bytes(
            self.max_context, self.kv_bytes_per_token, self._pools.bundle_bytes
        )
        if step_tokens is None:
            step_tokens = CUDA_STEP_TOKENS if self._device.type == "cuda" else DEFAULT_STEP_TOKENS
        pool = self._pools.make(limit, 0)
        # None while a PagePool on an accelerator is gone with the weights (_release_kv_memory); the batch
        # scheduler keeps the last pool meanwhile, with no sequence on it.
        self._pool: KVPool | None = pool
        cache = PrefixCache(tokens_per_page=pool.tokens_per_page) if prefix_caching else None
        self._batcher = BatchScheduler(pool, step_tokens, cache=cache)
        # Where a PagePool on an accelerator went with the weights: its limit, for the next activation.
        self._pool_state = pool.limit_state()
        if self._steps is not None:  # the other ranks' pools are as large
            self._steps.send(ShardSetup(pool.capacity_tokens))

    def _init_step_loop(
        self, step_board: tuple[str, int] | None, on_split_failure: Callable[[str], None] | None
    ) -> None:
        self._step_times = StepTimeAccumulator()  # steps' times, for the scheduler's step costs
        self._board = StepBoard(*step_board) if step_board is not None else None
        self._in_step: set[Sequence] = set()  # sequences the running step computes
        self._free_after_step: list[Sequence] = []
        self._outbox = Outbox()  # outputs to the consumers, flushed after every step and failure
        self._lock = threading.Condition()
        self._model_lock = threading.Lock()
        self._active = True
        self._stopped = False
        # Why this split engine failed (_fail_split): it serves nothing more, its ranks are out of step.
        self._split_failure: str | None = None
        self._out_of_memory_since: float | None = None  # the first of the steps in a row that ran out
        self._out_of_memory_wait_s = OOM_FIRST_WAIT_S
        self._on_split_failure = on_split_failure
        self._thread: threading.Thread | None = None

    def _warm_up_kernels(self) -> list[tuple[int, int]]:
        """The runner's warm-up (ModelRunner.warm_up), before the step thread starts: the kernels of this
        model's geometry compiled and loaded now, not on its first users' requests. Returns the (prompt,
        output) tokens of its requests that finished."""
        return self._runner.warm_up(self._geometry, self.tokenizer)

    def _log_loaded(self, seconds: float) -> None:
        runner = self._runner
        self.serving_path = ServingPath(self._pools.kind, "triton" if runner.use_triton else "torch", runner.use_graphs)
        log.info(
            "engine %s: %s %s on %s, %d layers, context %d, %.1f MB weights, KV pool %s, attention %s, "
            "CUDA graphs %s, loaded in %.2fs",
            self.name,
            self.config.architecture,
            self.dtype,
            self.device,
            self.config.num_hidden_layers,
            self.max_context,
            self.weight_bytes / 1e6,
            self._pools.kind,
            self.serving_path.attention,
            "on" if runner.use_graphs else "off",
            seconds,
        )
        if self.serving_path.slow_on(self.device):
            log.warning(
                "engine %s runs the slow path on %s: the page pool without CUDA graphs (no triton, or "
                "graphs turned off); decode steps take 2-6x as long as with graphs",
                self.name,
                self.device,
            )

    @property
    def weights_attached(self) -> bool:
        """The host copy was mapped from another process's shared copy (no load)."""
        return self._runner.weights_attached

    @property
    def weights_shared(self) -> bool:
        """The host copy is in a shared-memory file other processes can map."""
        return self._runner.weights_shared

    @property
    def kv_bundle_bytes(self) -> int:
        """The granularity of the KV limit: one page in every K and V buffer."""
        return self._pools.bundle_bytes

    # ---- life cycle -------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._stopped:
                raise EngineError("engine stopped")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._fail_all(lambda: EngineError("engine stopped"))
            self._lock.notify_all()
            thread = self._thread
        self._outbox.flush()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        if self._steps is not None and self._split_failure is None:  # after the step thread: the channel's
            self._steps.send(StopFollowing())  # messages never interleave (none to ranks left mid-step)
        with self._model_lock:
            self._runner.close()  # the weights go with the engine
            if self._board is not None:
                self._board.close()
                self._board = None
            with self._lock:
                self._end_step()
                if self._pool is not None:
                    self._pool.close()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def active(self) -> bool:
        return self._active

    def activate(self) -> ActivationTiming | None:
        """Brings the weights back to the device; returns where the time went
        (None if the engine was active already)."""
        with self._model_lock:
            if self._split_failure is not None:
                raise EngineError(self._split_failure)
            if self._runner.model is None:
                raise EngineError("engine stopped")
            if self._active:
                return None
            if self._steps is not None:  # the other ranks copy their shards while this one copies its own
                self._steps.send(SwitchOn())
                timing = self._runner.move_weights(self._device)
            else:
                timing = self._runner.weights_to_device(self.weight_bytes)
            ready_start = time.perf_counter()
            with self._lock:
                if self._pool is None:
                    state = self._pool_state
                    self._pool = self._batcher.pool = self._pools.make(state.limit_bytes, state.revision)
                pool = self._pool
                self._runner.slot_table = self._runner.new_slot_table()
                self._active = True
            if self._steps is not None:  # switched on once every rank is
                self._steps.send(ShardSetup(pool.capacity_tokens))
                self._steps.barrier()
            timing = timing.with_ready(time.perf_counter() - ready_start)
            log.info(
                "engine %s activated in %.3fs: allocate %.3fs, copy %.3fs (%.1f GB/s), ready %.3fs",
                self.name,
                timing.total_s,
                timing.allocate_s,
                timing.copy_s,
                timing.copy_gbps,
                timing.ready_s,
            )
            return timing

    def deactivate(self) -> None:
        """Ends running and queued requests with EngineInactiveError, then
        frees the device's copy of the weights (the pinned host copy stays)."""
        with self._lock:
            if not self._active:
                return
            self._active = False
            self._fail_all(lambda: EngineInactiveError(f"model {self.name!r} was deactivated"))
        self._outbox.flush()
        with self._model_lock:
            self._runner.drop_device_state()
            # After stop() nobody follows; after a split failure the other ranks are mid-step or gone.
            following = self._steps if self._runner.model is not None and self._split_failure is None else None
            if following is not None:  # the other ranks free their memory while this one frees its own
                following.send(SwitchOff())
                self._runner.slots_sent.clear()
            if self._runner.model is not None:
                self._runner.move_weights(torch.device("cpu"))
            with self._lock:
                self._release_kv_memory()
            if following is not None:  # switched off once every rank's memory is free
                following.barrier()
        log.info("engine %s deactivated", self.name)

    def _release_kv_memory(self) -> None:
        """Under both locks, with no sequence left: the KV pool's memory goes back."""
        self._end_step()  # a step that ended before this took the model lock may not have freed its aborts yet
        self._batcher.drop_cache()  # the KV it keeps is not kept over a switch off
        pool = self._pool
        if isinstance(pool, KvcachedPool):
            pool.trim()  # every slot is free, so only kvcached's pre-mapped pages remain
        elif pool is not None and self._device.type != "cpu":
            # A PagePool holds its whole reservation: drop it, rebuild on activation.
            self._pool_state = pool.limit_state()
            pool.close()
            self._pool = None
            torch.cuda.empty_cache()

    def set_memory_limit(self, nbytes: int, revision: int | None = None) -> MemoryLimitState:
        """Sets the KV memory limit. Limits apply in revision order (an older
        revision is ignored: status "stale"); None takes the next revision.
        A limit below the mapped memory is "deferred": the engine preempts its
        newest requests at the next step until the pool fits."""
        if nbytes < 0:
            raise InvalidRequestError(f"the memory limit must be non-negative, got {nbytes}")
        with self._lock:
            pool = self._pool
            if pool is None:  # deactivated without an elastic pool: applies at activation
                current = self._pool_state
                rev = current.revision + 1 if revision is None else revision
                if rev > current.revision:
                    self._pool_state = MemoryLimitState("applied", int(nbytes), int(nbytes), 0, rev)
                    return self._pool_state
                return MemoryLimitState(
                    "stale", current.limit_bytes, current.effective_limit_bytes, 0, current.revision
                )
            rev = pool.limit_state().revision + 1 if revision is None else revision
            state = pool.set_memory_limit(int(nbytes), rev)
            if state.status == "deferred":  # what only the prefix cache keeps goes at once, not at the next step
                self._batcher.shed_cache_over_limit()
                state = pool.limit_state()
            self._lock.notify_all()
        log.info("engine %s: memory limit %.1f MB (revision %d): %s", self.name, nbytes / 1e6, rev, state.status)
        return state

    def stats(self) -> EngineStats:
        with self._lock:
            s = self._batcher
            pool = self._pool
            state = pool.limit_state() if pool is not None else self._pool_state
            cache = s.cache.stats() if s.cache is not None else PrefixCacheStats()
            # The cache's reclaimable blocks are neither used nor held: they are given back on demand.
            reclaimable = cache.reclaimable_tokens
            return EngineStats(
                running_requests=len(s.running),
                queued_requests=len(s.waiting),
                kv_used_bytes=(pool.used_tokens - reclaimable) * pool.geometry.token_bytes if pool is not None else 0,
                memory_limit_bytes=state.limit_bytes,
                weight_bytes=self.weight_bytes,
                kv_mapped_bytes=state.mapped_bytes,
                kv_free_tokens=pool.free_tokens + reclaimable if pool is not None else 0,
                memory_limit_revision=state.revision,
                memory_limit_status=state.status,
                kv_demand_tokens=s.demand_tokens(DEMAND_GROWTH_TOKENS),
                kv_held_bytes=(
                    pool.held_bytes_excluding(s.cache.reclaimable_in_page) if s.cache is not None else pool.held_bytes
                )
                if pool is not None
                else 0,
                kv_cached_bytes=reclaimable * self.kv_bytes_per_token,
                prefix_cache_queried_tokens=cache.queried_tokens,
                prefix_cache_hit_tokens=cache.hit_tokens,
                step_times=self._step_times.sums(),
            )

    # ---- requests ---------------------------------------------------------

    def tokenize_prompt(self, req: GenerationRequest) -> list[int]:
        return prompt_token_ids(self.tokenizer, req)

    def _checked_prompt_ids(self, req: GenerationRequest) -> list[int]:
        ids = self.tokenize_prompt(req)
        if not ids:
            raise InvalidRequestError("the prompt encodes to no tokens")
        if max(ids) >= self.config.vocab_size:
            raise InvalidRequestError(
                f"token id {max(ids)} is outside the model's vocabulary of {self.config.vocab_size}"
            )
        return ids

    def _validate(self, req: GenerationRequest) -> None:
        if req.prompt is not None and req.messages is not None:
            raise InvalidRequestError("give either a prompt or messages, not both")
        if req.max_tokens is not None and req.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {req.max_tokens}")
        if req.temperature is None or not 0 <= req.temperature < math.inf:  # NaN fails too
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {req.temperature}")
        if req.top_p is None or not 0 < req.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {req.top_p}")

    def _new_sequence(self, req: GenerationRequest, deliver: Deliver) -> Sequence:
        self._validate(req)
        if not self._active:
            raise EngineInactiveError(f"model {self.name!r} is deactivated")
        prompt_ids = self._checked_prompt_ids(req)
        n = len(prompt_ids)
        if n >= self.max_context:
            raise InvalidRequestError(
                f"prompt has {n} tokens, over the model's context of {self.max_context} "
                "(at least one token must be left to generate)"
            )
        if req.max_tokens is not None and n + req.max_tokens > self.max_context:
            raise InvalidRequestError(
                f"prompt has {n} tokens and max_tokens is {req.max_tokens}: "
                f"{n + req.max_tokens} is over the model's context of {self.max_context}"
            )
        sampling = SamplingParams(temperature=float(req.temperature), top_p=float(req.top_p), seed=req.seed)
        return Sequence(
            request_id=req.request_id,
            prompt_ids=prompt_ids,
            max_tokens=req.max_tokens if req.max_tokens is not None else self.max_context - n,
            sampling=sampling,
            stop=[s for s in (req.stop or []) if s],
            ignore_eos=req.ignore_eos,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            generator=make_generator(sampling, self._device),
            deliver=deliver,
        )

    def _submit(self, seq: Sequence) -> None:
        with self._lock:
            if self._split_failure is not None:
                raise EngineError(self._split_failure)
            if self._stopped:
                raise EngineError("engine stopped")
            if self._thread is None:
                raise EngineError("engine not started")
            if not self._active:
                raise EngineInactiveError(f"model {self.name!r} is deactivated")
            if not self._batcher.fits_alone(seq.num_prompt):
                raise CapacityError(
                    f"prompt has {seq.num_prompt} tokens: with one more that needs "
                    f"{(seq.num_prompt + 1) * self.kv_bytes_per_token} bytes of KV cache, over the engine's "
                    f"memory limit of {self._batcher.pool.limit_state().effective_limit_bytes} bytes"
                )
            self._batcher.add(seq)
            self._lock.notify_all()
        log.info("queued: %d prompt tokens, max_tokens %d", seq.num_prompt, seq.max_tokens, extra=_rlog(seq))

    def _abort(self, seq: Sequence) -> None:
        with self._lock:
            if not seq.finished:
                self._remove(seq)
                log.info("aborted after %d tokens", seq.num_output, extra=_rlog(seq))

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Streams the request's outputs; the last has finish_reason set.
        Invalid requests raise at the first iteration, before any output."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationOutput | BaseException] = asyncio.Queue()

        def deliver(item: GenerationOutput | BaseException) -> bool:
            return self._outbox.post(loop, queue.put_nowait, item)

        seq = self._new_sequence(req, deliver)
        self._submit(seq)
        done = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finish_reason is not None
                yield item
                if done:
                    return
        finally:
            if not done:  # consumer stopped early or was cancelled: free its KV now
                self._abort(seq)

    # ---- the step loop (engine thread) ------------------------------------

    def _remove(self, seq: Sequence) -> None:
        """Under _lock: the sequence leaves the engine and frees its KV (after
        the running step, if the step computes it)."""
        seq.finished = True
        if seq in self._in_step:
            self._free_after_step.append(seq)
        else:
            self._batcher.remove(seq)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        if not seq.finished:
            self._remove(seq)
            seq.deliver(error)
            log.info("failed: %s", error, extra=_rlog(seq))

    def _fail_all(self, make_error) -> None:
        for seq in [*self._batcher.running, *self._batcher.waiting]:
            self._fail(seq, make_error())

    def _run(self) -> None:
        use_device_on_this_thread(self._device)
        log.info("engine %s: step loop started", self.name)
        while True:
            with self._lock:
                while not self._stopped and not self._batcher.has_work():
                    self._lock.wait()
                if self._stopped or self._split_failure is not None:
                    break
            try:
                self._step()
            except Exception as exc:  # never leave consumers waiting on a dead step
                log.exception("engine %s: step failed", self.name)
                message = f"step failed: {type(exc).__name__}: {exc}"
                if self.tp.size > 1:
                    self._fail_split(message)
                    continue
                with self._lock:
                    self._end_step()
                    self._fail_all(lambda: EngineError(message))
            finally:
                self._outbox.flush()
        log.info("engine %s: step loop ended", self.name)

    def _step(self) -> None:
        scheduling = time.perf_counter()
        with self._lock:
            result = self._batcher.schedule()
            for seq in result.preempted:
                log.info("preempted at %d tokens (KV limit)", len(seq.token_ids), extra=_rlog(seq))
            for seq in result.too_big:
                self._too_big(seq)
            if STEP_LOG and result.kv_short is not None:
                self._log_kv_short(*result.kv_short)
            plan = result.batch
            self._in_step = {item.seq for item in plan}
        started = time.perf_counter()
        captures_before = self._runner.capture_seconds
        others = self._board.begin() if self._board is not None and plan else None
        try:
            try:
                tokens = self._forward(plan, result.num_decode) if plan else []
            finally:
                took = time.perf_counter() - started
                alone = self._board.end(others) if self._board is not None and others is not None else True
            if STEP_LOG and plan:
                log.info(
                    "engine %s step: %d decode, %d prefill tokens in %d seqs, %s, %.2f ms (scheduled in %.2f ms)",
                    self.name,
                    result.num_decode,
                    sum(item.count for item in plan[result.num_decode :]),
                    len(plan) - result.num_decode,
                    "graph" if self._runner.last_step_graph else "eager",
                    1e3 * (time.perf_counter() - started),
                    1e3 * (started - scheduling),
                )
        except torch.OutOfMemoryError as exc:
            if self.tp.size > 1:  # its other ranks are left mid-step
                self._fail_split(f"forward failed: {type(exc).__name__}: {exc}")
                return
            self._after_out_of_memory(plan, exc)
            return
        except Exception as exc:  # these requests fail, the engine goes on
            log.exception("engine %s: forward of %d sequences failed", self.name, len(plan))
            if self.tp.size > 1:  # unless it is split: then its other ranks are left mid-step
                self._fail_split(f"forward failed: {type(exc).__name__}: {exc}")
                return
            with self._lock:
                self._end_step()
                for item in plan:
                    self._fail(item.seq, EngineError(f"forward failed: {type(exc).__name__}: {exc}"))
            return
        self._out_of_memory_since, self._out_of_memory_wait_s = None, OOM_FIRST_WAIT_S
        with self._lock:
            self._end_step()
            if tokens is None:
                return  # stopped meanwhile; stop() has failed the requests
            if plan and alone:  # a graph captured in the step is a one-off, not what such a step costs
                self._record_step_time(
                    plan, result.num_decode, took - max(0.0, self._runner.capture_seconds - captures_before)
                )
            sampled = iter(tokens)
            for item in plan:
                token = next(sampled) if item.samples else None
                if item.seq.finished:
                    continue  # aborted or failed while the step ran
                item.seq.num_cached = item.start + item.count
                if token is not None:
                    self._append_token(item.seq, token)

    def _after_out_of_memory(self, plan: list[ScheduledSeq], exc: torch.OutOfMemoryError) -> None:
        """The step ran the device out of memory: its activations found no room beside every process's
        weights, KV and caches (the agent's measure of those lags their growth by seconds; on an H100 with
        12 engine processes a burst failed 19 requests this way). The step did not happen: its sequences
        keep their places and slots, and the loop waits, longer each time, while the agent lowers KV
        limits to what the device holds. Only a device out of memory for OOM_GIVE_UP_S fails the step's
        requests, with CapacityError (RESOURCE_EXHAUSTED: the device is full, not broken)."""
        now = time.monotonic()
        if self._out_of_memory_since is None:
            self._out_of_memory_since = now
        with self._lock:
            self._end_step()
            if now - self._out_of_memory_since >= OOM_GIVE_UP_S:
                log.error(
                    "engine %s: out of device memory for %.1fs; failing the step's %d requests",
                    self.name,
                    now - self._out_of_memory_since,
                    len(plan),
                )
                error = CapacityError(f"the device has been out of memory for {OOM_GIVE_UP_S:g}s: {exc}")
                for item in plan:
                    self._fail(item.seq, error)
                self._out_of_memory_since, self._out_of_memory_wait_s = None, OOM_FIRST_WAIT_S
                return
            log.warning(
                "engine %s: out of device memory in a step of %d sequences; trying it again in %.2fs",
                self.name,
                len(plan),
                self._out_of_memory_wait_s,
            )
            self._lock.wait(timeout=self._out_of_memory_wait_s)  # stop() wakes it
        self._out_of_memory_wait_s = min(2 * self._out_of_memory_wait_s, OOM_MAX_WAIT_S)

    def _log_kv_short(self, needed: int, free: int) -> None:
        """Under _lock, for the step log: the queue's head waits for slots. Where the limit leaves room
        for it, the pool could not map the pages: kvcached maps none while the card has less free than
        its headroom (KVCACHED_GPU_UTILIZATION, which the agent turns off: kvcached_env.py), so the
        agent's accounting promised memory the engine could not take (H100, 2026-12-07, headroom on:
        every such wait of a 12-model run, up to 12.7 s with room for 31,077 tokens under the limit)."""
        pool = self._pool
        if pool is None:
            return
        room = pool.limit_tokens - pool.used_tokens
        log.info(
            "engine %s: admission waits for KV: the queue's head needs %d slots, the pool has %d free, "
            "the limit room for %d",
            self.name,
            needed,
            free,
            room,
        )

    def _fail_split(self, why: str) -> None:
        """A step of this split engine failed: its other ranks are left inside the step's collectives (or
        have gone, which is what failed it), so no later step, switch or stop can meet them. Every request
        ends with the error, new ones are refused with it, the step loop ends, and on_split_failure hears
        why: the worker ends its process, so the agent reports the engine failed and ends the other ranks
        (whose collectives then fail too) within seconds, instead of leaving them waiting for the process
        group's timeout."""
        message = (
            f"{why} (tensor-parallel rank 0 of {self.tp.size}): the split engine has failed, its ranks are out of step"
        )
        log.error("engine %s: %s", self.name, message)
        with self._lock:
            self._end_step()
            self._split_failure = message
            self._fail_all(lambda: EngineError(message))
            self._lock.notify_all()
        self._outbox.flush()
        if self._on_split_failure is not None:
            self._on_split_failure(message)

    def _end_step(self) -> None:
        """Under _lock: frees what was aborted while the step ran."""
        self._in_step = set()
        for seq in self._free_after_step:
            self._batcher.remove(seq)
        self._free_after_step = []

    def _forward(self, plan: list[ScheduledSeq], num_decode: int) -> list[int] | None:
        """One model step over the planned tokens (ModelRunner.forward), under the model lock: the
        weights do not move meanwhile."""
        with self._model_lock:
            return self._runner.forward(plan, num_decode, self._pool)

    def _record_step_time(self, plan: list[ScheduledSeq], num_decode: int, seconds: float) -> None:
        """Into the step-time sums the scheduler fits step costs from (services/common/step_costs.py)."""
        context = sum(item.start for item in plan[:num_decode]) * self.kv_bytes_per_token
        prefill = plan[num_decode:]
        self._step_times.record(
            step_features(num_decode, context, sum(item.count for item in prefill), len(prefill)), seconds
        )

    def _too_big(self, seq: Sequence) -> None:
        """The limit shrank below what this sequence needs even alone."""
        if seq.num_output == 0:
            limit = self._batcher.pool.limit_state().effective_limit_bytes
            self._fail(
                seq,
                CapacityError(
                    f"request needs {(len(seq.token_ids) + 1) * self.kv_bytes_per_token} bytes "
                    f"of KV cache, over the engine's memory limit of {limit}"
                ),
            )
        else:
            log.warning("KV limit reached: ending at %d tokens", len(seq.token_ids), extra=_rlog(seq))
            self._emit(seq, "length")

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        if STEP_LOG and seq.num_output == 1:
            log.info("first token", extra=_rlog(seq))
        seq.unsent_ids.append(token)
        finish: str | None = None
        if token in self.eos_token_ids and not seq.ignore_eos:
            finish = "stop"  # EOS has no text
        else:
            seq.text += seq.detokenizer.push(token)
            if seq.num_output >= seq.max_tokens or len(seq.token_ids) >= self.max_context:
                finish = "length"
        self._emit(seq, finish)

    def _emit(self, seq: Sequence, finish: str | None) -> None:
        """Delivers what is new since the last output; finishes the sequence
        if finish is set or a stop string appeared."""
        if finish is not None:
            seq.text += seq.detokenizer.flush()
        if seq.stop:
            at = find_stop(seq.text, seq.stop, seq.sent_chars)
            if at >= 0:
                seq.text = seq.text[:at]
                finish = "stop"
        release = (
            len(seq.text)
            if finish is not None
            else max(seq.sent_chars, len(seq.text) - held_back_len(seq.text, seq.stop))
        )
        out = GenerationOutput(
            text=seq.text[seq.sent_chars : release],
            token_ids=seq.unsent_ids,
            finish_reason=finish,
            prompt_tokens=seq.num_prompt,
            completion_tokens=seq.num_output,
            cached_tokens=min(seq.cached_prompt_tokens, seq.num_prompt),
        )
        seq.sent_chars = release
        seq.unsent_ids = []
        if finish is not None:  # freed and logged before the consumer can see the end
            self._remove(seq)
            log.info(
                "finished (%s): %d prompt + %d completion tokens",
                finish,
                seq.num_prompt,
                seq.num_output,
                extra=_rlog(seq),
            )
        if not seq.deliver(out) and finish is None:
            self._remove(seq)
            log.info("consumer gone; aborted after %d tokens", seq.num_output, extra=_rlog(seq))
