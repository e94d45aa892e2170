"""A liveness/readiness probe for a Prism gRPC server, over the TLS or mTLS it serves.

    python -m services.common.health_probe HOST:PORT [--tls-ca PEM --tls-cert PEM --tls-key PEM
        [--tls-server-name NAME]] [--timeout-s 3]

Exits 0 when the server's standard health service answers SERVING, 1 otherwise, with one line saying why.
Kubernetes' own gRPC probe speaks plaintext only, so a service that serves mTLS (the default in
deploy/kubernetes/) is probed by this command instead (an exec probe), with the service's own certificate.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import TlsConfigError, client_tls, sync_channel


def probe(target: str, tls=None, timeout_s: float = 3.0) -> tuple[bool, str]:
    """(serving, why) for the server at target: its overall health status, or the call's error."""
    with sync_channel(target, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{target}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The probe's flags; args.tls is its TLS files (None: plaintext). A bad combination or an unreadable
    file exits with a usage error."""
    p = argparse.ArgumentParser(description="Checks a Prism gRPC server's health service (exit 0: SERVING)")
    p.add_argument("target", help="HOST:PORT")
    p.add_argument(
        "--tls-ca", default=None, metavar="PEM", help="CA certificate that verifies the server (turns TLS on)"
    )
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate, for a server that requires one")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    p.add_argument(
        "--tls-server-name",
        default=None,
        metavar="NAME",
        help="the name the server's certificate must have (default: the host of TARGET)",
    )
    p.add_argument("--timeout-s", type=float, default=3.0)
    args = p.parse_args(argv)
    try:
        args.tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key)
    except TlsConfigError as exc:
        p.error(str(exc))
    if args.tls_server_name:
        if args.tls is None:
            p.error("--tls-server-name needs --tls-ca")
        args.tls = replace(args.tls, server_name=args.tls_server_name)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    serving, why = probe(args.target, args.tls, args.timeout_s)
    print(why)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
