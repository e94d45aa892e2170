"""The `prism` command line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import typer

app = typer.Typer(help="Prism: many LLMs sharing few GPUs.", no_args_is_help=True, add_completion=False)

# Shared options: TLS of the calls to the services, TLS and user of etcd (the password: $PRISM_ETCD_PASSWORD).
TLS_CA = typer.Option(None, "--tls-ca", help="CA certificate that verifies the services (turns TLS on)")
TLS_CERT = typer.Option(None, "--tls-cert", help="client certificate, for services that require one (mTLS)")
TLS_KEY = typer.Option(None, "--tls-key", help="the private key of --tls-cert")
API_KEY = typer.Option(
    None,
    "--api-key",
    envvar="PRISM_API_KEY",
    show_envvar=True,
    help="API key for a gateway with keys (better from the environment: a flag shows in ps)",
)
ETCD_CA = typer.Option(None, "--etcd-ca", help="CA certificate that verifies etcd (turns TLS on)")
ETCD_CERT = typer.Option(None, "--etcd-cert", help="client certificate for an etcd that requires one")
ETCD_KEY = typer.Option(None, "--etcd-key", help="the private key of --etcd-cert")
ETCD_USER = typer.Option(None, "--etcd-user", help="etcd user; its password from $PRISM_ETCD_PASSWORD")


def _client_tls(ca: Path | None, cert: Path | None, key: Path | None):
    """TlsFiles from --tls-* (None: plaintext); a bad combination or an unreadable file exits with its reason."""
    from services.common.tls import TlsConfigError, client_tls

    try:
        return client_tls(ca, cert, key)
    except TlsConfigError as exc:
        typer.echo(f"prism: {exc}", err=True)
        raise typer.Exit(2)


def _etcd_access(ca: Path | None, cert: Path | None, key: Path | None, user: str | None):
    from services.common.etcd import etcd_access
    from services.common.tls import TlsConfigError

    try:
        return etcd_access(ca, cert, key, user)
    except TlsConfigError as exc:
        typer.echo(f"prism: {exc}", err=True)
        raise typer.Exit(2)


@app.command()
def up(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="placement config (.json/.yaml); default: two tiny generated models"
    ),
    http_port: int = typer.Option(8000, help="OpenAI-compatible REST port"),
    grpc_port: int = typer.Option(50050, help="gRPC gateway port"),
    etcd: str | None = typer.Option(None, help="external etcd host:port; default: start one in the state dir"),
    state_dir: Path = typer.Option(Path(".prism"), help="etcd data, logs and generated models"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    cpu_memory_gb: float = typer.Option(4.0, help="memory budget of the CPU device"),
    host: str = typer.Option("127.0.0.1", help="address every service binds to"),
    engine_isolation: str = typer.Option(
        "auto",
        help="auto | process | inline: engines in warm worker processes "
        "or in the agent (auto: process on CUDA, inline on the CPU)",
    ),
    scheduler_replicas: int = typer.Option(
        1,
        min=1,
        help="scheduler processes; they elect a leader through etcd and a standby takes over when the leader dies",
    ),
    agents: int = typer.Option(
        1,
        min=1,
        help="agent processes, each with its own device (on a CPU: its own "
        "--cpu-memory-gb); the scheduler places models over all of them",
    ),
    model_root: list[Path] = typer.Option(
        [],
        "--model-root",
        help="the agents load models only from under "
        "this folder (repeatable; the state dir's generated models and "
        "SmolLM2's package are added); none: from any path",
    ),
    tls: bool = typer.Option(
        False,
        "--tls",
        help="make a local CA and certificates in STATE_DIR/tls; TLS "
        "everywhere, mTLS between services and etcd; clients need the CA it prints",
    ),
    etcd_ca: Path | None = typer.Option(None, "--etcd-ca", help="with --etcd: CA certificate that verifies it"),
    etcd_cert: Path | None = typer.Option(None, "--etcd-cert", help="with --etcd: client certificate"),
    etcd_key: Path | None = typer.Option(None, "--etcd-key", help="with --etcd: the key of --etcd-cert"),
    etcd_user: str | None = typer.Option(
        None, "--etcd-user", help="with --etcd: etcd user (password from $PRISM_ETCD_PASSWORD)"
    ),
    api_keys_file: Path | None = typer.Option(
        None,
        "--api-keys-file",
        help="the gateway's API keys (YAML/JSON, "
        "docs/security.md); $PRISM_API_KEY must hold one that may use "
        "every model, for the readiness check",
    ),
) -> None:
    """Run etcd, the scheduler, the agent(s) and the gateway in the foreground; Ctrl-C stops them all."""
    from prism.cluster import ClusterStartError, LocalCluster
    from services.common.etcd import EtcdAccess
    from services.common.placement_config import ConfigError
    from services.common.tls import TlsConfigError

    access = _etcd_access(etcd_ca, etcd_cert, etcd_key, etcd_user)
    if etcd is None and access != EtcdAccess():
        typer.echo(
            "prism up: --etcd-ca, --etcd-cert, --etcd-key and --etcd-user are for an external etcd (--etcd); "
            "the etcd prism up starts is secured by --tls",
            err=True,
        )
        raise typer.Exit(2)
    gateway_args: tuple[str, ...] = ()
    if api_keys_file is not None:
        if not api_keys_file.is_file():
            typer.echo(f"prism up: --api-keys-file {api_keys_file}: no such file", err=True)
            raise typer.Exit(2)
        if not os.environ.get("PRISM_API_KEY"):
            typer.echo(
                "prism up: with --api-keys-file, set PRISM_API_KEY to one of its keys that may use every "
                "model (prism up checks with it that the models are served)",
                err=True,
            )
            raise typer.Exit(2)
        gateway_args = ("--api-keys-file", str(api_keys_file.resolve()))
    if model_root:
        from prism.packaged_models import smollm2_path

        packaged = smollm2_path()
        roots = [*model_root, state_dir / "models", *([packaged.parent] if packaged is not None else [])]
        agent_args: tuple[str, ...] = tuple(a for root in roots for a in ("--model-root", str(root.resolve())))
    else:
        agent_args = ()
    cluster = LocalCluster(
        state_dir=state_dir,
        config_path=config,
        http_port=http_port,
        grpc_port=grpc_port,
        etcd_endpoint=etcd,
        device=device,
        cpu_memory_gb=cpu_memory_gb,
        host=host,
        engine_isolation=engine_isolation,
        scheduler_replicas=scheduler_replicas,
        agents=agents,
        tls=tls,
        etcd_access=access,
        gateway_args=gateway_args,
        agent_args=agent_args,
    )
    typer.echo(f"starting Prism (state and logs in {cluster.state_dir}) ...")
    try:
        cluster.start(progress=typer.echo)
    except (ClusterStartError, ConfigError, TimeoutError, RuntimeError, TlsConfigError) as exc:
        typer.echo(f"prism up failed: {exc}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    typer.echo(
        "Prism is up:\n"
        f"  OpenAI REST   {cluster.http_url}/v1   (models: {', '.join(cluster.model_names())})\n"
        f"  gRPC gateway  {cluster.gateway_grpc}\n"
        f"  scheduler     {', '.join(cluster.scheduler_addresses.values())}\n"
        f"  agent{'s' if agents > 1 else ' '}        {', '.join(cluster.agent_addresses.values())}\n"
        f"  etcd          {cluster.etcd_endpoint}\n"
        f"  logs          {cluster.log_dir}\n" + (_tls_banner(cluster) if tls else "") + "Ctrl-C stops everything."
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        supervise(cluster, stop)
    except KeyboardInterrupt:
        pass
    typer.echo("stopping ...")
    cluster.stop()
    typer.echo("stopped.")


def supervise(cluster, stop: threading.Event, interval_s: float = 0.5) -> None:
    """Until `stop`: a child of the cluster that dies is said and started again after a backoff
    (prism/supervisor.py); one that keeps dying at start is given up, the rest serving what they can."""
    from prism.supervisor import Supervisor

    supervisor = Supervisor()
    for name in cluster.children():
        supervisor.started(name, time.monotonic())
    while not stop.wait(interval_s):
        for name, code in cluster.children().items():
            now = time.monotonic()
            if code is not None and supervisor.died(name, now):
                child = supervisor.children[name]
                if child.given_up:
                    typer.echo(
                        f"{name} exited with code {code} again, {child.quick_deaths} times in a row soon after "
                        f"its start: not restarting it; its log ends:\n{cluster.log_tail(name, 10)}",
                        err=True,
                    )
                    continue
                restart_at = supervisor.restart_at(name)
                assert restart_at is not None  # a new death, not given up: its restart is set
                wait = restart_at - now
                typer.echo(
                    f"{name} exited with code {code}; restarting it in {wait:.0f}s; its log ends:\n"
                    f"{cluster.log_tail(name, 10)}",
                    err=True,
                )
            due = supervisor.restart_at(name)
            if due is not None and now >= due:
                try:
                    cluster.restart(name)
                except Exception as exc:  # noqa: BLE001  said, then counted as another death
                    typer.echo(f"restarting {name} failed: {exc}", err=True)
                supervisor.restarted(name, time.monotonic())
                typer.echo(f"{name} restarted (restart {supervisor.children[name].restarts})", err=True)


def _tls_banner(cluster) -> str:
    """What a client of a --tls cluster needs: the CA, and for the tools that read agents and etcd, a certificate."""
    ca, client = cluster.ca_path, cluster.client_tls()
    reader_flags = (
        f"--etcd {cluster.etcd_endpoint} --etcd-ca {ca} --etcd-cert {client.cert} --etcd-key {client.key} "
        f"--tls-ca {ca} --tls-cert {client.cert} --tls-key {client.key}"
    )
    return (
        f"  TLS CA        {ca}   (REST and gRPC clients verify the gateway with it)\n"
        f"  e.g.          curl --cacert {ca} {cluster.http_url}/v1/models\n"
        f"                prism generate --gateway {cluster.gateway_grpc} --tls-ca {ca} MODEL PROMPT\n"
        f"                prism status {reader_flags}\n"
    )


@app.command()
def doctor(
    device: str = typer.Option("auto", help="auto | cpu | cuda: the device the agent will serve on"),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="the placement config to check; default: what prism up serves without one"
    ),
    etcd: str | None = typer.Option(None, help="an external etcd host:port to reach; default: the embedded one"),
    host: str = typer.Option("127.0.0.1", help="the address prism up binds"),
    http_port: int = typer.Option(8000, help="REST port prism up binds"),
    grpc_port: int = typer.Option(50050, help="gRPC port prism up binds"),
    quick: bool = typer.Option(False, "--quick", help="skip mapping a kvcached page and timing a pinned copy"),
) -> None:
    """Check this host before a run: one line per check, what to fix; exit 1 when something blocks serving."""
    from prism import doctor as checks

    if device not in ("auto", "cpu", "cuda"):
        typer.echo(f"prism doctor: --device must be auto, cpu or cuda, not {device!r}", err=True)
        raise typer.Exit(2)
    found = checks.run(
        device=device, config=config, etcd=etcd, host=host, http_port=http_port, grpc_port=grpc_port, measure=not quick
    )
    for check in found:
        typer.echo(check.line())
    typer.echo(checks.summary(found))
    if any(c.status == checks.FAIL for c in found):
        raise typer.Exit(1)


@app.command()
def certs(
    out_dir: Path = typer.Argument(
        ..., help="folder for the CA (kept if it has one), the certificates and the key file"
    ),
    namespace: str = typer.Option("prism", help="the Kubernetes namespace the cluster runs in"),
    host: list[str] = typer.Option(
        [], "--host", help="a name or address clients reach the gateway's HTTPS by (repeatable)"
    ),
    kubernetes: Path | None = typer.Option(
        None,
        "--kubernetes",
        help="also write the Secrets that deploy/kubernetes mounts to this file (kubectl apply -f FILE)",
    ),
) -> None:
    """Make the certificates and API key of a secure cluster (mTLS among the services, etcd with client
    certificates, HTTPS and an API key at the gateway); prints the API key once."""
    from prism.certs import kubernetes_secrets, make_cluster_certs

    made = make_cluster_certs(out_dir, namespace, tuple(host))
    typer.echo(f"wrote the CA, service, etcd and https certificates and {made.api_keys_file.name} to {out_dir}")
    if kubernetes is not None:
        kubernetes.write_text(kubernetes_secrets(made, namespace))
        kubernetes.chmod(0o600)
        typer.echo(f"wrote the Secrets for namespace {namespace!r} to {kubernetes}")
    typer.echo(f"API key (shown once; only its sha256 is kept): {made.api_key}")


@app.command("make-model")
def make_model(
    out_dir: Path = typer.Argument(..., help="folder to write config.json, model.safetensors and tokenizer files to"),
    arch: str = typer.Option("llama", help="llama | qwen2"),
    seed: int = typer.Option(0, help="seed of the random weights"),
) -> None:
    """Write a tiny random-weight model in Hugging Face format (no download)."""
    from prism.tiny_models import write_tiny_model

    path = write_tiny_model(out_dir, arch=arch, seed=seed)
    typer.echo(f"wrote a tiny {arch} model to {path}")


def _read_cluster(etcd: str, etcd_access, tls):
    """One snapshot of etcd's records and every agent's status; exits on an unreachable etcd."""
    from prism.cluster_view import ClusterReader

    async def read():
        reader = ClusterReader(etcd, etcd_access=etcd_access, tls=tls)
        try:
            return await reader.read()
        finally:
            await reader.close()

    from services.common.etcd import EtcdLoginRefused

    try:
        return asyncio.run(read())
    except (ConnectionError, EtcdLoginRefused) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1)


@app.command()
def status(
    etcd: str = typer.Option("127.0.0.1:2379", help="etcd host:port"),
    as_json: bool = typer.Option(False, "--json", help="print the raw records and agent statuses"),
    tls_ca: Path | None = TLS_CA,
    tls_cert: Path | None = TLS_CERT,
    tls_key: Path | None = TLS_KEY,
    etcd_ca: Path | None = ETCD_CA,
    etcd_cert: Path | None = ETCD_CERT,
    etcd_key: Path | None = ETCD_KEY,
    etcd_user: str | None = ETCD_USER,
) -> None:
    """Show agents, engines and placements as recorded in etcd, with each agent's memory split and model numbers."""
    from prism.cluster_view import compute_cost_lines, gpu_lines, model_lines, plans_line

    snapshot = _read_cluster(
        etcd, _etcd_access(etcd_ca, etcd_cert, etcd_key, etcd_user), _client_tls(tls_ca, tls_cert, tls_key)
    )
    if as_json:
        typer.echo(json.dumps(snapshot.to_json(), indent=2))
        return
    leader = snapshot.scheduler_leader
    typer.echo(
        f"scheduler: {leader['scheduler_id']} at {leader['address']} leads; {plans_line(snapshot)}"
        if leader
        else "scheduler: no replica leads"
    )
    typer.echo("agents:")
    for a in snapshot.agents:
        devices = ", ".join(f"{d['kind']}:{d['index']} {d['memory_bytes'] >> 20} MB" for d in a.record["devices"])
        typer.echo(f"  {a.agent_id:<24} {a.record['address']:<22} {devices}")
    typer.echo("engines:")
    for e in snapshot.engines:
        typer.echo(
            f"  {e['model']:<20} on {e['agent_id']:<24} gpus {e['gpu_ids']}  {e['state']}"
            + (f"  ({e['error']})" if e["error"] else "")
        )
    typer.echo("placements:")
    for p in snapshot.placements:
        replicas = (
            ", ".join(f"{r['agent_id']}:{r['gpu_ids']}{'' if r['active'] else ' (off)'}" for r in p["replicas"])
            or "unplaced"
        )
        typer.echo(f"  {p['model']:<20} rev {p['revision']:<4} {replicas}")
    typer.echo("gpus:")
    for line in gpu_lines(snapshot):
        typer.echo("  " + line)
    typer.echo("models:")
    for line in model_lines(snapshot, indent="  "):
        typer.echo(line)
    typer.echo("step costs (what the scheduler prices compute with):")
    for line in compute_cost_lines(snapshot, indent="  "):
        typer.echo(line)


@app.command()
def top(
    etcd: str = typer.Option("127.0.0.1:2379", help="etcd host:port"),
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="seconds between frames"),
    once: bool = typer.Option(False, "--once", help="print one frame and exit"),
    tls_ca: Path | None = TLS_CA,
    tls_cert: Path | None = TLS_CERT,
    tls_key: Path | None = TLS_KEY,
    etcd_ca: Path | None = ETCD_CA,
    etcd_cert: Path | None = ETCD_CERT,
    etcd_key: Path | None = ETCD_KEY,
    etcd_user: str | None = ETCD_USER,
) -> None:
    """A live view of every GPU's memory split and every model's queue, latency and SLO attainment."""
    from prism.cluster_view import ClusterReader, top_frame

    clear = "\x1b[H\x1b[2J"  # cursor home, clear screen
    access = _etcd_access(etcd_ca, etcd_cert, etcd_key, etcd_user)
    tls = _client_tls(tls_ca, tls_cert, tls_key)

    async def frames() -> None:
        reader = ClusterReader(etcd, etcd_access=access, tls=tls)
        try:
            while True:
                try:
                    frame = top_frame(await reader.read(), etcd, None if once else interval)
                except Exception as exc:  # etcd gone or restarting: keep watching, it may come back
                    if once:
                        raise
                    frame = f"prism top: reading the cluster failed ({type(exc).__name__}: {exc}); retrying"
                    await reader.close()  # the next read connects afresh
                sys.stdout.write(frame + "\n" if once else clear + frame + "\n")
                sys.stdout.flush()
                if once:
                    return
                await asyncio.sleep(interval)
        finally:
            await reader.close()

    from services.common.etcd import EtcdLoginRefused

    try:
        asyncio.run(frames())
    except (ConnectionError, EtcdLoginRefused) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how top ends


@app.command()
def generate(
    model: str = typer.Argument(...),
    prompt: str = typer.Argument(...),
    gateway: str = typer.Option("127.0.0.1:50050", help="gRPC gateway host:port"),
    max_tokens: int = typer.Option(32),
    temperature: float = typer.Option(0.0),
    tls_ca: Path | None = typer.Option(
        None, "--tls-ca", help="CA certificate that verifies the gateway (turns TLS on; prism up --tls prints it)"
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="client certificate, for a gateway that requires one"
    ),
    tls_key: Path | None = TLS_KEY,
    api_key: str | None = API_KEY,
) -> None:
    """Stream a completion through the gRPC gateway."""
    from prism_client import PrismClient, PrismError

    tls = _client_tls(tls_ca, tls_cert, tls_key)  # a bad --tls-* option is named before any call
    paths = {} if tls is None else {"tls_ca": tls.ca, "tls_cert": tls.cert, "tls_key": tls.key}
    try:
        with PrismClient(gateway, api_key=api_key, **paths) as client:
            for chunk in client.generate_stream(model, prompt, max_tokens=max_tokens, temperature=temperature):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except PrismError as exc:
        typer.echo(f"\nerror: {exc}", err=True)
        raise typer.Exit(1)
    sys.stdout.write("\n")


@app.command()
def bench(
    trace_file: Path = typer.Argument(..., help="a trace (prism trace generate / convert)"),
    url: str = typer.Option("http://127.0.0.1:8000", help="the gateway's REST base URL"),
    grpc_gateway: str | None = typer.Option(
        None, "--grpc", help="replay through the gRPC gateway at host:port instead (a response per token)"
    ),
    ttft_ms: float = typer.Option(1000.0, help="TTFT SLO"),
    tpot_ms: float = typer.Option(100.0, help="TPOT SLO"),
    slo_scale: float = typer.Option(1.0, help="multiplies both SLO targets"),
    time_scale: float = typer.Option(1.0, help="multiply the trace's times by this (0.5: twice the rate)"),
    chars_per_token: float = typer.Option(1.0, help="synthetic prompt characters per token (1: byte tokenizers)"),
    out: Path = typer.Option(Path("bench.json"), "--out", "-o", help="results JSON"),
    plot: Path | None = typer.Option(None, help="also write a PNG (needs matplotlib)"),
    tls_ca: Path | None = typer.Option(
        None, "--tls-ca", help="CA certificate that verifies a TLS gateway (REST https:// or --grpc)"
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="client certificate, for a gateway that requires one"
    ),
    tls_key: Path | None = TLS_KEY,
    api_key: str | None = API_KEY,
) -> None:
    """Replay a trace open-loop against a running cluster; TTFT, TPOT, SLO attainment and goodput."""
    from prism.workload.replay import SloTargets, replay, report
    from prism.workload.replay import plot as plot_png
    from prism.workload.trace import Trace

    try:
        trace = Trace.load(trace_file)
    except (OSError, ValueError) as exc:
        typer.echo(f"prism bench: {exc}", err=True)
        raise typer.Exit(1)
    if time_scale != 1.0:
        trace = trace.scaled(time_scale)
    slo = SloTargets(ttft_ms / 1000, tpot_ms / 1000, slo_scale)
    tls = _client_tls(tls_ca, tls_cert, tls_key)
    results = asyncio.run(
        replay(
            trace,
            http_url=None if grpc_gateway else url,
            grpc_address=grpc_gateway,
            slo=slo,
            chars_per_token=chars_per_token,
            progress=True,
            tls=tls,
            api_key=api_key,
        )
    )
    result = report(trace, results, slo, "grpc" if grpc_gateway else "openai")
    out.write_text(json.dumps(result, indent=1) + "\n")
    o = result["overall"]
    typer.echo(f"{o['requests']} requests, {o['succeeded']} succeeded, errors {o['errors'] or 'none'}")
    typer.echo(
        f"SLO attainment {100 * o['slo_attainment']:.1f}% (TTFT {ttft_ms * slo_scale:g} ms, "
        f"TPOT {tpot_ms * slo_scale:g} ms), goodput {o['goodput_rps']:.2f} req/s"
    )
    fmt = lambda v: "-" if v is None else f"{v * 1000:.0f}"  # noqa: E731
    typer.echo(
        f"TTFT p50/p99 {fmt(o['ttft_p50_s'])}/{fmt(o['ttft_p99_s'])} ms, "
        f"TPOT p50/p99 {fmt(o['tpot_p50_s'])}/{fmt(o['tpot_p99_s'])} ms"
    )
    for model, s in result["per_model"].items():
        typer.echo(
            f"  {model}: {s['requests']} requests, attainment {100 * s['slo_attainment']:.1f}%, "
            f"TTFT p99 {fmt(s['ttft_p99_s'])} ms"
        )
    typer.echo(f"wrote {out}")
    if plot is not None:
        try:
            plot_png(result, str(plot))
            typer.echo(f"wrote {plot}")
        except ImportError:
            typer.echo("matplotlib is not installed (pip install '.[bench]'): no plot", err=True)


@app.command()
def simulate(
    trace_file: Path = typer.Argument(..., help="a trace (prism trace generate / convert)"),
    config: Path = typer.Option(
        ...,
        "--config",
        "-c",
        help="placement config; each model_path must hold a config.json (e.g. bench/configs/llama-3.1-8b)",
    ),
    gpus: int = typer.Option(8, "--gpus", min=1, help="GPUs in the simulated cluster"),
    gpus_per_agent: int = typer.Option(8, min=1),
    gpu_memory_gb: float = typer.Option(80.0, help="memory of each GPU"),
    policy: str = typer.Option("prism", help="static | dedicated | time-share | kvpr | prism | all"),
    memory_policy: str = typer.Option("balloon", help="balloon | static: how a GPU's KV memory is split"),
    profile: Path | None = typer.Option(
        None, help="latency profile JSON (default bench/results/sim-profile-h200.json)"
    ),
    ttft_ms: float = typer.Option(1000.0, help="TTFT SLO of the models whose config sets none"),
    tpot_ms: float = typer.Option(100.0, help="TPOT SLO of the models whose config sets none"),
    slo_scale: float = typer.Option(1.0, help="multiplies both SLO targets"),
    time_scale: float = typer.Option(1.0, help="multiply the trace's times by this (0.5: twice the rate)"),
    replan_interval_s: float = typer.Option(2.0, help="the scheduler's re-plan interval"),
    standby_replicas: int = typer.Option(
        0,
        min=0,
        help="prism policy: switched-off replicas of each model on other agents (the scheduler's --standby-replicas)",
    ),
    split_step_factor: float = typer.Option(
        1.0,
        help="a model split over GPUs (tp_size > 1) steps this many "
        "times slower than the profile's model of its shard's size",
    ),
    min_gpus_for: float | None = typer.Option(
        None, help="also search the fewest GPUs reaching this attainment (e.g. 0.99) per policy"
    ),
    max_gpus: int | None = typer.Option(None, help="upper bound of that search (default 4x the models)"),
    out: Path = typer.Option(Path("simulate.json"), "--out", "-o", help="results JSON"),
) -> None:
    """Simulate a cluster serving a trace with the real policies; SLO attainment per policy (and GPUs needed)."""
    from dataclasses import asdict

    from prism.progress import Progress, bar
    from prism.simulator.profile import DEFAULT_PROFILE, LatencyProfile
    from prism.simulator.runner import GB, SimSettings
    from prism.simulator.runner import min_gpus_for as search
    from prism.simulator.runner import simulate as run
    from prism.workload.replay import SloTargets
    from prism.workload.trace import Trace
    from services.common.placement_config import ConfigError, load
    from services.scheduler.policies import POLICIES

    policies = list(POLICIES) if policy == "all" else [policy]
    if any(p not in POLICIES for p in policies):
        raise typer.BadParameter(f"policy must be one of {', '.join(POLICIES)} or all, got {policy!r}")
    try:
        trace = Trace.load(trace_file)
        models = list(load(config).models)
        latency = LatencyProfile.load(profile or DEFAULT_PROFILE)
    except (OSError, ValueError, ConfigError) as exc:
        typer.echo(f"prism simulate: {exc}", err=True)
        raise typer.Exit(1)
    if time_scale != 1.0:
        trace = trace.scaled(time_scale)
    # A model's own SLO in the config (its "slo") is what it is judged by; --ttft-ms/--tpot-ms for the others.
    slo = SloTargets(ttft_ms / 1000, tpot_ms / 1000, slo_scale).with_models(models)
    results: dict = {"slo": asdict(slo), "profile": str(profile or DEFAULT_PROFILE), "policies": {}}
    typer.echo(
        f"{len(trace.requests)} requests, {len(models)} models, {gpus} GPUs of {gpu_memory_gb:g} GB, "
        f"profile {latency.device}"
    )
    shown = Progress()
    for done, name in enumerate(policies):
        shown.update(
            f"{bar(done, len(policies))} {done}/{len(policies)} policies; simulating {name}"
            + (f" and the fewest GPUs for {100 * min_gpus_for:g}%" if min_gpus_for is not None else "")
        )
        settings = SimSettings(
            num_gpus=gpus,
            policy=name,
            gpus_per_agent=gpus_per_agent,
            gpu_memory_bytes=int(gpu_memory_gb * GB),
            memory_policy=memory_policy,
            replan_interval_s=replan_interval_s,
            standby_replicas=standby_replicas,
            split_step_factor=split_step_factor,
        )
        try:
            result = run(trace, models, latency, settings, slo)
        except ValueError as exc:
            typer.echo(f"prism simulate: {exc}", err=True)
            raise typer.Exit(1)
        shown.close()
        o = result["overall"]
        line = (
            f"  {name:<11} attainment {100 * o['slo_attainment']:5.1f}% at {gpus} GPUs, errors {o['errors'] or 'none'}"
        )
        if min_gpus_for is not None:
            needed, tried = search(trace, models, latency, settings, min_gpus_for, slo, max_gpus)
            result["min_gpus"] = {
                "target": min_gpus_for,
                "gpus": needed,
                "tried": {str(n): a for n, a in sorted(tried.items())},
            }
            line += f"; fewest GPUs for {100 * min_gpus_for:g}%: {needed if needed is not None else 'none found'}"
        typer.echo(line)
        results["policies"][name] = result
    out.write_text(json.dumps(results if len(policies) > 1 else results["policies"][policies[0]], indent=1) + "\n")
    typer.echo(f"wrote {out}")


trace_app = typer.Typer(
    help="Make workload traces (JSON lines) for prism bench and the simulator.", no_args_is_help=True
)
app.add_typer(trace_app, name="trace")


def _models_option(models: str) -> list[str]:
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise typer.BadParameter("give at least one model name")
    return names


@trace_app.command("generate")
def trace_generate(
    out: Path = typer.Option(..., "--out", "-o", help="the trace file to write"),
    models: str | None = typer.Option(None, help="comma-separated model names (default model-0, model-1, ...)"),
    num_models: int = typer.Option(18),
    num_groups: int = typer.Option(3, help="groups of models that become active together"),
    active_groups: int = typer.Option(1, help="groups active at a time"),
    shift_s: float = typer.Option(60.0, help="how often the active groups change"),
    rate: float = typer.Option(10.0, help="requests/s over the active models"),
    idle_fraction: float = typer.Option(0.02, help="an inactive model's rate, as a fraction of its active one"),
    zipf_alpha: float = typer.Option(1.0, help="popularity skew within the active models"),
    burstiness_cv: float = typer.Option(2.0, help="coefficient of variation of inter-arrival times (1: Poisson)"),
    prompt_mean: float = typer.Option(512.0),
    prompt_std: float = typer.Option(256.0),
    output_mean: float = typer.Option(128.0),
    output_std: float = typer.Option(64.0),
    max_prompt: int = typer.Option(4096),
    max_output: int = typer.Option(1024),
    duration_s: float = typer.Option(600.0),
    seed: int = typer.Option(0),
) -> None:
    """A bursty-group trace (prism/workload/generator.py)."""
    from prism.workload.generator import BurstyGroupParams, bursty_group_trace

    names = _models_option(models) if models else None
    params = BurstyGroupParams(
        num_models=len(names) if names else num_models,
        num_groups=num_groups,
        active_groups=active_groups,
        shift_s=shift_s,
        rate=rate,
        idle_fraction=idle_fraction,
        zipf_alpha=zipf_alpha,
        burstiness_cv=burstiness_cv,
        prompt_mean=prompt_mean,
        prompt_std=prompt_std,
        output_mean=output_mean,
        output_std=output_std,
        max_prompt=max_prompt,
        max_output=max_output,
        duration_s=duration_s,
        seed=seed,
    )
    try:
        trace = bursty_group_trace(params, names)
    except ValueError as exc:
        raise typer.BadParameter(str(exc))
    trace.save(out)
    typer.echo(
        f"wrote {out}: {len(trace.requests)} requests for {len(trace.models)} models over {trace.duration_s:.0f}s"
    )


@trace_app.command("convert")
def trace_convert(
    source: Path = typer.Argument(..., help="an Azure LLM inference trace or a BurstGPT CSV"),
    out: Path = typer.Option(..., "--out", "-o"),
    models: str = typer.Option(..., help="comma-separated model names to map the requests onto"),
    format: str = typer.Option("auto", help="azure | burstgpt | auto (from the CSV header)"),
    time_scale: float = typer.Option(1.0, help="multiply times by this (0.1: ten times the rate)"),
    assign: str | None = typer.Option(
        None, help="zipf | round-robin | source (default: source for BurstGPT, zipf for Azure)"
    ),
    limit: int | None = typer.Option(None, help="read at most this many requests"),
    seed: int = typer.Option(0),
) -> None:
    """A public trace file as a Prism trace (prism/workload/loaders.py)."""
    from prism.workload.loaders import load_azure, load_burstgpt

    if format == "auto":
        try:
            header = source.open().readline()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {source}: {exc.strerror}")
        format = "burstgpt" if "Response tokens" in header else "azure"
    names = _models_option(models)
    try:
        if format == "azure":
            trace = load_azure(source, names, time_scale=time_scale, assign=assign or "zipf", seed=seed, limit=limit)
        elif format == "burstgpt":
            trace = load_burstgpt(
                source, names, time_scale=time_scale, assign=assign or "source", seed=seed, limit=limit
            )
        else:
            raise typer.BadParameter(f"format must be azure, burstgpt or auto, got {format!r}")
    except (OSError, ValueError) as exc:
        typer.echo(f"prism trace convert: {exc}", err=True)
        raise typer.Exit(1)
    trace.save(out)
    typer.echo(f"wrote {out}: {len(trace.requests)} requests over {trace.duration_s:.0f}s")


if __name__ == "__main__":
    app()
