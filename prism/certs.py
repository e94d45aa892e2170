"""`prism certs`: the certificates and API key a secure cluster needs (deploy/docker-compose.yml mounts the
folder; deploy/kubernetes/ mounts the Kubernetes Secrets that hold them, by name).

One CA signs:
- `service`: the scheduler's, gateways' and agents' certificate for mTLS among them and as etcd's clients.
  It names SERVICE_NAME, which the services check for instead of the host they dial (--tls-server-name):
  agents and schedulers are reached by pod IP, which no certificate can name. It also names the
  Services' DNS names, the compose services' and loopback (health probes dial 127.0.0.1);
- `etcd`: etcd's certificate, as a server and to its peers (the StatefulSet's per-pod names, compose's);
- `https`: the gateway's REST endpoint, for the hosts clients reach it by (--host).
An API key is made too, kept only as its sha256 in the gateway's key file; it is printed once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from services.common.tls import LOOPBACK_HOSTS, TlsFiles, issue_cert, load_or_create_ca

# The name every Prism service's certificate carries and every caller checks for (--tls-server-name).
SERVICE_NAME = "prism-internal"
# The Kubernetes objects' names (deploy/kubernetes/base).
ETCD_SERVICE = "prism-etcd"
SERVICE_DNS = ("prism-scheduler", "prism-gateway", "prism-agent")
# The compose services' names (deploy/docker-compose.yml), by which they dial each other there.
COMPOSE_SERVICES = ("scheduler", "gateway", "agent")
COMPOSE_ETCD = "etcd"
SECRET_TLS, SECRET_ETCD_TLS, SECRET_HTTPS, SECRET_API_KEYS = (
    "prism-tls",
    "prism-etcd-tls",
    "prism-gateway-https",
    "prism-api-keys",
)


@dataclass(frozen=True)
class ClusterCerts:
    service: TlsFiles
    etcd: TlsFiles
    https: TlsFiles
    api_key: str
    api_keys_file: Path


def in_namespace(name: str, namespace: str) -> list[str]:
    """A Service's DNS names as pods of the namespace and of others resolve it."""
    return [name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]


def make_cluster_certs(
    directory: Path, namespace: str = "prism", https_hosts: tuple[str, ...] = (), key_name: str = "admin"
) -> ClusterCerts:
    """Writes the CA (kept if directory has one), the service, etcd and https certificates and an API key
    file (its sha256 only) to directory."""
    ca = load_or_create_ca(directory)
    service_hosts = [
        SERVICE_NAME,
        *(h for name in SERVICE_DNS for h in in_namespace(name, namespace)),
        *COMPOSE_SERVICES,
        *LOOPBACK_HOSTS,
    ]
    etcd_hosts = [
        *in_namespace(ETCD_SERVICE, namespace),
        f"*.{ETCD_SERVICE}",
        f"*.{ETCD_SERVICE}.{namespace}",
        f"*.{ETCD_SERVICE}.{namespace}.svc",
        f"*.{ETCD_SERVICE}.{namespace}.svc.cluster.local",
        COMPOSE_ETCD,
        *LOOPBACK_HOSTS,
    ]
    https = [*https_hosts, *in_namespace("prism-gateway", namespace), "gateway", *LOOPBACK_HOSTS]
    key = "sk-prism-" + secrets.token_urlsafe(24)
    keys_file = directory / "api-keys.json"
    keys_file.write_text(
        json.dumps([{"name": key_name, "key_sha256": hashlib.sha256(key.encode()).hexdigest()}], indent=1) + "\n"
    )
    return ClusterCerts(
        service=issue_cert(ca, directory, "service", service_hosts),
        etcd=issue_cert(ca, directory, "etcd", etcd_hosts),
        https=issue_cert(ca, directory, "https", https),
        api_key=key,
        api_keys_file=keys_file,
    )


def kubernetes_secrets(certs: ClusterCerts, namespace: str) -> str:
    """The Secrets deploy/kubernetes/base mounts, as one YAML stream (JSON documents, which YAML reads)."""

    def secret(name: str, files: dict[str, Path], kind: str = "Opaque") -> str:
        data = {key: base64.b64encode(path.read_bytes()).decode() for key, path in files.items()}
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": kind,
                "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "prism"}},
                "data": data,
            },
            indent=1,
        )

    def tls(files: TlsFiles) -> dict[str, Path]:
        assert files.ca is not None and files.cert is not None and files.key is not None
        return {"ca.crt": files.ca, "tls.crt": files.cert, "tls.key": files.key}

    return (
        "\n---\n".join(
            [
                secret(SECRET_TLS, tls(certs.service), "kubernetes.io/tls"),
                secret(SECRET_ETCD_TLS, tls(certs.etcd), "kubernetes.io/tls"),
                secret(SECRET_HTTPS, tls(certs.https), "kubernetes.io/tls"),
                secret(SECRET_API_KEYS, {"api-keys.json": certs.api_keys_file}),
            ]
        )
        + "\n"
    )
