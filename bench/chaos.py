"""Faults under load: a `prism up` cluster (two CPU agents with engines in
worker processes, two scheduler replicas, the gateway, etcd, all supervised
by prism up itself) serves a steady open-loop load while its parts are
killed in turn, and every request is accounted for.

The load (bench/load_soak.py's mix): Poisson arrivals at --rate, REST and
gRPC half each, streamed or not, completions or chat, a tenth of the streams
cancelled by the client after a chunk or two, a few requests for a model
that does not exist (404 / NOT_FOUND). The faults, each at a random moment
(--seed) after the last one has cleared:

  scheduler   kill -9 of the leading scheduler replica (the standby leads;
              prism up restarts the killed one as the new standby)
  agent       kill -9 of an agent (its models are placed on the other one;
              prism up restarts it)
  engine      kill -9 of an engine worker process (the agent's own recovery)
  gateway     kill -9 of the gateway (prism up restarts it)
  etcd        kill -9 of etcd (prism up restarts it on its data dir)
  agent-stop  SIGSTOP of an agent for longer than its etcd lease, then SIGCONT

How each request ended (one of):
  complete    the whole answer (finish reason, max_tokens tokens)
  not found   the explicit error a request for a model that does not exist
              must get (404 / NOT_FOUND)
  error       another explicit error from the cluster: an HTTP status with an
              OpenAI-style body, an SSE error event then [DONE], a gRPC
              status with the gateway's x-request-id trailer
  cancelled   by the client, as planned
  refused     never accepted: the connection to the gateway was refused
              (only while the gateway is down)
  cut         accepted, then its connection to the gateway broke: the client
              sees a reset, the gateway process holding it was killed
  lost        anything else: no end by its deadline (hung), a stream that
              ended without a finish reason or an error, a wrong token count

What is measured per fault: the requests that ended from its injection to
the next one, by how they ended; "serving resumed": from the injection to
the end of the first request sent after it that completed; "all served":
the same for the last model to get one; "consistent": until a scheduler
replica leads (after the leader's kill: one elected since) and etcd's
placement and the agents agree again (every configured model has a replica
on a live agent, each replica's agent runs an engine for it that has loaded
and not failed, no live agent runs an engine no placement names, and each agent's
own status lists the engines its etcd records do).

    python bench/chaos.py [--seeds 0 1 2] [--replicas 1 2] [--rate 4] [--faults scheduler,agent,...]
                          [--json bench/results/chaos-cpu.json]

tests/test_chaos.py runs a short version in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/chaos.py`
    sys.path.insert(0, str(ROOT))

from bench.load_soak import (  # noqa: E402
    CANCELLED,
    COMPLETE,
    ERROR,
    LOST,
    Clients,
    Outcome,
    plan,
    rss_bytes,
    send,
)

FAULTS = ("scheduler", "agent", "engine", "gateway", "etcd", "agent-stop")
REFUSED, CUT, NOT_FOUND = "refused", "cut", "not found"
KINDS = (COMPLETE, NOT_FOUND, ERROR, CANCELLED, REFUSED, CUT, LOST)
AGENT_LEASE_S = 5  # the agent's --lease-ttl-s default
STOP_S = AGENT_LEASE_S + 3  # agent-stop: frozen past its lease

_REFUSED_DETAIL = re.compile(r"ConnectError|Connection refused|failed to connect", re.IGNORECASE)
_CUT_DETAIL = re.compile(
    r"ReadError|RemoteProtocolError|WriteError|Socket closed|Connection reset|"
    r"peer closed|incomplete chunked read|Broken pipe|without the gateway's trailers",
    re.IGNORECASE,
)


def chaos_kind(outcome: Outcome) -> str:
    """load_soak's four ends, with its `lost` split: a connection the gateway never took (refused), one
    that broke under an accepted request (cut), and the rest (lost); and the explicit errors that a
    request for a model that does not exist must get (not found) apart from the others."""
    if outcome.kind == ERROR and outcome.expected_error:
        return NOT_FOUND
    if outcome.kind != LOST:
        return outcome.kind
    if _REFUSED_DETAIL.search(outcome.detail):
        return REFUSED
    if _CUT_DETAIL.search(outcome.detail):
        return CUT
    return LOST


# ---- the cluster, as prism up runs it ------------------------------------------------------


class PrismUp:
    """`prism up` in a process of its own, with its console kept; the pids of what it started read from
    STATE/pids.json (it rewrites the file on every restart)."""

    def __init__(
        self,
        state: Path,
        config: Path,
        *,
        agents: int,
        scheduler_replicas: int,
        http_port: int,
        grpc_port: int,
        cpu_memory_gb: float,
    ):
        self.state = state
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self.lines: list[str] = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prism.cli",
                "up",
                "--config",
                str(config),
                "--state-dir",
                str(state),
                "--device",
                "cpu",
                "--cpu-memory-gb",
                str(cpu_memory_gb),
                "--engine-isolation",
                "process",
                "--agents",
                str(agents),
                "--scheduler-replicas",
                str(scheduler_replicas),
                "--http-port",
                str(http_port),
                "--grpc-port",
                str(grpc_port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_up(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(line.startswith("Prism is up") for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("prism up did not come up; its console:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.2)

    @property
    def etcd_endpoint(self) -> str:
        line = next(line for line in self.lines if line.strip().startswith("etcd "))
        return line.split()[-1]

    @property
    def agent_addresses(self) -> dict[str, str]:
        """prism up's agent names ("agent", "agent-2", ...) -> their addresses, from its banner."""
        from prism.cluster import LocalCluster

        line = next(line for line in self.lines if re.match(r"\s+agents?\s", line))
        addresses = line.split(None, 1)[1].split(", ")
        return {LocalCluster.agent_name(i): address.strip() for i, address in enumerate(addresses)}

    def pids(self) -> dict[str, int]:
        return json.loads((self.state / "pids.json").read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            # prism up stops everything it started on SIGTERM (SIGINT too, unless it inherited SIGINT
            # ignored: a test run in the background); its services share its process group for the rest.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def write_config(state: Path, replicas: int = 1) -> Path:
    """Four tiny models (two names for each generated model), each with `replicas` placements where the
    scheduler chooses, prism's policy."""
    from prism.tiny_models import ensure_default_models

    paths = ensure_default_models(state / "models")
    models = [
        {
            "model_name": f"{name}{suffix}",
            "model_path": str(path),
            "init_placements": [{"gpu_ids": [0], "on": True, "max_memory_pool_size": 0.25}] * replicas,
        }
        for suffix in ("", "-b")
        for name, path in sorted(paths.items())
    ]
    config = state / "models.json"
    config.write_text(json.dumps(models, indent=2))
    return config


def model_names(config: Path) -> list[str]:
    return [m["model_name"] for m in json.loads(config.read_text())]


# ---- the load ------------------------------------------------------------------------------


class OpenLoopLoad:
    """Requests sent at Poisson arrivals of `rate` per second (not waiting for earlier ones), from an event
    loop on a thread of its own, until stopped; every Outcome kept, in the order they ended."""

    def __init__(
        self,
        http_url: str,
        grpc_target: str,
        models: list[str],
        *,
        rate: float,
        seed: int,
        deadline_s: float,
        max_tokens: int = 8,
    ):
        self.http_url, self.grpc_target = http_url, grpc_target
        self.models, self.rate, self.seed = tuple(models), rate, seed
        self.deadline_s, self.max_tokens = deadline_s, max_tokens
        self.outcomes: list[Outcome] = []
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        clients = Clients(self.http_url, self.grpc_target, concurrency=256)
        rng = random.Random(self.seed)
        tasks: set[asyncio.Task] = set()

        async def one(index: int) -> None:
            [planned] = plan(1, seed=self.seed, start=index, max_tokens=self.max_tokens, models=self.models)
            self.outcomes.append(await send(clients, planned, self.deadline_s))

        try:
            next_at = time.monotonic()
            while not self._stop.is_set():
                next_at += rng.expovariate(self.rate)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                task = asyncio.create_task(one(self.sent))
                self.sent += 1
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:  # each ends by its deadline
                await asyncio.wait(tasks)
        finally:
            await clients.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.deadline_s + 30)
        if self._thread.is_alive():
            raise RuntimeError("the load did not stop")

    def first_completions_after(self, t: float) -> dict[str, float]:
        """model -> when the first request sent at or after t that completed ended."""
        firsts: dict[str, float] = {}
        for o in list(self.outcomes):
            if o.kind == COMPLETE and o.started >= t:
                firsts[o.model] = min(firsts.get(o.model, o.ended), o.ended)
        return firsts


# ---- the faults ----------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def rss_or_zero(pid: int) -> int:
    """load_soak.rss_bytes, 0 for a process that is gone (or never had memory of its own)."""
    try:
        return rss_bytes(pid)
    except (OSError, ValueError):
        return 0


def engine_workers(agent_pid: int) -> list[int]:
    """The agent's engine worker processes (services.gpu_agent.workers.worker_main)."""
    workers = []
    for pid in children_of(agent_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"worker_main" in f.read():
                    workers.append(pid)
        except OSError:
            pass
    return workers


async def read_cluster(etcd: str):
    from prism.cluster_view import ClusterReader

    reader = ClusterReader(etcd, status_timeout_s=2.0)
    try:
        return await reader.read()
    finally:
        await reader.close()


def leading_scheduler(etcd: str) -> str | None:
    snapshot = asyncio.run(read_cluster(etcd))
    return snapshot.scheduler_leader["scheduler_id"] if snapshot.scheduler_leader else None


def agent_serving_most(etcd: str, up: PrismUp) -> str:
    """The agent (prism up's process name) with the most engines recorded in etcd."""
    snapshot = asyncio.run(read_cluster(etcd))
    counts = Counter(e["agent_id"] for e in snapshot.engines)
    engines_at = {a.record["address"]: counts.get(a.agent_id, 0) for a in snapshot.agents}
    return max(up.agent_addresses, key=lambda name: engines_at.get(up.agent_addresses[name], 0))


def consistency_problems(snapshot, models: list[str], elected_after: float = 0.0) -> list[str]:
    """What keeps etcd's placement and the agents from agreeing (empty: consistent); and a scheduler
    replica leads, elected after `elected_after` (wall-clock time: the killed leader's record is not
    a leader)."""
    problems = []
    leader = snapshot.scheduler_leader or {}
    if not leader or leader.get("elected_at", 0.0) <= elected_after:
        problems.append(f"no scheduler leads (the leader record: {leader or 'none'})")
    live = {a.agent_id: a for a in snapshot.agents}
    engines = {(e["agent_id"], e["model"]): e for e in snapshot.engines}
    named = set()
    placed = set()
    for p in snapshot.placements:
        for r in p.get("replicas", []):
            named.add((r["agent_id"], p["model"]))
            if r["agent_id"] not in live:
                problems.append(f"{p['model']}: a replica on {r['agent_id']}, which is not live")
                continue
            engine = engines.get((r["agent_id"], p["model"]))
            if engine is None:
                problems.append(f"{p['model']}: no engine on {r['agent_id']} for its replica")
            elif engine["state"] == "failed":
                problems.append(f"{p['model']}: its engine on {r['agent_id']} failed: {engine.get('error', '')}")
            elif engine["state"] == "loading":
                problems.append(f"{p['model']}: its engine on {r['agent_id']} is still loading")
            else:
                placed.add(p["model"])
    problems += [f"{m}: not placed on a live agent" for m in models if m not in placed]
    problems += [
        f"{agent}: runs {model}, which no placement names"
        for (agent, model) in engines
        if agent in live and (agent, model) not in named
    ]
    for agent in live.values():
        if agent.status is None:
            problems.append(f"{agent.agent_id}: no status ({agent.error})")
            continue
        running = {e.model for e in agent.status.engines}
        recorded = {model for (a, model) in engines if a == agent.agent_id}
        if running != recorded:
            problems.append(f"{agent.agent_id}: runs {sorted(running)}, etcd records {sorted(recorded)}")
    return problems


@dataclass
class Injection:
    fault: str
    target: str  # the process it hit
    at: float  # time.monotonic()
    wall_at: float  # time.time() at the same moment
    cleared_at: float = 0.0  # agent-stop: SIGCONT; else the injection
    resumed_s: float | None = None  # to the first request sent after it that completed
    all_served_s: float | None = None  # ... for the last model
    consistent_s: float | None = None  # to etcd and the agents agreeing again
    problems: list[str] = field(default_factory=list)  # if never consistent within the bound
    ends: dict[str, int] = field(default_factory=dict)
    lost_examples: list[str] = field(default_factory=list)


def inject(fault: str, up: PrismUp, etcd: str) -> tuple[str, float, float]:
    """Does the fault; returns its target, when it was injected and when it cleared (time.monotonic())."""
    pids = up.pids()
    if fault == "scheduler":
        target = leading_scheduler(etcd) or "scheduler"
    elif fault in ("agent", "agent-stop"):
        target = agent_serving_most(etcd, up)
    elif fault == "engine":
        agent = agent_serving_most(etcd, up)
        workers = engine_workers(pids[agent])
        if not workers:
            raise RuntimeError(f"{agent} has no engine worker processes")
        pid = max(workers, key=rss_or_zero)  # the one holding a model's weights, not an idle spare
        at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        return f"{agent} worker {pid}", at, at
    else:
        target = fault
    pid = pids[target]
    at = time.monotonic()
    if fault == "agent-stop":
        os.kill(pid, signal.SIGSTOP)
        time.sleep(STOP_S)
        os.kill(pid, signal.SIGCONT)
        return target, at, time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return target, at, at


def watch_recovery(injection: Injection, load: OpenLoopLoad, etcd: str, models: list[str], bound_s: float) -> None:
    """Fills the injection's recovery times, polling until both the load and the placement have recovered
    (or bound_s has passed since it cleared)."""
    deadline = injection.cleared_at + bound_s
    while time.monotonic() < deadline:
        firsts = load.first_completions_after(injection.at)
        if firsts and injection.resumed_s is None:
            injection.resumed_s = min(firsts.values()) - injection.at
        served = [m for m in models if m in firsts]
        if len(served) == len(models) and injection.all_served_s is None:
            injection.all_served_s = max(firsts[m] for m in models) - injection.at
        if injection.consistent_s is None and time.monotonic() >= injection.cleared_at:
            try:
                elected_after = injection.wall_at if injection.fault == "scheduler" else 0.0
                problems = consistency_problems(asyncio.run(read_cluster(etcd)), models, elected_after)
            except Exception as exc:  # noqa: BLE001  etcd down for a moment: not yet consistent
                problems = [f"cannot read the cluster: {type(exc).__name__}: {exc}"]
            if problems:
                injection.problems = problems
            else:
                injection.consistent_s = time.monotonic() - injection.at
                injection.problems = []
        if injection.all_served_s is not None and injection.consistent_s is not None:
            return
        time.sleep(0.25)


# ---- a run ---------------------------------------------------------------------------------


def attribute(outcomes: list[Outcome], injections: list[Injection]) -> dict[int, list[Outcome]]:
    """Each request to the last injection before its end (-1: before the first)."""
    out: dict[int, list[Outcome]] = {}
    for o in outcomes:
        index = max((i for i, inj in enumerate(injections) if inj.at <= o.ended), default=-1)
        out.setdefault(index, []).append(o)
    return out


def run_seed(
    seed: int,
    faults: list[str],
    *,
    rate: float,
    deadline_s: float,
    bound_s: float,
    gap_s: tuple[float, float],
    agents: int,
    cpu_memory_gb: float,
    replicas: int = 1,
    log=print,
) -> dict:
    from services.common.etcd_server import free_port

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="prism-chaos-") as tmp:
        state = Path(tmp)
        config = write_config(state, replicas)
        models = model_names(config)
        up = PrismUp(
            state,
            config,
            agents=agents,
            scheduler_replicas=2,
            http_port=free_port(),
            grpc_port=free_port(),
            cpu_memory_gb=cpu_memory_gb,
        )
        injections: list[Injection] = []
        load = None
        try:
            up.wait_up(240)
            etcd = up.etcd_endpoint
            load = OpenLoopLoad(up.http_url, up.grpc_target, models, rate=rate, seed=seed, deadline_s=deadline_s)
            load.start()
            time.sleep(gap_s[0])
            for fault in faults:
                time.sleep(rng.uniform(*gap_s))
                target, at, cleared = inject(fault, up, etcd)
                injection = Injection(fault, target, at, time.time() - (time.monotonic() - at), cleared)
                injections.append(injection)
                log(f"seed {seed}, {replicas} replica(s) a model: {fault} ({target})")
                watch_recovery(injection, load, etcd, models, bound_s)
                log(
                    f"  resumed {_s(injection.resumed_s)}, all models served {_s(injection.all_served_s)}, "
                    f"consistent {_s(injection.consistent_s)}"
                    + (f"; still: {injection.problems[:3]}" if injection.consistent_s is None else "")
                )
            time.sleep(gap_s[0])
        finally:
            if load is not None:
                load.stop()
            console = list(up.lines)
            up.stop()
        outcomes = load.outcomes if load is not None else []
        by_injection = attribute(outcomes, injections)
        for i, injection in enumerate(injections):
            mine = by_injection.get(i, [])
            injection.ends = dict(Counter(chaos_kind(o) for o in mine))
            injection.lost_examples = [
                f"#{o.index} {o.shape} after {o.latency_s:.2f}s: {o.detail}" for o in mine if chaos_kind(o) == LOST
            ][:10]
        before = by_injection.get(-1, [])
        restarts = [line for line in console if "restart" in line]
        return {
            "seed": seed,
            "replicas": replicas,
            "requests": len(outcomes),
            "ends": dict(Counter(chaos_kind(o) for o in outcomes)),
            "missing_model_requests": sum(o.expected_error for o in outcomes),
            "before_first_fault": dict(Counter(chaos_kind(o) for o in before)),
            "injections": [
                {
                    **asdict(inj),
                    "at": None,
                    "wall_at": None,
                    "cleared_at": None,
                    "stopped_s": round(inj.cleared_at - inj.at, 2),
                }
                for inj in injections
            ],
            "supervisor_lines": restarts,
        }


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}s"


def fault_table(runs: list[dict]) -> list[dict]:
    rows = []
    for fault in dict.fromkeys(inj["fault"] for run in runs for inj in run["injections"]):
        injs = [inj for run in runs for inj in run["injections"] if inj["fault"] == fault]
        ends = Counter()
        for inj in injs:
            ends.update(inj["ends"])

        def worst(key: str) -> float | None:
            values = [inj[key] for inj in injs]
            return None if any(v is None for v in values) else max(values)

        def median(key: str) -> float | None:
            values = sorted(v for v in (inj[key] for inj in injs) if v is not None)
            return values[len(values) // 2] if values else None

        rows.append(
            {
                "fault": fault,
                "injected": len(injs),
                "requests": sum(ends.values()),
                **{kind: ends[kind] for kind in KINDS},
                "resumed_median_s": median("resumed_s"),
                "resumed_max_s": worst("resumed_s"),
                "all_served_max_s": worst("all_served_s"),
                "consistent_max_s": worst("consistent_s"),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--faults", default=",".join(FAULTS), help=f"in this order, each once a seed ({', '.join(FAULTS)})")
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson arrivals)")
    p.add_argument("--deadline-s", type=float, default=60.0, help="a request not ended by then is hung (lost)")
    p.add_argument("--bound-s", type=float, default=60.0, help="how long recovery is waited for after a fault")
    p.add_argument(
        "--gap-s",
        type=float,
        nargs=2,
        default=[3.0, 8.0],
        help="a fault comes this many seconds (uniform, by the seed) after the last one recovered",
    )
    p.add_argument("--agents", type=int, default=2)
    p.add_argument(
        "--replicas",
        type=int,
        nargs="+",
        default=[1, 2],
        help="placements of each model; each seed runs once with each (1: an agent's death means "
        "re-placing its models; 2: each model also runs on the other agent)",
    )
    p.add_argument("--cpu-memory-gb", type=float, default=1.0, help="each agent's CPU device")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if unknown := [f for f in faults if f not in FAULTS]:
        p.error(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    # A SIGTERM ends the run as Ctrl-C does: each run's cluster is stopped on the way out, not left behind.
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.time()
    runs = [
        run_seed(
            seed,
            faults,
            rate=args.rate,
            deadline_s=args.deadline_s,
            bound_s=args.bound_s,
            gap_s=tuple(args.gap_s),
            agents=args.agents,
            cpu_memory_gb=args.cpu_memory_gb,
            replicas=replicas,
        )
        for replicas in args.replicas
        for seed in args.seeds
    ]
    rows = [
        {"replicas": replicas, **row}
        for replicas in args.replicas
        for row in fault_table([run for run in runs if run["replicas"] == replicas])
    ]
    totals = Counter()
    for run in runs:
        totals.update(run["ends"])
    wall_s = time.time() - started
    from bench.common import environment, table, write_json

    result = {
        "benchmark": "chaos",
        "environment": environment(),
        "wall_s": round(wall_s, 1),
        "settings": {
            "seeds": args.seeds,
            "faults": faults,
            "rate": args.rate,
            "deadline_s": args.deadline_s,
            "bound_s": args.bound_s,
            "gap_s": args.gap_s,
            "agents": args.agents,
            "replicas": args.replicas,
            "scheduler_replicas": 2,
            "engine_isolation": "process",
            "models": 4,
        },
        "totals": dict(totals),
        "faults": rows,
        "runs": runs,
        "lost": totals[LOST],
        "cut_outside_gateway_faults": sum(r[CUT] for r in rows if r["fault"] != "gateway"),
    }
    write_json(args.json, result)
    print()
    print(
        f"{sum(r['injected'] for r in rows)} faults over {len(runs)} runs, {sum(totals.values())} requests at "
        f"{args.rate:g}/s in {wall_s:.0f} s: " + ", ".join(f"{k} {totals[k]}" for k in KINDS)
    )
    print(
        table(
            rows,
            [
                ("replicas", "replicas", "d"),
                ("fault", "fault", ""),
                ("injected", "n", "d"),
                ("requests", "requests", "d"),
                (COMPLETE, "complete", "d"),
                (NOT_FOUND, "404", "d"),
                (ERROR, "error", "d"),
                (CANCELLED, "cancel", "d"),
                (REFUSED, "refused", "d"),
                (CUT, "cut", "d"),
                (LOST, "lost", "d"),
                ("resumed_median_s", "resumed p50 s", ".1f"),
                ("resumed_max_s", "resumed max s", ".1f"),
                ("all_served_max_s", "all served s", ".1f"),
                ("consistent_max_s", "consistent s", ".1f"),
            ],
        )
    )
    return 1 if totals[LOST] or result["cut_outside_gateway_faults"] else 0


if __name__ == "__main__":
    sys.exit(main())
