"""Which paths an agent loads models from. LoadModel names a path on the
agent's host; without a bound, anyone who can reach the agent (or write a
placement) can make it read any file there. With `--model-root` given (once
or more), a model whose path, symlinks resolved, is not inside one of the
roots is refused before anything is read (PERMISSION_DENIED, saying which
roots there are); without any root every path is taken, as before, and the
agent says so at start."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def resolved_roots(roots: Sequence[str | Path]) -> tuple[Path, ...]:
    """The roots as absolute, symlink-free paths (a root that does not exist yet still bounds)."""
    return tuple(Path(root).expanduser().resolve() for root in roots)


def refusal(path: str, roots: Sequence[Path]) -> str | None:
    """Why `path` may not be loaded from, or None when it may (no roots: any path may)."""
    if not roots:
        return None
    real = Path(path).expanduser().resolve()
    if any(real == root or real.is_relative_to(root) for root in roots):
        return None
    shown = f" ({real})" if str(real) != path else ""
    return (
        f"model path {path}{shown} is outside this agent's model roots ({', '.join(map(str, roots))}): "
        "put the model under one, or start the agent with a --model-root that covers it"
    )
