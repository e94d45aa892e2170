"""The committed stubs in clients/python/prism_client/v1 must be what the .proto files generate."""

from __future__ import annotations

import filecmp

from prism import protogen


def test_generated_stubs_are_current(tmp_path):
    protogen.generate(tmp_path)
    fresh = tmp_path
    committed = protogen.STUBS
    generated = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert generated, "protoc produced nothing"
    stale = [name for name in generated if not filecmp.cmp(fresh / name, committed / name, shallow=False)]
    missing = [name for name in generated if not (committed / name).exists()]
    assert not missing and not stale, (
        f"stubs out of date (missing {missing}, differing {stale}); run `python -m prism.protogen` and commit"
    )
    extra = sorted(p.name for p in committed.glob("*_pb2*") if p.name not in generated)
    assert not extra, f"stubs without a .proto: {extra}"


def test_every_service_has_its_rpcs():
    from prism_client.v1 import agent_pb2, engine_worker_pb2, gateway_pb2, scheduler_pb2

    rpcs = {
        s.full_name: {m.name for m in s.methods}
        for module in (agent_pb2, engine_worker_pb2, gateway_pb2, scheduler_pb2)
        for s in module.DESCRIPTOR.services_by_name.values()
    }
    assert rpcs["prism.v1.Gateway"] == {"Generate", "ListModels"}
    assert {"Generate", "GetStatus", "LoadModel", "ActivateModel", "DeactivateModel", "SetMemoryLimit"} <= rpcs[
        "prism.v1.Agent"
    ]
    assert rpcs["prism.v1.Scheduler"] == {"RegisterAgent", "StreamLoadReports"}
    assert rpcs["prism.v1.EngineWorker"] == {
        "Info",
        "Load",
        "Generate",
        "SetMemoryLimit",
        "Activate",
        "Deactivate",
        "Stats",
        "Shutdown",
    }
