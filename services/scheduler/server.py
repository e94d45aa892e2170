"""Global scheduler process: publishes the model registry, computes placement
with the chosen policy, drives agents to it and records it in etcd.

    python -m services.scheduler.server --etcd 127.0.0.1:2379 --config models.json \
        --listen 127.0.0.1:50051 [--policy static] [--scheduler-id ID] \
        [--tls-cert PEM --tls-key PEM --tls-ca PEM [--mtls]] [--etcd-ca PEM --etcd-cert PEM --etcd-key PEM] \
        [--etcd-user USER]  (its password: $PRISM_ETCD_PASSWORD)

Any number of replicas may run against one etcd: they elect a leader
(leader_election.py), and only the leader publishes the registry, re-plans
and drives agents; a standby answers health NOT_SERVING and takes over when
the leader is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import grpc

from prism_client.v1 import agent_pb2, agent_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.common import placement_config, records
from services.common.etcd import EtcdLoginRefused, PrefixMirror, add_etcd_args, connect, etcd_access_from_args
from services.common.grpc_decode import add_servicer
from services.common.grpc_util import (
    REUSE_NO_PORT,
    add_health_and_reflection,
    mark_not_serving,
    mark_serving,
)
from services.common.logs import setup_logging
from services.common.model_size import estimate_weight_bytes
from services.common.placement_config import ModelConfig
from services.common.step_costs import StepTimeSums, step_tokens_for
from services.common.tls import (
    TlsConfigError,
    TlsFiles,
    add_port,
    add_tls_args,
    aio_channel,
    tls_from_args,
    transport_name,
)
from services.scheduler.actions import Action, current_placement, plan_actions, still_held_off
from services.scheduler.demand import DemandMemory, EngineKey, EngineLoad
from services.scheduler.leader_election import LEADER, LeaderElection
from services.scheduler.policies import (
    MANAGES_ACTIVITY,
    POLICIES,
    AgentView,
    ClusterSnapshot,
    ModelDemand,
    Placement,
    PolicyParams,
    compute_costs_for,
    compute_costs_from_profile,
    with_waiting,
)
from services.scheduler.policies.compute import MeasuredSize, measured_sizes, with_measured
from services.scheduler.scheduler_service import SchedulerService

log = logging.getLogger("scheduler")
SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Prism global scheduler")
    p.add_argument("--etcd", default="127.0.0.1:2379")
    p.add_argument("--config", required=True, help="placement config (.json, .yaml)")
    p.add_argument("--listen", default="127.0.0.1:50051")
    p.add_argument(
        "--policy",
        default=None,
        choices=sorted(POLICIES),
        help='placement policy (default: the config\'s "policy", else static)',
    )
    p.add_argument("--replan-interval-s", type=float, default=2.0)
    p.add_argument("--load-timeout-s", type=float, default=600.0, help="deadline of one LoadModel command")
    p.add_argument(
        "--min-kv-fraction",
        type=float,
        default=PolicyParams.min_kv_fraction,
        help="prism policy: KV an active model is counted with at least, as a fraction of its GPU",
    )
    p.add_argument(
        "--standby-replicas",
        type=int,
        default=PolicyParams.standby_replicas,
        help="prism policy: switched-off replicas of each model on other agents, which a burst "
        "switches on instead of loading; each costs its agent host memory for the weights",
    )
    p.add_argument(
        "--compute-costs",
        default=None,
        metavar="PROFILE_JSON",
        help="step costs the policies price compute with: a latency profile's JSON (as "
        "bench/results/sim-profile-h100.json). Default: the fitted costs of the card the agents "
        "name (H100, H200; another CUDA card: the H100's; several: the slowest's)",
    )
    p.add_argument(
        "--step-costs-from",
        default="cuda",
        choices=STEP_COSTS_FROM,
        help="whose measured steps replace the costs above for their model sizes once enough were "
        "run: cuda (engines on CUDA devices; CPU clusters keep the constants their placement "
        "tests were written against), all (every engine's), none (the costs above alone)",
    )
    p.add_argument(
        "--status-interval-s",
        type=float,
        default=DEFAULT_STATUS_INTERVAL_S,
        help="how often the leader writes its status record (plans made, step costs; prism status shows it) at most",
    )
    p.add_argument(
        "--scheduler-id", default=None, help="this replica's name in the leader election (default: <hostname>-<port>)"
    )
    p.add_argument("--advertise", default=None, help="the address agents reach this replica at (default: --listen)")
    p.add_argument(
        "--leader-ttl-s",
        type=int,
        default=2,
        help="the leader's etcd lease: a dead leader is replaced about this long after its death",
    )
    add_tls_args(p)
    add_etcd_args(p)
    args = p.parse_args(argv)
    if not 0 <= args.min_kv_fraction <= 1:
        p.error("--min-kv-fraction must be between 0 and 1")
    if args.standby_replicas < 0:
        p.error("--standby-replicas must be 0 or more")
    args.compute = None
    if args.status_interval_s < 0:
        p.error(f"--status-interval-s must not be negative, got {args.status_interval_s:g}")
    if args.compute_costs is not None:
        try:
            args.compute = compute_costs_from_profile(json.loads(Path(args.compute_costs).read_text()))
        except (OSError, ValueError) as exc:
            p.error(f"--compute-costs {args.compute_costs}: {exc}")
    try:
        args.tls_files = tls_from_args(args)
        args.etcd_access = etcd_access_from_args(args)
    except TlsConfigError as exc:
        p.error(str(exc))
    return args


def model_spec(model: ModelConfig) -> agent_pb2.ModelSpec:
    """What an agent needs to run the model (its SLO unset where the config leaves it to the agent's default)."""
    return agent_pb2.ModelSpec(
        name=model.model_name,
        path=model.model_path,
        tp_size=model.tp_size,
        load_format=model.load_format,
        engine=model.engine,
        dtype=model.dtype,
        seed=model.seed,
        priority=model.priority,
        shed_load=model.shed_load,
        slo=agent_pb2.ModelSlo(ttft_ms=model.ttft_slo_ms or 0, tpot_ms=model.tpot_slo_ms or 0),
        max_context=model.max_context,
        deterministic_inference=model.deterministic_inference,
        no_prefix_caching=not model.prefix_caching,
    )


# After an agent kept an engine on (recent requests), ask again no sooner than this.
KEPT_ON_RETRY_S = 2.0
STEP_COSTS_FROM = ("cuda", "all", "none")  # --step-costs-from
# After a wake, the loop waits this long before it re-plans: a burst of etcd events (demand records,
# engines changing state) is one re-plan. prism/simulator/scheduler.py mirrors it.
REPLAN_COALESCE_S = 0.05
DEFAULT_STATUS_INTERVAL_S = 10.0  # how often the scheduler status record (prism status) is written at most


def engine_loads_from_reports(
    reports: list[scheduler_pb2.LoadReport], tp_sizes: Mapping[str, int] | None = None
) -> dict[EngineKey, EngineLoad]:
    """Each engine's load in the agents' latest reports, keyed by (agent, model), for DemandMemory to
    sum. tp_sizes: a model split over several GPUs reports its KV demand as one rank holds it (its
    share of the KV heads), and the policies take a model's whole demand (they divide it by tp_size,
    as its weights): it counts tp_size times."""
    tp_sizes = tp_sizes or {}
    return {
        (report.agent_id, load.model): EngineLoad(
            ModelDemand.from_serving(
                load.serving,
                queued=load.queued_requests,
                running=load.running_requests,
                kv_demand_bytes=load.kv_demand_bytes * tp_sizes.get(load.model, 1),
            ),
            load.serving.window_s,
        )
        for report in reports
        for load in report.models
    }


def usable_gpu_memory(agent_id: str, devices: list[dict], reports: list[scheduler_pb2.LoadReport]) -> dict[int, int]:
    """Each GPU's memory that weights and KV may take, as the policies plan it: the device's memory less
    the reserve its agent keeps in force (its latest report's; the agent measures what its processes hold
    beyond weights and KV, about 20 GB with 12 engine processes on an H100). Planned on the whole card,
    prism counted 85 GB where 65 were there to take, kept more models on than fit, and their requests
    met refused activations."""
    reserve = {
        gpu.gpu_id: gpu.reserve_bytes for report in reports if report.agent_id == agent_id for gpu in report.gpus
    }
    return {d["index"]: max(0, d.get("memory_bytes", 0) - reserve.get(d["index"], 0)) for d in devices}


def waiting_at_gateways(values) -> dict[str, int]:
    """Requests waiting at the gateways for each model to become servable (demand/ records)."""
    out: dict[str, int] = {}
    for value in values:
        try:
            rec = records.DemandRecord.from_json(value)
        except (ValueError, TypeError):
            continue
        out[rec.model] = out.get(rec.model, 0) + max(rec.waiting, 0)
    return out


def step_sums_by_weight(reports: list[scheduler_pb2.LoadReport]) -> dict[int, StepTimeSums]:
    """The step-time sums of every engine the agents report, added up per size of an engine's weights on
    its GPU (engines of one size cost alike)."""
    out: dict[int, StepTimeSums] = {}
    for report in reports:
        weights: dict[str, int] = {}
        for gpu in report.gpus:
            for engine in gpu.engines:
                weights[engine.model] = max(weights.get(engine.model, 0), engine.weight_bytes)
        for load in report.models:
            if load.step_count <= 0 or not weights.get(load.model):
                continue
            try:
                sums = StepTimeSums.from_values(load.step_count, load.step_xtx, load.step_xty)
            except ValueError as exc:  # an agent of another version: its steps do not count
                log.warning("agent %s: step sums of %s ignored: %s", report.agent_id, load.model, exc)
                continue
            size = weights[load.model]
            out[size] = out[size] + sums if size in out else sums
    return out


def reported_weight_bytes(reports: list[scheduler_pb2.LoadReport]) -> dict[str, int]:
    """Each model's weight size as an agent that loaded it reports it: its
    rows summed over the agent's GPUs, since a model split over several GPUs
    shows its shard on each (the policies take a model's whole weights and
    divide them by its tp_size; the shard alone made a 70B split four ways
    look like a 19B model to them)."""
    out: dict[str, int] = {}
    for report in reports:
        summed: dict[str, int] = {}
        for gpu in report.gpus:
            for engine in gpu.engines:
                summed[engine.model] = summed.get(engine.model, 0) + engine.weight_bytes
        for model, nbytes in summed.items():
            if nbytes:
                out[model] = max(out.get(model, 0), nbytes)
    return out


class PlacementLoop:
    """Re-plans on an interval and whenever `wake` is set, and executes the
    resulting actions in the background, one at a time per (agent, model),
    backing off after failures."""

    def __init__(
        self,
        config: placement_config.PlacementConfig,
        etcd,
        policy_name: str,
        service: SchedulerService,
        wake: asyncio.Event,
        interval_s: float,
        load_timeout_s: float,
        params: PolicyParams = PolicyParams(),
        fence: tuple[str, bytes] | None = None,
        tls: TlsFiles | None = None,
        compute_from_devices: bool = False,
        step_costs_from: str = "cuda",
        scheduler_id: str = "",
        status_interval_s: float = DEFAULT_STATUS_INTERVAL_S,
    ):
        """fence: (key, value) that must still be in etcd for this loop's
        placement writes to land (the leader key with this term's record), so
        a deposed leader can never overwrite its successor's placements.
        tls: the scheduler's TLS files for its calls to the agents (None: plaintext).
        compute_from_devices: price compute with the costs of the cards the agents name
        (compute_costs_for), in place of params.compute.
        step_costs_from: whose engines' measured steps are fitted in (STEP_COSTS_FROM).
        scheduler_id, status_interval_s: the status record's replica name, and how often it is written."""
        self.config = config
        self.tls = tls
        self.fence = fence
        self.etcd = etcd
        self.policy = POLICIES[policy_name]
        self.manages_activity = policy_name in MANAGES_ACTIVITY
        self.params = params
        self.compute_from_devices = compute_from_devices
        if step_costs_from not in STEP_COSTS_FROM:
            raise ValueError(f"step_costs_from must be one of {STEP_COSTS_FROM}, got {step_costs_from!r}")
        self.step_costs_from = step_costs_from
        # The step costs before the engines' measured steps are fitted in (the cards' or the operator's).
        self.profile_compute = params.compute
        self.measured: dict[int, MeasuredSize] = {}  # the sizes whose steps price compute now
        self.scheduler_id = scheduler_id
        self.status_interval_s = status_interval_s
        self.plans = 0  # made since this loop began (it runs while its replica leads)
        self._planned_at = 0.0
        # Each model's demand, departed engines' requests in the window still counted (demand.py).
        self.demand_memory = DemandMemory()
        self._status_written_at = float("-inf")
        # Until an agent reports a model's real size: estimated from its config.json.
        self._estimated_weights = {m.model_name: estimate_weight_bytes(m.model_path, m.dtype) for m in config.models}
        self.service = service
        self.wake = wake
        self.interval_s = interval_s
        self.load_timeout_s = load_timeout_s
        self.agents = PrefixMirror(etcd, records.AGENTS, lambda k, v: wake.set())
        self.engines = PrefixMirror(etcd, records.ENGINES, lambda k, v: wake.set())
        # Requests waiting at gateways for a model no agent serves yet: re-plan at once.
        self.waiting = PrefixMirror(etcd, records.DEMAND, lambda k, v: wake.set())
        self._in_flight: dict[tuple[str, str], asyncio.Task] = {}
        self._retry_at: dict[tuple[str, str], tuple[float, float]] = {}  # key -> (monotonic time, backoff)
        self._activated_at: dict[tuple[str, str], float] = {}  # key -> when this scheduler switched it on
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def publish_registry(self) -> None:
        wanted = {}
        for m in self.config.models:
            rec = records.ModelRecord(
                name=m.model_name,
                path=m.model_path,
                tp_size=m.tp_size,
                load_format=m.load_format,
                engine=m.engine,
                dtype=m.dtype,
                seed=m.seed,
                ttft_ms=m.ttft_slo_ms or 0.0,
                max_context=m.max_context,
                deterministic_inference=m.deterministic_inference,
            )
            wanted[rec.key()] = rec.to_json()
        existing = {kv.key.decode(): kv.value for kv in await self.etcd.get_prefix(records.MODELS.encode())}
        for key in existing.keys() - wanted.keys():
            await self.etcd.delete(key.encode())
        for key, value in wanted.items():
            if existing.get(key) != value:
                await self.etcd.put(key.encode(), value)

    def _agent_records(self) -> dict[str, records.AgentRecord]:
        out = {}
        for value in self.agents.items.values():
            rec = records.AgentRecord.from_json(value)
            out[rec.agent_id] = rec
        return out

    def _engine_records(self) -> dict[tuple[str, str], records.EngineRecord]:
        out = {}
        for value in self.engines.items.values():
            rec = records.EngineRecord.from_json(value)
            out[(rec.agent_id, rec.model)] = rec
        return out

    async def _write_placements(self, target: Placement) -> bool:
        """Writes the changed placements in one etcd transaction that holds
        only if none of them changed since they were read and, with a fence,
        this loop's leader still leads. False (nothing written) otherwise."""
        kvs = {kv.key.decode(): kv for kv in await self.etcd.get_prefix(records.PLACEMENTS.encode())}
        existing = {key: records.PlacementRecord.from_json(kv.value) for key, kv in kvs.items()}
        tx = self.etcd.transactions
        compare = [tx.value(self.fence[0].encode()) == self.fence[1]] if self.fence else []
        ops, changes = [], []
        for model, replicas in target.items():
            as_dicts = [
                vars(records.Replica(r.agent_id, list(r.gpu_ids), r.active, r.memory_limit_bytes)) for r in replicas
            ]
            key = records.PLACEMENTS + model
            old = existing.get(key)
            if old is None or old.replicas != as_dicts:
                rec = records.PlacementRecord(model=model, replicas=as_dicts, revision=(old.revision if old else 0) + 1)
                compare.append(tx.mod(key.encode()) == kvs[key].mod_revision if old else tx.version(key.encode()) == 0)
                ops.append(tx.put(key.encode(), rec.to_json()))
                changes.append((model, as_dicts, rec.revision))
        for key in existing.keys() - {records.PLACEMENTS + m for m in target}:
            compare.append(tx.mod(key.encode()) == kvs[key].mod_revision)
            ops.append(tx.delete(key.encode()))
        if not ops:
            return True
        written, _ = await self.etcd.transaction(compare=compare, success=ops, failure=[])
        if not written:
            log.warning("placement not written: another writer changed it, or this replica no longer leads")
            return False
        for model, as_dicts, revision in changes:
            log.info(
                "placement of %s -> %s (revision %d)",
                model,
                [f"{r['agent_id']}:{r['gpu_ids']}" for r in as_dicts] or "unplaced",
                revision,
            )
        return True

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = aio_channel(address, self.tls)
        return self._channels[address]

    def _price_compute_for(
        self, agents: Mapping[str, records.AgentRecord], reports: list[scheduler_pb2.LoadReport]
    ) -> None:
        """params.compute: the step costs of the cards the agents name (with compute_from_devices; else the
        configured ones), with every model size whose engines have run enough steps fitted from those steps
        (services/common/step_costs.py), so that compute is priced with what the GPUs actually take; and
        params.step_tokens, the step budget their devices' engines run with (step_tokens_for: on CUDA four
        times the CPU's, so a prompt takes a quarter of the steps the CPU's budget would count)."""
        step_tokens = (
            step_tokens_for(d["kind"] for a in agents.values() for d in a.devices)
            if agents
            else self.params.step_tokens
        )
        if step_tokens != self.params.step_tokens:
            self.params = dataclasses.replace(self.params, step_tokens=step_tokens)
        if self.compute_from_devices and agents:
            costs = compute_costs_for([(d["kind"], d["name"]) for a in agents.values() for d in a.devices])
            if costs != self.profile_compute:
                log.info(
                    "pricing compute with the step costs of %s",
                    ", ".join(sorted({d["name"] for a in agents.values() for d in a.devices})),
                )
                self.profile_compute = costs
        measuring = [
            r
            for r in reports
            if self.step_costs_from == "all"
            or (
                self.step_costs_from == "cuda"
                and r.agent_id in agents
                and any(d["kind"] == "cuda" for d in agents[r.agent_id].devices)
            )
        ]
        measured = measured_sizes(self.profile_compute, step_sums_by_weight(measuring))
        if measured.keys() - self.measured.keys():
            log.info(
                "pricing compute with the measured steps of models of %s",
                ", ".join(
                    f"{w / 1e9:.2f} GB ({m.steps:.0f} steps)" for w, m in measured.items() if w not in self.measured
                ),
            )
        self.measured = measured
        costs = with_measured(self.profile_compute, measured)
        if costs != self.params.compute:
            self.params = dataclasses.replace(self.params, compute=costs)

    async def _publish_status(self) -> None:
        """The plans made and the step costs the policies price compute with, in etcd for `prism status`
        (every status_interval_s at most)."""
        now = time.monotonic()
        if now - self._status_written_at < self.status_interval_s:
            return
        self._status_written_at = now
        record = records.SchedulerStatusRecord(
            scheduler_id=self.scheduler_id,
            plans=self.plans,
            planned_at=self._planned_at,
            attention_bytes_per_s=self.params.compute.attention_bytes_per_s,
            points=[
                {
                    **dataclasses.asdict(p),
                    "measured_steps": self.measured[p.weight_bytes].steps if p.weight_bytes in self.measured else 0.0,
                }
                for p in self.params.compute.points
            ],
        )
        try:
            await self.etcd.put(records.SCHEDULER_STATUS.encode(), record.to_json())
        except Exception as exc:  # a status record: the plan goes on without it
            log.warning("cannot write the scheduler status record: %s", exc)

    async def replan(self) -> None:
        agents = self._agent_records()
        engines = self._engine_records()
        reports = self.service.fresh_reports()
        self._price_compute_for(agents, reports)
        snapshot = ClusterSnapshot(
            models=self.config.models,
            agents=tuple(
                AgentView(
                    a.agent_id,
                    frozenset(d["index"] for d in a.devices),
                    usable_gpu_memory(a.agent_id, a.devices, reports),
                )
                for a in agents.values()
            ),
            demand=with_waiting(
                self.demand_memory.demand(
                    time.monotonic(),
                    engine_loads_from_reports(reports, {m.model_name: m.tp_size for m in self.config.models}),
                ),
                waiting_at_gateways(self.waiting.items.values()),
            ),
            weight_bytes={**self._estimated_weights, **reported_weight_bytes(reports)},
            current=current_placement(engines),
        )
        target = self.policy(snapshot, self.params)
        self.plans += 1
        self._planned_at = time.time()
        await self._publish_status()
        if not await self._write_placements(target):
            return  # fenced off or raced: act on nothing; the next plan reads etcd afresh
        now = time.monotonic()
        self._activated_at = still_held_off(self._activated_at, now)
        for action in plan_actions(
            target, engines, set(agents), self.manages_activity, held_off=frozenset(self._activated_at)
        ):
            key = (action.agent_id, action.model)
            if key in self._in_flight or self._retry_at.get(key, (0.0, 0.0))[0] > now:
                continue
            self._in_flight[key] = asyncio.create_task(self._execute(action, agents[action.agent_id].address))

    async def _execute(self, action: Action, address: str) -> None:
        key = (action.agent_id, action.model)
        stub = agent_pb2_grpc.AgentStub(self._channel(address))
        try:
            if action.kind == "load":
                spec = self.config.model(action.model)
                status = await stub.LoadModel(
                    agent_pb2.LoadModelRequest(
                        spec=model_spec(spec),
                        gpu_ids=list(action.gpu_ids),
                        activate=action.activate,
                        memory_limit_bytes=action.memory_limit_bytes,
                    ),
                    timeout=self.load_timeout_s,
                )
                if status.state == agent_pb2.ENGINE_STATE_FAILED:
                    raise RuntimeError(status.error)
                log.info(
                    "loaded %s on %s (%s)", action.model, action.agent_id, agent_pb2.EngineState.Name(status.state)
                )
            elif action.kind == "activate":
                await stub.ActivateModel(agent_pb2.ModelRequest(model=action.model), timeout=60)
                self._activated_at[key] = time.monotonic()
                log.info("activated %s on %s", action.model, action.agent_id)
            elif action.kind == "deactivate":
                status = await stub.DeactivateModel(
                    agent_pb2.ModelRequest(model=action.model, busy_window_s=action.busy_window_s), timeout=60
                )
                if status.state == agent_pb2.ENGINE_STATE_ACTIVE:  # it had requests our reports had not shown yet
                    log.info("%s on %s stays on: the agent saw recent requests", action.model, action.agent_id)
                    self._retry_at[key] = (time.monotonic() + KEPT_ON_RETRY_S, 1.0)  # the reports catch up meanwhile
                    return
                log.info("deactivated %s on %s", action.model, action.agent_id)
            else:
                # A drain returns at once; the agent unloads the engine once its requests have ended.
                status = await stub.UnloadModel(
                    agent_pb2.ModelRequest(model=action.model, force=not action.drain), timeout=60
                )
                if status.state == agent_pb2.ENGINE_STATE_DRAINING:
                    log.info(
                        "draining %s on %s: %d request(s) running, %d queued",
                        action.model,
                        action.agent_id,
                        status.running_requests,
                        status.queued_requests + status.admission_queued,
                    )
                else:
                    log.info("unloaded %s from %s", action.model, action.agent_id)
            self._retry_at.pop(key, None)
        except Exception as exc:  # the agent may be gone or the model broken: retry later, never crash the loop
            message = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            backoff = min(self._retry_at.get(key, (0.0, 1.0))[1] * 2, 60.0)
            self._retry_at[key] = (time.monotonic() + backoff, backoff)
            log.warning(
                "%s %s on %s failed: %s; retrying in %.0fs",
                action.kind,
                action.model,
                action.agent_id,
                message,
                backoff,
            )
        finally:
            self._in_flight.pop(key, None)
            self.wake.set()

    async def run(self) -> None:
        mirrors = [asyncio.create_task(m.run()) for m in (self.agents, self.engines, self.waiting)]
        try:
            await self.agents.ready.wait()
            await self.engines.ready.wait()
            await self.waiting.ready.wait()
            while True:
                self.wake.clear()
                try:
                    await self.replan()
                except Exception:
                    log.exception("re-planning failed; trying again")
                try:
                    await asyncio.wait_for(self.wake.wait(), self.interval_s)
                except TimeoutError:
                    pass
                await asyncio.sleep(REPLAN_COALESCE_S)
        finally:
            for task in [*mirrors, *self._in_flight.values()]:
                task.cancel()
            for channel in self._channels.values():
                await channel.close()


async def wait_for_agent_reports(etcd, service: SchedulerService, timeout_s: float) -> None:
    """Waits until every registered agent has sent this replica a load report,
    at most timeout_s: a new leader's first plan then sees the demand its
    predecessor saw, instead of switching off models that only look idle."""
    agents = {records.AgentRecord.from_json(kv.value).agent_id for kv in await etcd.get_prefix(records.AGENTS.encode())}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if agents <= {r.agent_id for r in service.fresh_reports()}:
            return
        await asyncio.sleep(0.05)
    log.warning(
        "no load report yet from %s; planning without", sorted(agents - {r.agent_id for r in service.fresh_reports()})
    )


async def serve(args: argparse.Namespace) -> None:
    config = placement_config.load(args.config)
    etcd = await connect(args.etcd, access=args.etcd_access)
    wake = asyncio.Event()
    service = SchedulerService(wake)
    service.leading = False  # until elected
    policy = args.policy or config.policy or "static"
    advertise = args.advertise or args.listen
    scheduler_id = args.scheduler_id or f"{socket.gethostname()}-{advertise.rsplit(':', 1)[-1]}"

    server = grpc.aio.server(options=[REUSE_NO_PORT])
    add_servicer(scheduler_pb2_grpc.add_SchedulerServicer_to_server, service, server)  # undecodable: INVALID_ARGUMENT
    health = add_health_and_reflection(server, [SERVICE_NAME])
    if add_port(server, args.listen, args.tls_files, require_client_cert=args.mtls) == 0:
        raise SystemExit(f"scheduler: cannot listen on {args.listen}")
    await server.start()
    await mark_not_serving(health, [SERVICE_NAME])
    log.info(
        "scheduler %s serving on %s (%s), policy %s, %d model(s)",
        scheduler_id,
        args.listen,
        transport_name(args.tls_files, args.mtls),
        policy,
        len(config.models),
    )

    async def on_role(role: str) -> None:
        service.leading = role == LEADER
        await (mark_serving if service.leading else mark_not_serving)(health, [SERVICE_NAME])

    async def lead() -> None:
        # A fresh loop each term: its mirrors, retries and in-flight actions end with the term.
        fence = (records.SCHEDULER_LEADER, election.leader.to_json()) if election.leader is not None else None
        params = PolicyParams(min_kv_fraction=args.min_kv_fraction, standby_replicas=args.standby_replicas)
        if args.compute is not None:
            params = dataclasses.replace(params, compute=args.compute)
        loop_ = PlacementLoop(
            config,
            etcd,
            policy,
            service,
            wake,
            args.replan_interval_s,
            args.load_timeout_s,
            params,
            fence=fence,
            tls=args.tls_files,
            compute_from_devices=args.compute is None,
            step_costs_from=args.step_costs_from,
            scheduler_id=scheduler_id,
            status_interval_s=args.status_interval_s,
        )
        await loop_.publish_registry()
        await wait_for_agent_reports(etcd, service, timeout_s=3 * service.report_interval_ms / 1000 + 1.0)
        await loop_.run()

    election = LeaderElection(etcd, scheduler_id, advertise, ttl_s=args.leader_ttl_s, on_role=on_role)
    task = asyncio.create_task(election.run(lead))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("scheduler stopping")
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    await election.resign()  # a standby takes over now, not when the lease runs out
    await server.stop(grace=2)
    await etcd.close()


def main(argv: list[str] | None = None) -> None:
    setup_logging("scheduler")
    args = parse_args(argv)
    try:
        asyncio.run(serve(args))
    except placement_config.ConfigError as exc:
        raise SystemExit(str(exc)) from None
    except EtcdLoginRefused as exc:
        raise SystemExit(f"scheduler: {exc}") from None


if __name__ == "__main__":
    main()
