"""The built-in PyTorch engine (Llama and Qwen2 decoders)."""

from services.gpu_agent.engine.engine import Engine
from services.gpu_agent.engine.errors import CapacityError, EngineError, EngineInactiveError, InvalidRequestError
from services.gpu_agent.engine.model_config import ModelConfig, ModelConfigError, load_model_config
from services.gpu_agent.engine.request import EngineStats, GenerationOutput, GenerationRequest
from services.gpu_agent.engine.tokenizer import Tokenizer

__all__ = [
    "CapacityError",
    "Engine",
    "EngineError",
    "EngineInactiveError",
    "EngineStats",
    "GenerationOutput",
    "GenerationRequest",
    "InvalidRequestError",
    "ModelConfig",
    "ModelConfigError",
    "Tokenizer",
    "load_model_config",
]
