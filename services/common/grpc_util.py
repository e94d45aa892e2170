"""What every Prism gRPC server has: standard health checking and server
reflection (so `grpcurl` works against any service)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

# Server option: a port another process listens on already is an error at bind, not a port shared with it
# (gRPC sets SO_REUSEPORT by default, and the kernel then splits the connections between the two servers).
REUSE_NO_PORT = ("grpc.so_reuseport", 0)

# Trailing metadata of a refused (RESOURCE_EXHAUSTED) call: whole seconds before a retry may succeed.
# The agent sets it on a shed request; the gateway passes it on (REST: the Retry-After header).
RETRY_AFTER_KEY = "retry-after"
# Trailing metadata of a request an agent sends back unstarted (UNAVAILABLE) because the engine it
# waited for is draining: the gateway sends it to the model's replicas as they are now.
DRAINING_KEY = "prism-draining"


def add_health_and_reflection(server: grpc.aio.Server, service_full_names: list[str]) -> health.aio.HealthServicer:
    """Registers health (every service SERVING) and reflection; returns the
    health servicer so the caller can flip to NOT_SERVING when draining."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_full_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return health_servicer


async def mark_serving(health_servicer: health.aio.HealthServicer, service_full_names: list[str]) -> None:
    for name in ["", *service_full_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def mark_not_serving(health_servicer: health.aio.HealthServicer, service_full_names: list[str]) -> None:
    for name in ["", *service_full_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
