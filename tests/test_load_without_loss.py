"""Load without loss (issue 8, item 5): the regressions the load found.
The load test itself comes with the next commit."""

from __future__ import annotations

from prism.v1 import generate_pb2
from services.gateway.access import AccessControl
from services.gateway.auth import KeyStore
from services.gateway.grpc_gateway import GatewayService
from services.gateway.limits import Limits
from services.gateway.metrics import GatewayMetrics


# ---- regressions the load found ---------------------------------------------------------------


class _Context:
    """The few ServicerContext calls GatewayService.Generate makes."""

    def invocation_metadata(self):
        return ()

    async def send_initial_metadata(self, metadata) -> None:
        pass

    def set_trailing_metadata(self, metadata) -> None:
        pass

    async def abort(self, code, details, trailing_metadata=()) -> None:
        raise AssertionError(f"aborted: {code} {details}")


class _Stream:
    """An agent stream of endless pieces; records its cancel()."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self):
        while True:
            yield generate_pb2.GenerateResponse(text="t ", token_ids=[7])


class _Relay:
    def __init__(self):
        self.stream = _Stream()

    async def open(self, request):
        return self.stream


class _Router:
    def has_model(self, model: str) -> bool:
        return True


def _gauge(metrics: GatewayMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_grpc_call_closed_while_it_waits_at_a_yield_ends_its_request():
    """grpc.aio closes a servicer's generator (GeneratorExit at its yield, not CancelledError) when the
    client cancels while the server sends; the request must still end: the agent call cancelled, the
    in-flight gauge back to zero, the request counted as 499. Under load a few calls in a hundred were
    left in flight for ever."""
    metrics = GatewayMetrics()
    relay = _Relay()
    service = GatewayService(_Router(), relay, metrics, AccessControl(KeyStore(), Limits(), metrics))
    request = generate_pb2.GenerateRequest(model="m", prompt="hello",
                                           sampling=generate_pb2.SamplingParams(max_tokens=100))
    responses = service.Generate(request, _Context())
    await responses.__anext__()
    assert _gauge(metrics, "prism_gateway_requests_in_flight", api="grpc", model="m") == 1
    await responses.aclose()
    assert relay.stream.cancelled
    assert _gauge(metrics, "prism_gateway_requests_in_flight", api="grpc", model="m") == 0
    assert _gauge(metrics, "prism_gateway_requests_total", api="grpc", model="m", code="499") == 1
