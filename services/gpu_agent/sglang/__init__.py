"""The SGLang engine driver: the production engine path. Each placed model
runs as its own `python -m sglang.launch_server` process with kvcached
enabled through its environment; SGLangEngine drives it over HTTP behind the
same EngineHandle interface as the built-in engine (engine_handle.py).

One concept per module: launch (command line and environment), model_info
(KV geometry and weight size read from config.json), process (the server
process and its log), client (SGLang's HTTP API and its streaming format),
metrics (its Prometheus /metrics), kvcached_limit (the per-instance KV limit
in kvcached's shared-memory segment, with our revision semantics), driver
(SGLangEngine). See docs/sglang.md."""

from services.gpu_agent.sglang.driver import SGLangEngine
from services.gpu_agent.sglang.launch import SGLangLaunchConfig, build_command, build_env

__all__ = ["SGLangEngine", "SGLangLaunchConfig", "build_command", "build_env"]
