"""The built-in PyTorch engine: one model, a background step loop, and an
async generate() for the agent.

Threads: generate() runs on the caller's asyncio loop; the step loop is a
daemon thread. They share the scheduler and sequences under `_lock`; the
model's forward runs outside it (so submitting and aborting never wait for a
step) but under `_model_lock`, which activation and deactivation take before
moving weights. Outputs go back with loop.call_soon_threadsafe into the
request's asyncio.Queue.

Memory: on an accelerator the weights live on the device while active and in
pinned host memory always (see host_weights.py); KV is counted against the
memory limit per token."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from services.gpu_agent.engine.chat_template import ChatTemplateError
from services.gpu_agent.engine.detokenizer import IncrementalDetokenizer
from services.gpu_agent.engine.errors import CapacityError, EngineError, EngineInactiveError, InvalidRequestError
from services.gpu_agent.engine.host_weights import HostWeights
from services.gpu_agent.engine.kv_cache import SequenceKVCache
from services.gpu_agent.engine.model import CausalLM, KVSpan
from services.gpu_agent.engine.model_config import ModelConfig, load_model_config
from services.gpu_agent.engine.request import EngineStats, GenerationOutput, GenerationRequest
from services.gpu_agent.engine.sampling import SamplingParams, make_generator, sample_batch
from services.gpu_agent.engine.scheduler import Scheduler
from services.gpu_agent.engine.sequence import Deliver, Sequence
from services.gpu_agent.engine.stop_strings import find_stop, held_back_len
from services.gpu_agent.engine.tokenizer import Tokenizer
from services.gpu_agent.engine.weights import load_model

__all__ = [
    "CapacityError", "Engine", "EngineError", "EngineInactiveError", "EngineStats",
    "GenerationOutput", "GenerationRequest", "InvalidRequestError",
]

log = logging.getLogger(__name__)

DEFAULT_CONTEXTS_IN_MEMORY = 8  # default KV limit: this many full contexts

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    """"auto": the checkpoint's dtype on accelerators, float32 on the CPU
    (CPU half-precision matmuls are slow and inexact)."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(str(config.torch_dtype), torch.bfloat16)
    if dtype not in _DTYPES:
        raise EngineError(f"dtype {dtype!r} is not supported (supported: auto, {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def _rlog(seq: Sequence) -> dict[str, str]:
    return {"request_id": seq.request_id}


class Engine:
    def __init__(self, model_path: str | Path, *, name: str | None = None, load_format: str = "auto",
                 dtype: str = "auto", device: str = "cpu", seed: int = 0,
                 memory_limit_bytes: int | None = None):
        start = time.perf_counter()
        self.model_path = Path(model_path)
        self.name = name or self.model_path.name
        self._device = torch.device(device)
        if self._device.type == "cuda" and self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self.device = str(self._device)
        try:
            self.config = load_model_config(self.model_path)
            self.tokenizer = Tokenizer(self.model_path)
            self.dtype = resolve_dtype(dtype, self.config, self._device)
            self._model: CausalLM | None = load_model(self.config, self.model_path, load_format, self.dtype, self._device, seed)
            # On an accelerator the weights also stay in pinned host memory, for fast switching.
            self._host_weights = HostWeights(self._model) if self._device.type != "cpu" else None
            self._move_weights(self._device)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"cannot load {self.model_path}: {type(exc).__name__}: {exc}") from exc
        cfg = self.config
        self.max_context = cfg.max_position_embeddings
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self._model.parameters())
        self.kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * self.dtype.itemsize
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        limit = memory_limit_bytes or DEFAULT_CONTEXTS_IN_MEMORY * self.max_context * self.kv_bytes_per_token
        self._scheduler = Scheduler(self.kv_bytes_per_token, limit)
        self._lock = threading.Condition()
        self._model_lock = threading.Lock()
        self._active = True
        self._stopped = False
        self._thread: threading.Thread | None = None
        log.info("engine %s: %s %s on %s, %d layers, context %d, %.1f MB weights, loaded in %.2fs",
                 self.name, cfg.architecture, self.dtype, self.device, cfg.num_hidden_layers,
                 self.max_context, self.weight_bytes / 1e6, time.perf_counter() - start)

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
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        with self._model_lock:
            self._model = None  # the weights go with the engine
            self._host_weights = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def active(self) -> bool:
        return self._active

    def activate(self) -> None:
        with self._model_lock:
            if self._model is None:
                raise EngineError("engine stopped")
            if not self._active:
                self._move_weights(self._device)
                with self._lock:
                    self._active = True
                log.info("engine %s activated", self.name)

    def deactivate(self) -> None:
        """Ends running and queued requests with EngineInactiveError, then
        frees the device's copy of the weights (the pinned host copy stays)."""
        with self._lock:
            if not self._active:
                return
            self._active = False
            self._fail_all(lambda: EngineInactiveError(f"model {self.name!r} was deactivated"))
        with self._model_lock:
            if self._model is not None:
                self._move_weights(torch.device("cpu"))
        log.info("engine %s deactivated", self.name)

    def _move_weights(self, device: torch.device) -> None:
        if self._host_weights is None:
            return  # a CPU engine: host memory is where the weights live anyway
        if device.type == "cpu":
            self._host_weights.to_host()
        else:
            self._host_weights.to_device(device)

    def set_memory_limit(self, nbytes: int) -> None:
        with self._lock:
            self._scheduler.memory_limit_bytes = int(nbytes)
            self._lock.notify_all()

    def stats(self) -> EngineStats:
        with self._lock:
            s = self._scheduler
            return EngineStats(
                running_requests=len(s.running),
                queued_requests=len(s.waiting),
                kv_used_bytes=s.kv_used_bytes,
                memory_limit_bytes=s.memory_limit_bytes,
                weight_bytes=self.weight_bytes,
            )

    # ---- requests ---------------------------------------------------------

    def tokenize_prompt(self, req: GenerationRequest) -> list[int]:
        if req.messages is not None:
            if not req.messages:
                raise InvalidRequestError("messages is empty")
            for m in req.messages:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise InvalidRequestError(f"each message needs a string role and content, got {m!r}")
            try:
                return self.tokenizer.encode_chat(req.messages, req.add_generation_prompt)
            except ChatTemplateError as exc:
                raise InvalidRequestError(f"cannot render the chat: {exc}") from None
        if not req.prompt:
            raise InvalidRequestError("the prompt is empty (give a prompt or messages)")
        return self.tokenizer.encode(req.prompt)

    def _checked_prompt_ids(self, req: GenerationRequest) -> list[int]:
        ids = self.tokenize_prompt(req)
        if not ids:
            raise InvalidRequestError("the prompt encodes to no tokens")
        if max(ids) >= self.config.vocab_size:
            raise InvalidRequestError(f"token id {max(ids)} is outside the model's vocabulary of {self.config.vocab_size}")
        return ids

    def _validate(self, req: GenerationRequest) -> None:
        if req.prompt is not None and req.messages is not None:
            raise InvalidRequestError("give either a prompt or messages, not both")
        if req.max_tokens is not None and req.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {req.max_tokens}")
        if req.temperature is None or req.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {req.temperature}")
        if req.top_p is None or not 0 < req.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {req.top_p}")

    def _new_sequence(self, req: GenerationRequest, deliver: Deliver) -> Sequence:
        self._validate(req)
        if not self._active:
            raise EngineInactiveError(f"model {self.name!r} is deactivated")
        prompt_ids = self._checked_prompt_ids(req)
        n = len(prompt_ids)
        if n >= self.max_context:
            raise InvalidRequestError(f"prompt has {n} tokens, over the model's context of {self.max_context} "
                                      "(at least one token must be left to generate)")
        if req.max_tokens is not None and n + req.max_tokens > self.max_context:
            raise InvalidRequestError(f"prompt has {n} tokens and max_tokens is {req.max_tokens}: "
                                      f"{n + req.max_tokens} is over the model's context of {self.max_context}")
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
            if self._stopped:
                raise EngineError("engine stopped")
            if self._thread is None:
                raise EngineError("engine not started")
            if not self._active:
                raise EngineInactiveError(f"model {self.name!r} is deactivated")
            if not self._scheduler.fits_alone(seq.num_prompt):
                raise CapacityError(
                    f"prompt has {seq.num_prompt} tokens: with one more that needs "
                    f"{(seq.num_prompt + 1) * self.kv_bytes_per_token} bytes of KV cache, over the engine's "
                    f"memory limit of {self._scheduler.memory_limit_bytes} bytes")
            self._scheduler.add(seq)
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
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
                return True
            except RuntimeError:  # the consumer's event loop is closed
                return False

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
        """Under _lock: the sequence leaves the engine and frees its KV."""
        seq.finished = True
        self._scheduler.remove(seq)
        seq.cache = None

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        if not seq.finished:
            self._remove(seq)
            seq.deliver(error)
            log.info("failed: %s", error, extra=_rlog(seq))

    def _fail_all(self, make_error) -> None:
        for seq in [*self._scheduler.running, *self._scheduler.waiting]:
            self._fail(seq, make_error())

    def _run(self) -> None:
        log.info("engine %s: step loop started", self.name)
        while True:
            with self._lock:
                while not self._stopped and not self._scheduler.has_work():
                    self._lock.wait()
                if self._stopped:
                    break
            try:
                self._step()
            except Exception as exc:  # never leave consumers waiting on a dead step
                log.exception("engine %s: step failed", self.name)
                with self._lock:
                    self._fail_all(lambda: EngineError(f"step failed: {type(exc).__name__}: {exc}"))
        log.info("engine %s: step loop ended", self.name)

    def _step(self) -> None:
        with self._lock:
            result = self._scheduler.schedule()
            for seq in result.preempted:
                log.info("preempted at %d tokens (KV limit)", len(seq.token_ids), extra=_rlog(seq))
            for seq in result.too_big:
                self._too_big(seq)
            plan = []
            for seq in result.batch:
                if seq.cache is None:
                    seq.cache = SequenceKVCache(self.config.num_hidden_layers, self.config.num_key_value_heads,
                                                self.config.head_dim, self.max_context, self.dtype, self._device)
                plan.append((seq, seq.cache, seq.num_cached, seq.token_ids[seq.num_cached:]))
        if not plan:
            return
        try:
            tokens = self._forward(plan)
        except Exception as exc:  # e.g. out of device memory: these requests fail, the engine goes on
            log.exception("engine %s: forward of %d sequences failed", self.name, len(plan))
            with self._lock:
                for seq, *_ in plan:
                    self._fail(seq, EngineError(f"forward failed: {type(exc).__name__}: {exc}"))
            return
        if tokens is None:
            return  # stopped meanwhile; stop() has failed the requests
        with self._lock:
            for (seq, cache, start, new), token in zip(plan, tokens):
                if seq.finished or seq.cache is not cache:
                    continue  # aborted or failed while the step ran
                seq.num_cached = start + len(new)
                self._append_token(seq, token)

    def _forward(self, plan: list[tuple[Sequence, SequenceKVCache, int, list[int]]]) -> list[int] | None:
        """One model step over the planned sequences' new tokens; one sampled token each."""
        with self._model_lock, torch.inference_mode():
            if self._model is None:
                return None
            input_ids, positions, spans = [], [], []
            for _, cache, start, new in plan:
                cache.ensure_capacity(start + len(new))
                spans.append(KVSpan(cache, start, len(new)))
                input_ids.extend(new)
                positions.extend(range(start, start + len(new)))
            logits = self._model(torch.tensor(input_ids, device=self._device),
                                 torch.tensor(positions, device=self._device), spans)
            return sample_batch(logits, [seq.sampling for seq, *_ in plan], [seq.generator for seq, *_ in plan])

    def _too_big(self, seq: Sequence) -> None:
        """The limit shrank below what this sequence needs even alone."""
        if seq.num_output == 0:
            self._fail(seq, CapacityError(f"request needs {(len(seq.token_ids) + 1) * self.kv_bytes_per_token} bytes "
                                          f"of KV cache, over the engine's memory limit of {self._scheduler.memory_limit_bytes}"))
        else:
            log.warning("KV limit reached: ending at %d tokens", len(seq.token_ids), extra=_rlog(seq))
            self._emit(seq, "length")

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
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
        release = len(seq.text) if finish is not None else max(seq.sent_chars, len(seq.text) - held_back_len(seq.text, seq.stop))
        out = GenerationOutput(
            text=seq.text[seq.sent_chars:release],
            token_ids=seq.unsent_ids,
            finish_reason=finish,
            prompt_tokens=seq.num_prompt,
            completion_tokens=seq.num_output,
        )
        seq.sent_chars = release
        seq.unsent_ids = []
        if finish is not None:  # freed and logged before the consumer can see the end
            self._remove(seq)
            log.info("finished (%s): %d prompt + %d completion tokens", finish, seq.num_prompt, seq.num_output, extra=_rlog(seq))
        if not seq.deliver(out) and finish is None:
            self._remove(seq)
            log.info("consumer gone; aborted after %d tokens", seq.num_output, extra=_rlog(seq))
