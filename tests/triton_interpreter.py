"""Running Triton kernels in tests without a GPU: TRITON_INTERPRET=1 while
triton and a kernel module are imported and while their tests run, restored
afterwards so it does not leak into other tests. triton reads it when it
decorates a kernel (its own library functions, tl.max, tl.sum..., on first
import) and again at launch."""

from __future__ import annotations

import contextlib
import os

import torch

ON_CUDA = torch.cuda.is_available()


@contextlib.contextmanager
def interpreter_env():
    previous = os.environ.get("TRITON_INTERPRET")
    if not ON_CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
