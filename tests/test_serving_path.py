"""How an engine serves is said, never silent (issue 22): the built-in engine's pool, attention and CUDA
graphs, an SGLang server's from its launch arguments, and which of them is the slow path on CUDA."""

from __future__ import annotations

from prism.tiny_models import write_tiny_model
from services.gpu_agent.engine import Engine
from services.gpu_agent.engine.request import ServingPath
from services.gpu_agent.sglang.driver import sglang_serving_path
from services.gpu_agent.sglang.launch import SGLangLaunchConfig


def test_the_page_pool_on_cuda_without_graphs_is_the_slow_path_and_nothing_else_is():
    assert ServingPath("pages", "torch", False).slow_on("cuda:0")
    assert ServingPath("pages", "triton", False).slow_on("cuda:0")
    assert not ServingPath("pages", "triton", True).slow_on("cuda:0")  # graphs run on the page pool too
    assert not ServingPath("pages", "torch", False).slow_on("cpu")
    assert not ServingPath("kvcached", "triton", True).slow_on("cuda:0")
    assert not ServingPath("kvcached", "triton", True).slow_on("cuda:1")


def test_a_cpu_engine_says_it_runs_the_page_pool_with_torch_attention(tmp_path):
    engine = Engine(write_tiny_model(tmp_path / "llama", arch="llama"))
    try:
        assert engine.serving_path == ServingPath("pages", "torch", False)
    finally:
        engine.stop()


def test_an_sglang_servers_path_comes_from_its_launch_arguments():
    config = SGLangLaunchConfig(model_path="/m", name="m", gpu_ids=(0,), extra_args=("--attention-backend", "triton"))
    assert sglang_serving_path(config, kvcached=True) == ServingPath("kvcached", "triton", True)
    plain = SGLangLaunchConfig(model_path="/m", name="m", gpu_ids=(0,), extra_args=("--disable-cuda-graph",))
    assert sglang_serving_path(plain, kvcached=False) == ServingPath("sglang", "sglang", False)
