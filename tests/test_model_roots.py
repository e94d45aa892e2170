"""An agent started with --model-root loads models only from under those
folders (services/gpu_agent/model_roots.py): LoadModel of any other path,
or of one that leaves a root through `..` or a symlink, is refused with
PERMISSION_DENIED naming the roots, before anything is read; a model under a
root loads and serves. Without a root every path loads, as before."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from in_process_agent import InProcessAgent

from prism.tiny_models import write_tiny_model
from prism_client.v1 import agent_pb2
from services.gpu_agent.model_roots import refusal, resolved_roots


def test_a_path_is_judged_with_symlinks_and_dots_resolved(tmp_path):
    inside, outside = tmp_path / "models", tmp_path / "elsewhere"
    (inside / "m").mkdir(parents=True)
    (outside / "m").mkdir(parents=True)
    os.symlink(outside / "m", inside / "link")
    roots = resolved_roots([inside])
    assert refusal(str(inside / "m"), roots) is None
    assert refusal(str(inside), roots) is None
    assert "outside this agent's model roots" in refusal(str(outside / "m"), roots)
    assert refusal(str(inside / ".." / "elsewhere" / "m"), roots) is not None
    assert refusal(str(inside / "link"), roots) is not None  # the link leads out
    assert refusal("/etc/passwd", ()) is None  # no roots: no bound
    assert refusal(str(outside / "m"), resolved_roots([inside, outside])) is None


async def test_the_agent_refuses_a_model_outside_its_roots_and_loads_one_inside(tmp_path):
    inside = write_tiny_model(tmp_path / "models" / "tiny")
    outside = write_tiny_model(tmp_path / "elsewhere" / "tiny")
    async with InProcessAgent(model_roots=resolved_roots([tmp_path / "models"])) as agent:

        def load(name: str, path: Path):
            return agent.stub.LoadModel(
                agent_pb2.LoadModelRequest(
                    spec=agent_pb2.ModelSpec(name=name, path=str(path)), gpu_ids=[0], activate=True
                ),
                timeout=120,
            )

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await load("outside", outside)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "outside this agent's model roots" in refused.value.details()
        assert str(tmp_path / "models") in refused.value.details()
        assert "outside" not in agent.manager.engines  # nothing was loaded
        status = await load("inside", inside)
        assert status.state == agent_pb2.ENGINE_STATE_ACTIVE, status
