"""Placement policies: pure functions from a cluster snapshot to the target
placement. The scheduler loop and the simulator call the same code.

A snapshot holds the agents and their GPUs (with memory), the configured
models with their weight sizes, each model's recent demand from the load
reports, and the current placement (what the agents run). A placement maps
each model to its replicas: an agent, the GPUs of one engine, and whether the
engine is active (weights and KV on the GPU) or inactive (weights in host
memory, switched back on by its first request, or by the scheduler).

Policies (`POLICIES`, chosen by `--policy`), one module each, which says more:
- `static` (static.py): the config's init_placements, never changed.
- `dedicated` (dedicated.py): each model on GPU sets of its own, always active.
- `time-share` (time_share.py): every model placed, at most one active per GPU.
- `kvpr` (kvpr.py): the original Prism's placement heuristic (KV pressure
  ratio), kept as the baseline that `prism` is measured against.
- `prism` (prism.py): demand- and compute-aware sharing: models with demand
  share GPUs as far as their memory and compute loads fit, replicated when
  one GPU is not enough, shed when the GPUs are short.

The rest: snapshot.py (the snapshot and placement types, PolicyParams),
compute.py (the compute-cost model, compute_load), gpu_sets.py (the GPU sets
and model homes the policies share). A new policy is a module with a function
`(ClusterSnapshot, PolicyParams) -> Placement` and one line in `_REGISTERED`.
"""

from services.scheduler.policies.compute import (
    DEFAULT_TPOT_S,
    H100_COMPUTE_COSTS,
    H200_COMPUTE_COSTS,
    ComputeCosts,
    StepCost,
    by_weight,
    compute_costs_for,
    compute_costs_from_profile,
    compute_load,
)
from services.scheduler.policies.dedicated import dedicated_policy
from services.scheduler.policies.kvpr import kvpr_policy
from services.scheduler.policies.prism import prism_policy
from services.scheduler.policies.snapshot import (
    AgentView,
    ClusterSnapshot,
    GpuKey,
    ModelDemand,
    Placement,
    Policy,
    PolicyParams,
    ReplicaTarget,
    with_waiting,
)
from services.scheduler.policies.static import static_policy
from services.scheduler.policies.time_share import time_share_policy

# name (--policy), policy, whether its target switches engines on and off (static leaves that to
# demand at the agents); in the order --policy lists them.
_REGISTERED: tuple[tuple[str, Policy, bool], ...] = (
    ("static", static_policy, False),
    ("dedicated", dedicated_policy, True),
    ("time-share", time_share_policy, True),
    ("kvpr", kvpr_policy, True),
    ("prism", prism_policy, True),
)

POLICIES: dict[str, Policy] = {name: policy for name, policy, _ in _REGISTERED}

# Policies whose target switches engines on and off (static leaves that to demand at the agents).
MANAGES_ACTIVITY = frozenset(name for name, _, manages_activity in _REGISTERED if manages_activity)

__all__ = [
    "DEFAULT_TPOT_S",
    "H100_COMPUTE_COSTS",
    "H200_COMPUTE_COSTS",
    "MANAGES_ACTIVITY",
    "POLICIES",
    "AgentView",
    "ClusterSnapshot",
    "ComputeCosts",
    "GpuKey",
    "ModelDemand",
    "Placement",
    "Policy",
    "PolicyParams",
    "ReplicaTarget",
    "StepCost",
    "by_weight",
    "compute_costs_for",
    "compute_costs_from_profile",
    "compute_load",
    "dedicated_policy",
    "kvpr_policy",
    "prism_policy",
    "static_policy",
    "time_share_policy",
    "with_waiting",
]
