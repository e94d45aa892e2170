"""Building the model and filling its weights: from Hugging Face safetensors
(one file or sharded with model.safetensors.index.json), from a GGUF file
(dequantized, gguf_file.py), or random from the config alone ("dummy", seeded,
for tests and benchmarks).

The model is built on the meta device and materialized with to_empty, so no
time goes into a random init that the checkpoint overwrites anyway. Split over
tensor-parallel ranks, each rank builds and fills only its shard
(tensor_parallel.shard_of cuts every tensor the same way for both sources)."""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

from services.gpu_agent.engine.errors import EngineError
from services.gpu_agent.engine.gguf_file import GGUFModelFile
from services.gpu_agent.engine.model import CausalLM, RMSNorm
from services.gpu_agent.engine.model_config import ModelConfig
from services.gpu_agent.engine.rotary import RotaryEmbedding
from services.gpu_agent.engine.tensor_parallel import SINGLE, TensorParallel, check_divisible, full_shape, shard_of

log = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    """ "auto": the checkpoint's dtype on accelerators, float32 on the CPU
    (CPU half-precision matmuls are slow and inexact)."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(str(config.torch_dtype), torch.bfloat16)
    if dtype not in _DTYPES:
        raise EngineError(f"dtype {dtype!r} is not supported (supported: auto, {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def use_device_on_this_thread(device: torch.device) -> None:
    """Makes `device` the calling thread's current CUDA device (each thread starts on
    device 0). Torch's own ops follow their tensors' device, but Triton launches its
    kernels on the current one: an engine on cuda:2 stepping on a fresh thread failed
    with "Pointer argument cannot be accessed from Triton" until it said so."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


class WeightsError(RuntimeError):
    pass


def build_empty_model(
    config: ModelConfig, dtype: torch.dtype, device: str | torch.device, tp: TensorParallel = SINGLE
) -> CausalLM:
    check_divisible(config, tp.size)
    with torch.device("meta"):
        model = CausalLM(config, dtype, tp)
    model = model.to_empty(device=device)
    model.tie_weights()
    model.model.rotary.reset_parameters()
    model.eval()
    model.requires_grad_(False)
    return model


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors weights in {model_dir} (use load_format 'dummy' for random weights)")
    return files


def _ignored(name: str, config: ModelConfig) -> bool:
    # Old checkpoints store RoPE frequencies; tied checkpoints may store lm_head too.
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def load_safetensors(model: CausalLM, model_dir: Path) -> None:
    params = dict(model.named_parameters())  # tied lm_head.weight appears once, as the embedding
    loaded: set[str] = set()
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if _ignored(name, model.config):
                    continue
                param = params.get(name)
                if param is None:
                    log.warning("%s: ignoring unexpected tensor %s", path.name, name)
                    continue
                tensor = shard_of(name, f.get_tensor(name), model.tp)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise WeightsError(
                        f"{path.name}: {name} has shape {tuple(tensor.shape)}, the config needs {tuple(param.shape)}"
                    )
                param.copy_(tensor)
                loaded.add(name)
    _check_complete(params, loaded, f"checkpoint in {model_dir}")


def _check_complete(params: dict[str, torch.nn.Parameter], loaded: set[str], source: str) -> None:
    """Raises naming the first parameters `source` did not fill."""
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightsError(f"{source} lacks {shown}")


def load_gguf(model: CausalLM, source: GGUFModelFile) -> None:
    """A GGUF file's tensors, dequantized one at a time, into the model (gguf_file.py)."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in source.tensors(model.config):
        param = params.get(name)
        if param is None:
            if _ignored(name, model.config):
                continue
            raise WeightsError(f"{source.path.name}: tensor {name} has no place in a {model.config.architecture}")
        if tuple(tensor.shape) != tuple(param.shape):
            raise WeightsError(
                f"{source.path.name}: {name} has shape {tuple(tensor.shape)}, "
                f"the file's metadata needs {tuple(param.shape)}"
            )
        param.copy_(tensor)
        loaded.add(name)
    _check_complete(params, loaded, str(source.path))


def init_dummy(model: CausalLM, seed: int) -> None:
    """Deterministic random weights: normal(0, initializer_range) matrices,
    zero biases, unit norms, as Hugging Face initializes these models. Each
    matrix is drawn whole from a generator seeded by `seed` and its name, then
    cut to this rank's shard: a model's shards are slices of its unsplit weights."""
    device = next(model.parameters()).device
    std = model.config.initializer_range
    tied = model.lm_head if model.config.tie_word_embeddings else None
    for module_name, module in model.named_modules():
        if isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, RotaryEmbedding) or module is tied:
            continue
        elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            name = f"{module_name}.weight"
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if model.tp.size == 1:
                module.weight.normal_(0.0, std, generator=generator)
            else:
                shape = full_shape(name, module.weight.shape, model.tp, model.config.vocab_size)
                full = torch.empty(shape, dtype=module.weight.dtype, device=device)
                module.weight.copy_(shard_of(name, full.normal_(0.0, std, generator=generator), model.tp))
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias.zero_()


def load_model(
    config: ModelConfig,
    model_dir: Path,
    load_format: str,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int,
    tp: TensorParallel = SINGLE,
    gguf: GGUFModelFile | None = None,
) -> CausalLM:
    """Weights from files are read into host memory first (the engine moves
    them on activation); random ones are made directly on `device`. gguf: the
    open file when model_dir names a GGUF file (its weights are that file's)."""
    if load_format not in LOAD_FORMATS:
        raise WeightsError(f"load_format {load_format!r} is not supported (supported: {', '.join(LOAD_FORMATS)})")
    if gguf is not None and load_format not in ("auto", "gguf", "dummy"):
        raise WeightsError(f"{model_dir} is a GGUF file: load_format {load_format!r} does not read it (use auto)")
    if gguf is None and load_format == "gguf":
        raise WeightsError(f"load_format 'gguf' needs a .gguf model_path, got {model_dir}")
    with torch.no_grad():
        if load_format == "dummy":
            model = build_empty_model(config, dtype, device, tp)
            init_dummy(model, seed)
            return model
        model = build_empty_model(config, dtype, "cpu", tp)
        if gguf is not None:
            if tp.size > 1:
                raise WeightsError(f"{model_dir}: a GGUF model runs unsplit (tp_size 1)")
            load_gguf(model, gguf)
        else:
            load_safetensors(model, model_dir)
        return model
