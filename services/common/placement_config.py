"""The placement config: which models to serve and where they start.

Compatible with the original Prism's file, a JSON (or YAML) list of models:

    [{"model_name": "model_1", "model_path": "meta-llama/Llama-3.2-1B", "tp_size": 1,
      "init_placements": [{"gpu_ids": [0], "on": true, "max_memory_pool_size": 15}]}]

The list may also be wrapped as {"models": [...], "policy": "prism"} to name
the scheduler's placement policy in the file (the --policy flag wins).
Every field, its type, default and meaning: MODEL_FIELDS, PLACEMENT_FIELDS and
SLO_FIELDS below (the parser accepts exactly those; docs/generate.py renders
them as docs/reference/config.md). A relative model_path is resolved against
the config file's folder. load() reports every problem at once, each with its
field's path (e.g. `[1].init_placements[0].gpu_ids`), rather than stopping at
the first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LOAD_FORMATS = ("auto", "dummy")
ENGINES = ("auto", "torch", "sglang")  # auto: sglang where a verified release is installed on a CUDA agent, else torch
DTYPES = ("auto", "float32", "float16", "bfloat16")
# The scheduler's placement policies (services/scheduler/policies/__init__.py POLICIES; a test keeps the two in step).
POLICY_NAMES = ("static", "dedicated", "time-share", "kvpr", "prism")
GB = 1 << 30


class ConfigError(ValueError):
    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s) in placement config:\n  " + "\n  ".join(errors))


@dataclass(frozen=True)
class InitPlacement:
    gpu_ids: tuple[int, ...]
    on: bool = True
    max_memory_pool_size_gb: float | None = None

    @property
    def memory_limit_bytes(self) -> int:
        return int(self.max_memory_pool_size_gb * GB) if self.max_memory_pool_size_gb else 0


@dataclass(frozen=True)
class ModelConfig:
    model_name: str
    model_path: str
    tp_size: int = 1
    init_placements: tuple[InitPlacement, ...] = ()
    load_format: str = "auto"
    engine: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    ttft_slo_ms: float | None = None  # None: the agent's default
    tpot_slo_ms: float | None = None
    priority: int = 1
    shed_load: bool = False
    max_context: int = 0  # 0: the model's own context length
    deterministic_inference: bool = False
    prefix_caching: bool = True


@dataclass(frozen=True)
class PlacementConfig:
    models: tuple[ModelConfig, ...] = field(default_factory=tuple)
    policy: str | None = None  # the scheduler's placement policy; None: its --policy (default static)

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.model_name == name:
                return m
        raise KeyError(name)


@dataclass(frozen=True)
class FieldDoc:
    """One field of the config, as its reference (docs/reference/config.md, generated) states it; the
    parser accepts exactly the fields these tables name."""

    name: str
    kind: str
    default: str  # "required", or the value taken when absent
    meaning: str


MODEL_FIELDS = (
    FieldDoc("model_name", "string", "required", "the name clients ask for; unique, no '/' or spaces"),
    FieldDoc(
        "model_path",
        "string",
        "required",
        "a folder with config.json (and safetensors weights unless "
        "load_format is dummy), or a .gguf file; relative paths are resolved against the config's folder",
    ),
    FieldDoc("tp_size", "integer >= 1", "1", "GPUs one engine of the model is split over (tensor parallelism)"),
    FieldDoc("init_placements", "list of placements", "required", "where the model starts (see below)"),
    FieldDoc(
        "load_format",
        " | ".join(LOAD_FORMATS),
        "auto",
        "auto: the folder's safetensors or the .gguf file; dummy: random weights from config.json alone",
    ),
    FieldDoc(
        "engine",
        " | ".join(ENGINES),
        "auto",
        "torch: the built-in engine; sglang: an SGLang server with "
        "kvcached; auto: SGLang on a CUDA agent where a verified release is installed, else torch",
    ),
    FieldDoc("dtype", " | ".join(DTYPES), "auto", "the weights' and activations' type (auto: the checkpoint's)"),
    FieldDoc("seed", "integer", "0", "the seed of dummy weights"),
    FieldDoc(
        "slo",
        "object",
        "the agent's defaults",
        "the latency targets the model's requests are admitted and judged against (see below)",
    ),
    FieldDoc("priority", "integer >= 1", "1", "the model's weight when models on a GPU contend for memory"),
    FieldDoc(
        "shed_load",
        "boolean",
        "false",
        "true: refuse with 429 a request that can no longer meet its TTFT, instead of serving it late",
    ),
    FieldDoc(
        "max_context",
        "integer >= 1",
        "the model's own",
        "the longest sequence (prompt and output) the "
        "engine accepts, at most the model's own; SGLang gets it as --context-length",
    ),
    FieldDoc(
        "deterministic_inference",
        "boolean",
        "false",
        "SGLang engines honour requests' seeds (--enable-deterministic-inference); the built-in engine always does",
    ),
    FieldDoc(
        "prefix_caching",
        "boolean",
        "true",
        "the built-in engine keeps the KV of full blocks of prompt "
        "and output for later requests that begin with the same tokens, given back first when memory is "
        "needed; false: every request computes its whole prompt",
    ),
)
SLO_FIELDS = (
    FieldDoc("ttft_ms", "number > 0", "1000", "time to the first token, milliseconds"),
    FieldDoc("tpot_ms", "number > 0", "100", "time per output token after the first, milliseconds"),
)
PLACEMENT_FIELDS = (
    FieldDoc(
        "gpu_ids",
        "list of integers >= 0",
        "required",
        "the GPUs of one engine, tp_size of them; the scheduler picks the agent",
    ),
    FieldDoc("on", "boolean", "true", "false: loaded switched off, switched on by its first request"),
    FieldDoc("max_memory_pool_size", "number > 0", "no cap", "the most KV memory, in GB, the engine may hold"),
)
_MODEL_FIELDS = {f.name for f in MODEL_FIELDS}
_SLO_FIELDS = {f.name for f in SLO_FIELDS}
_PLACEMENT_FIELDS = {f.name for f in PLACEMENT_FIELDS}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def choice(self, obj: dict, key: str, path: str, choices: tuple[str, ...], default: str) -> str:
        value = obj.get(key, default)
        if value not in choices:
            self.error(f"{path}.{key}", f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value


def parse(data: Any, base_dir: Path | None = None, source: str = "<config>") -> PlacementConfig:
    """Validates already-decoded config data; raises ConfigError listing every problem."""
    c = _Checker()
    policy = None
    if isinstance(data, dict) and "models" in data:  # also accept {"models": [...], "policy": "prism"}
        unknown = sorted(set(data) - {"models", "policy"})
        if unknown:
            raise ConfigError(source, [f"<root>.{k}: unknown field" for k in unknown])
        policy = data.get("policy")
        if policy is not None and policy not in POLICY_NAMES:
            raise ConfigError(source, [f"<root>.policy: must be one of {', '.join(POLICY_NAMES)}, got {policy!r}"])
        data = data["models"]
    if not isinstance(data, list):
        raise ConfigError(source, ["<root>: must be a list of models"])
    if not data:
        raise ConfigError(source, ["<root>: lists no models"])
    models: list[ModelConfig] = []
    seen_names: set[str] = set()
    for i, entry in enumerate(data):
        p = f"[{i}]"
        if not isinstance(entry, dict):
            c.error(p, "must be an object")
            continue
        for unknown in sorted(set(entry) - _MODEL_FIELDS):
            c.error(f"{p}.{unknown}", "unknown field")
        name = entry.get("model_name")
        if not isinstance(name, str) or not name.strip():
            c.error(f"{p}.model_name", "required, a non-empty string")
            name = f"<model {i}>"
        elif "/" in name or any(ch.isspace() for ch in name):
            c.error(f"{p}.model_name", f"must not contain '/' or spaces, got {name!r}")
        elif name in seen_names:
            c.error(f"{p}.model_name", f"duplicate model name {name!r}")
        seen_names.add(name)
        path = entry.get("model_path")
        if not isinstance(path, str) or not path.strip():
            c.error(f"{p}.model_path", "required, a non-empty string")
            path = ""
        elif base_dir is not None and not Path(path).is_absolute() and (base_dir / path).exists():
            path = str((base_dir / path).resolve())
        tp = entry.get("tp_size", 1)
        if not _is_int(tp) or tp < 1:
            c.error(f"{p}.tp_size", f"must be an integer >= 1, got {tp!r}")
            tp = 1
        seed = entry.get("seed", 0)
        if not _is_int(seed):
            c.error(f"{p}.seed", f"must be an integer, got {seed!r}")
            seed = 0
        placements = _parse_placements(c, entry.get("init_placements"), f"{p}.init_placements", tp)
        ttft_ms, tpot_ms = _parse_slo(c, entry.get("slo"), f"{p}.slo")
        priority = entry.get("priority", 1)
        if not _is_int(priority) or priority < 1:
            c.error(f"{p}.priority", f"must be an integer >= 1, got {priority!r}")
            priority = 1
        shed_load = entry.get("shed_load", False)
        if not isinstance(shed_load, bool):
            c.error(f"{p}.shed_load", f"must be true or false, got {shed_load!r}")
            shed_load = False
        max_context = entry.get("max_context")  # absent (or null): the model's own, kept as 0
        if max_context is None:
            max_context = 0
        elif not _is_int(max_context) or max_context < 1:
            c.error(
                f"{p}.max_context",
                f"must be an integer >= 1 (tokens; leave it out for the model's own "
                f"context length), got {max_context!r}",
            )
            max_context = 0
        deterministic = entry.get("deterministic_inference", False)
        if not isinstance(deterministic, bool):
            c.error(f"{p}.deterministic_inference", f"must be true or false, got {deterministic!r}")
            deterministic = False
        prefix_caching = entry.get("prefix_caching", True)
        if not isinstance(prefix_caching, bool):
            c.error(f"{p}.prefix_caching", f"must be true or false, got {prefix_caching!r}")
            prefix_caching = True
        models.append(
            ModelConfig(
                model_name=name,
                model_path=path,
                tp_size=tp,
                init_placements=placements,
                load_format=c.choice(entry, "load_format", p, LOAD_FORMATS, "auto"),
                engine=c.choice(entry, "engine", p, ENGINES, "auto"),
                dtype=c.choice(entry, "dtype", p, DTYPES, "auto"),
                seed=seed,
                ttft_slo_ms=ttft_ms,
                tpot_slo_ms=tpot_ms,
                priority=priority,
                shed_load=shed_load,
                max_context=max_context,
                deterministic_inference=deterministic,
                prefix_caching=prefix_caching,
            )
        )
    if c.errors:
        raise ConfigError(source, c.errors)
    return PlacementConfig(models=tuple(models), policy=policy)


def _parse_slo(c: _Checker, raw: Any, path: str) -> tuple[float | None, float | None]:
    if raw is None:
        return None, None
    if not isinstance(raw, dict):
        c.error(path, f'must be an object like {{"ttft_ms": 1000, "tpot_ms": 100}}, got {raw!r}')
        return None, None
    for unknown in sorted(set(raw) - _SLO_FIELDS):
        c.error(f"{path}.{unknown}", "unknown field")
    out: list[float | None] = []
    for key in ("ttft_ms", "tpot_ms"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            c.error(f"{path}.{key}", f"must be a positive number of milliseconds, got {value!r}")
            value = None
        out.append(float(value) if value is not None else None)
    return out[0], out[1]


def _parse_placements(c: _Checker, raw: Any, path: str, tp_size: int) -> tuple[InitPlacement, ...]:
    if raw is None:
        c.error(path, "required, a list of placements")
        return ()
    if not isinstance(raw, list) or not raw:
        c.error(path, "must be a non-empty list")
        return ()
    out: list[InitPlacement] = []
    for j, pl in enumerate(raw):
        pp = f"{path}[{j}]"
        if not isinstance(pl, dict):
            c.error(pp, "must be an object")
            continue
        # YAML 1.1 reads an unquoted `on:` key as the boolean true.
        pl = {("on" if k is True else k): v for k, v in pl.items()}
        for unknown in sorted(set(pl) - _PLACEMENT_FIELDS):
            c.error(f"{pp}.{unknown}", "unknown field")
        gpu_ids = pl.get("gpu_ids")
        if not isinstance(gpu_ids, list) or not gpu_ids or not all(_is_int(g) and g >= 0 for g in gpu_ids):
            c.error(f"{pp}.gpu_ids", f"must be a non-empty list of GPU indices >= 0, got {gpu_ids!r}")
            gpu_ids = []
        elif len(set(gpu_ids)) != len(gpu_ids):
            c.error(f"{pp}.gpu_ids", f"lists a GPU twice: {gpu_ids}")
        elif len(gpu_ids) != tp_size:
            c.error(f"{pp}.gpu_ids", f"has {len(gpu_ids)} GPU(s) but tp_size is {tp_size}")
        on = pl.get("on", True)
        if not isinstance(on, bool):
            c.error(f"{pp}.on", f"must be true or false, got {on!r}")
            on = True
        pool = pl.get("max_memory_pool_size")
        if pool is not None and (isinstance(pool, bool) or not isinstance(pool, (int, float)) or pool <= 0):
            c.error(f"{pp}.max_memory_pool_size", f"must be a positive number of GB, got {pool!r}")
            pool = None
        out.append(InitPlacement(gpu_ids=tuple(gpu_ids), on=on, max_memory_pool_size_gb=pool))
    return tuple(out)


def load(path: str | Path) -> PlacementConfig:
    """Reads a .json, .yaml or .yml placement config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [f"<file>: cannot read: {exc.strerror}"]) from exc
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            str(path), [f"<file>: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}"]
        ) from exc
    return parse(data, base_dir=path.parent, source=str(path))
