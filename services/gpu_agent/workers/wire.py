"""Conversions between the engine's Python types and the prism.v1 messages
that carry them between the agent and its worker processes, and the gRPC
status code each engine error travels as."""

from __future__ import annotations

import grpc

from prism_client.v1 import engine_worker_pb2 as wpb
from prism_client.v1 import generate_pb2
from services.common.step_costs import StepTimeSums
from services.gpu_agent.engine.errors import (
    CapacityError,
    EngineError,
    EngineInactiveError,
    InvalidRequestError,
)
from services.gpu_agent.engine.host_weights import ActivationTiming
from services.gpu_agent.engine.kv_pool import MemoryLimitState
from services.gpu_agent.engine.request import (
    EngineStats,
    GenerationOutput,
    GenerationRequest,
)

FINISH_TO_PROTO = {
    None: generate_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
}
FINISH_FROM_PROTO = {code: reason for reason, code in FINISH_TO_PROTO.items()}

# Most specific first: the first isinstance match wins.
ERROR_TO_CODE: list[tuple[type[EngineError], grpc.StatusCode]] = [
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineInactiveError, grpc.StatusCode.FAILED_PRECONDITION),
    (EngineError, grpc.StatusCode.INTERNAL),
]
CODE_TO_ERROR: dict[grpc.StatusCode, type[EngineError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityError,
    grpc.StatusCode.FAILED_PRECONDITION: EngineInactiveError,
}


def status_code_of(error: EngineError) -> grpc.StatusCode:
    return next(code for kind, code in ERROR_TO_CODE if isinstance(error, kind))


# ---- generate ---------------------------------------------------------------------------


def to_generation_request(request: generate_pb2.GenerateRequest) -> GenerationRequest:
    sampling = request.sampling
    req = GenerationRequest(
        request_id=request.request_id,
        stop=list(sampling.stop),
        ignore_eos=sampling.ignore_eos,
        max_tokens=sampling.max_tokens if sampling.HasField("max_tokens") else None,
        seed=sampling.seed if sampling.HasField("seed") else None,
    )
    if sampling.HasField("temperature"):
        req.temperature = sampling.temperature
    if sampling.HasField("top_p"):
        req.top_p = sampling.top_p
    which = request.WhichOneof("input")
    if which == "prompt":
        req.prompt = request.prompt
    elif which == "chat":
        req.messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        if request.chat.HasField("add_generation_prompt"):
            req.add_generation_prompt = request.chat.add_generation_prompt
    return req


def generation_request_to_proto(req: GenerationRequest, model: str = "") -> generate_pb2.GenerateRequest:
    """The inverse of to_generation_request. A request with both a prompt and
    messages cannot be expressed (the input is a oneof): InvalidRequestError,
    as the engine would raise."""
    if req.prompt is not None and req.messages is not None:
        raise InvalidRequestError("give either a prompt or messages, not both")
    sampling = generate_pb2.SamplingParams(
        stop=list(req.stop or []), ignore_eos=req.ignore_eos, temperature=req.temperature, top_p=req.top_p
    )
    if req.max_tokens is not None:
        sampling.max_tokens = req.max_tokens
    if req.seed is not None:
        sampling.seed = req.seed
    message = generate_pb2.GenerateRequest(request_id=req.request_id, model=model, sampling=sampling)
    if req.prompt is not None:
        message.prompt = req.prompt
    elif req.messages is not None:
        message.chat.SetInParent()  # an empty list still selects chat, so the engine reports it empty
        message.chat.add_generation_prompt = req.add_generation_prompt
        for m in req.messages:
            message.chat.messages.add(role=str(m.get("role", "")), content=str(m.get("content", "")))
    return message


def output_to_proto(
    out: GenerationOutput, request_id: str, usage_at_end_only: bool = False
) -> generate_pb2.GenerateResponse:
    """usage_at_end_only: the agent's public stream reports usage once, with
    the final chunk; between agent and worker every chunk carries it."""
    response = generate_pb2.GenerateResponse(
        request_id=request_id, text=out.text, token_ids=out.token_ids, finish_reason=FINISH_TO_PROTO[out.finish_reason]
    )
    if usage_at_end_only and out.finish_reason is None:
        return response
    response.usage.prompt_tokens = out.prompt_tokens
    response.usage.completion_tokens = out.completion_tokens
    response.usage.cached_prompt_tokens = out.cached_tokens
    return response


def output_from_proto(response: generate_pb2.GenerateResponse) -> GenerationOutput:
    return GenerationOutput(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=FINISH_FROM_PROTO[response.finish_reason],
        prompt_tokens=response.usage.prompt_tokens,
        completion_tokens=response.usage.completion_tokens,
        cached_tokens=response.usage.cached_prompt_tokens,
    )


# ---- engine state -----------------------------------------------------------------------


def stats_to_proto(stats: EngineStats, active: bool) -> wpb.EngineStatsReply:
    return wpb.EngineStatsReply(
        running_requests=stats.running_requests,
        queued_requests=stats.queued_requests,
        kv_used_bytes=stats.kv_used_bytes,
        memory_limit_bytes=stats.memory_limit_bytes,
        weight_bytes=stats.weight_bytes,
        kv_mapped_bytes=stats.kv_mapped_bytes,
        kv_free_tokens=stats.kv_free_tokens,
        memory_limit_revision=stats.memory_limit_revision,
        memory_limit_status=stats.memory_limit_status,
        kv_demand_tokens=stats.kv_demand_tokens,
        active=active,
        device_used_bytes=stats.device_used_bytes,
        kv_held_bytes=stats.kv_held_bytes,
        step_count=stats.step_times.steps,
        step_xtx=stats.step_times.xtx,
        step_xty=stats.step_times.xty,
        kv_cached_bytes=stats.kv_cached_bytes,
        prefix_cache_queried_tokens=stats.prefix_cache_queried_tokens,
        prefix_cache_hit_tokens=stats.prefix_cache_hit_tokens,
    )


def stats_from_proto(reply: wpb.EngineStatsReply) -> EngineStats:
    return EngineStats(
        running_requests=reply.running_requests,
        queued_requests=reply.queued_requests,
        kv_used_bytes=reply.kv_used_bytes,
        memory_limit_bytes=reply.memory_limit_bytes,
        weight_bytes=reply.weight_bytes,
        kv_mapped_bytes=reply.kv_mapped_bytes,
        kv_free_tokens=reply.kv_free_tokens,
        memory_limit_revision=reply.memory_limit_revision,
        memory_limit_status=reply.memory_limit_status,
        kv_demand_tokens=reply.kv_demand_tokens,
        device_used_bytes=reply.device_used_bytes,
        kv_held_bytes=reply.kv_held_bytes,
        step_times=StepTimeSums.from_values(reply.step_count, reply.step_xtx, reply.step_xty)
        if reply.step_xty
        else StepTimeSums(),
        kv_cached_bytes=reply.kv_cached_bytes,
        prefix_cache_queried_tokens=reply.prefix_cache_queried_tokens,
        prefix_cache_hit_tokens=reply.prefix_cache_hit_tokens,
    )


def limit_to_proto(state: MemoryLimitState) -> wpb.MemoryLimitReply:
    return wpb.MemoryLimitReply(
        status=state.status,
        limit_bytes=state.limit_bytes,
        effective_limit_bytes=state.effective_limit_bytes,
        mapped_bytes=state.mapped_bytes,
        revision=state.revision,
    )


def limit_from_proto(reply: wpb.MemoryLimitReply) -> MemoryLimitState:
    return MemoryLimitState(
        reply.status, reply.limit_bytes, reply.effective_limit_bytes, reply.mapped_bytes, reply.revision
    )


def timing_to_proto(timing: ActivationTiming | None) -> wpb.ActivateReply:
    if timing is None:
        return wpb.ActivateReply(activated=False)
    return wpb.ActivateReply(
        activated=True, nbytes=timing.nbytes, allocate_s=timing.allocate_s, copy_s=timing.copy_s, ready_s=timing.ready_s
    )


def timing_from_proto(reply: wpb.ActivateReply) -> ActivationTiming | None:
    if not reply.activated:
        return None
    return ActivationTiming(reply.nbytes, reply.allocate_s, reply.copy_s, reply.ready_s)
