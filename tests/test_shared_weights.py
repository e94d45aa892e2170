"""Host weights in a named shared-memory file: the first engine writes them,
a later one (another process in production: a worker replacing a dead one)
maps them instead of loading the model, and outputs stay those of the model.
The cross-process path (worker processes, an agent's EngineManager) is in
test_worker_pool.py; on a GPU the mapped copy is pinned with cudaHostRegister
(bench/warm_start.py measures it there)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
import torch

from prism.tiny_models import write_tiny_model
from services.gpu_agent.engine import Engine, GenerationRequest
from services.gpu_agent.engine.host_weights import HostWeights
from services.gpu_agent.engine.model_config import load_model_config
from services.gpu_agent.engine.shared_weights import (
    SharedWeightsFile,
    remove_shared_weights,
    shared_weights_name,
)
from services.gpu_agent.engine.weights import build_empty_model, load_model
from tests.reference_llama import ReferenceLlama

PROMPTS = ["Hello world", "The cache of the model is", "1 2 3 4 5 6 7 8"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shared-weights")
    return {arch: write_tiny_model(root / arch, arch=arch) for arch in ("llama", "qwen2")}


def loaded(model_dir: Path):
    return load_model(load_model_config(model_dir), model_dir, "auto", torch.float32, "cpu", 0)


def skeleton(model_dir: Path):
    return build_empty_model(load_model_config(model_dir), torch.float32, "cpu")


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_skeleton_attached_to_the_written_copy_holds_the_models_weights(model_dirs, tmp_path):
    shared = SharedWeightsFile(tmp_path / "m.weights")
    model = loaded(model_dirs["llama"])
    expected = state(model)
    written = HostWeights(model, shared, pin=False)
    assert written.shared and shared.path.stat().st_size == written.nbytes and shared.marker.exists()

    other = skeleton(model_dirs["llama"])
    attached = HostWeights.attach(other, shared, pin=False)
    assert attached is not None and attached.shared and attached.nbytes == written.nbytes
    got = other.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    # Both map the same bytes: a change through one is seen through the other.
    written.to_host()  # the writer's parameters point at its host copy
    name = "model.norm.weight"
    written_view = dict(model.named_parameters())[name]
    written_view.data[0] = 42.0
    assert dict(other.named_parameters())[name][0].item() == 42.0


def test_attaching_needs_a_complete_copy_of_the_same_layout(model_dirs, tmp_path):
    shared = SharedWeightsFile(tmp_path / "m.weights")
    assert HostWeights.attach(skeleton(model_dirs["llama"]), shared, pin=False) is None  # nothing there
    HostWeights(loaded(model_dirs["llama"]), shared, pin=False)
    # Another model's layout does not match the copy.
    assert HostWeights.attach(skeleton(model_dirs["qwen2"]), shared, pin=False) is None
    # Without the marker (a writer still at work, or dead mid-write) the copy is not used,
    # and a second writer keeps a private copy instead of touching it.
    shared.marker.unlink()
    assert HostWeights.attach(skeleton(model_dirs["llama"]), shared, pin=False) is None
    private = HostWeights(loaded(model_dirs["llama"]), shared, pin=False)
    assert not private.shared and not shared.marker.exists()


def test_no_room_for_the_copy_keeps_a_private_one(model_dirs, tmp_path, monkeypatch):
    # A full tmpfs cannot be made without root here; its answer to fallocate is stood in for.
    def fallocate_on_a_full_tmpfs(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", fallocate_on_a_full_tmpfs)
    shared = SharedWeightsFile(tmp_path / "m.weights")
    model = loaded(model_dirs["llama"])
    expected = state(model)
    host = HostWeights(model, shared, pin=False)
    assert not host.shared and not shared.path.exists()
    host.to_host()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


async def test_a_second_engine_maps_the_first_ones_copy_and_gives_the_same_tokens(model_dirs, tmp_path):
    path = tmp_path / "llama.weights"
    ref = ReferenceLlama(model_dirs["llama"])
    first = Engine(model_dirs["llama"], shared_weights_path=path)
    second = None
    try:
        assert first.weights_shared and not first.weights_attached and path.exists()
        second = Engine(model_dirs["llama"], shared_weights_path=path)
        assert second.weights_shared and second.weights_attached
        for engine in (first, second):
            engine.start()
            reqs = [
                GenerationRequest(request_id=f"s{i}", prompt=p, max_tokens=8, temperature=0.0, ignore_eos=True)
                for i, p in enumerate(PROMPTS)
            ]
            outs = await asyncio.gather(*(collect(engine, r) for r in reqs))
            for req, out in zip(reqs, outs):
                assert out == ref.greedy(engine.tokenize_prompt(req), 8), req.request_id
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def collect(engine: Engine, req: GenerationRequest) -> list[int]:
    return [t async for out in engine.generate(req) for t in out.token_ids]


def test_the_name_changes_with_what_changes_the_bytes(model_dirs, tmp_path):
    model = str(model_dirs["llama"])
    base = shared_weights_name("p", model, "auto", "auto", 0, "cuda")
    assert base == shared_weights_name("p", model, "auto", "auto", 0, "cuda")
    others = {
        shared_weights_name("p", model, "dummy", "auto", 0, "cuda"),
        shared_weights_name("p", model, "auto", "bfloat16", 0, "cuda"),
        shared_weights_name("p", model, "dummy", "auto", 1, "cuda"),
        shared_weights_name("p", model, "auto", "auto", 0, "cpu"),
        shared_weights_name("q", model, "auto", "auto", 0, "cuda"),
    }
    assert base not in others and len(others) == 5
    # A checkpoint replaced on disk gets a new copy.
    weights = model_dirs["llama"] / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        assert shared_weights_name("p", model, "auto", "auto", 0, "cuda") != base
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_removing_an_agents_leftovers_spares_other_files(tmp_path):
    for name in (
        "prism-aa-1.weights",
        "prism-aa-1.weights.json",
        "prism-aa-2.weights",
        "prism-bb-1.weights",
        "other.txt",
    ):
        (tmp_path / name).write_bytes(b"x")
    assert remove_shared_weights(tmp_path, "prism-aa") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt", "prism-bb-1.weights"]


def test_a_directory_on_disk_is_refused_for_gpu_pinning_and_dev_shm_is_accepted(tmp_path):
    from services.gpu_agent.engine.shared_weights import check_shared_dir, filesystem_type

    with pytest.raises(ValueError, match="does not exist"):
        check_shared_dir(tmp_path / "missing")
    if Path("/dev/shm").is_dir() and filesystem_type(Path("/dev/shm")) is not None:
        check_shared_dir(Path("/dev/shm"))
        assert filesystem_type(Path("/dev/shm")) == "tmpfs"
    if filesystem_type(tmp_path) not in (None, "tmpfs", "ramfs", "hugetlbfs"):
        with pytest.raises(ValueError, match="not in memory"):
            check_shared_dir(tmp_path)
