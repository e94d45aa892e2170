"""Joined projections (model.py): where the weights lie back to back in one
buffer, as HostWeights packs them on a GPU, one matmul replaces two or three;
the result must equal the separate matmuls."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from services.gpu_agent.engine.model import MLP, JoinedWeights, rows_back_to_back


def pack_into_one_buffer(module: nn.Module) -> torch.Tensor:
    """Rebinds the module's parameters to views of one flat buffer, in order."""
    params = list(module.parameters())
    buffer = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype)
    at = 0
    for p in params:
        view = buffer[at : at + p.numel()].view(p.shape)
        view.copy_(p.data)
        p.data = view
        at += p.numel()
    return buffer


def test_rows_back_to_back_only_for_adjacent_tensors():
    buffer = torch.arange(24.0)
    a, b = buffer[:8].view(2, 4), buffer[8:20].view(3, 4)
    joined = rows_back_to_back([a, b])
    assert joined is not None and joined.shape == (5, 4) and torch.equal(joined, torch.cat([a, b]))
    assert joined.data_ptr() == a.data_ptr()  # a view, no copy
    assert rows_back_to_back([b, a]) is None  # out of order
    assert rows_back_to_back([a, buffer[12:20].view(2, 4)]) is None  # a gap
    assert rows_back_to_back([a, torch.zeros(2, 4)]) is None  # another storage


def test_joined_mlp_equals_separate_and_follows_moved_weights():
    config = SimpleNamespace(hidden_size=16, intermediate_size=40, mlp_bias=False)  # what MLP reads
    torch.manual_seed(0)
    mlp = MLP(config, torch.float32)
    for p in mlp.parameters():
        nn.init.normal_(p)
    x = torch.randn(3, 16)
    separate = mlp(x)
    assert mlp._gate_up.get() is None  # three storages: no join
    pack_into_one_buffer(mlp)
    assert mlp._gate_up.get() is not None
    torch.testing.assert_close(mlp(x), separate)
    for p in mlp.parameters():  # moved (as on deactivation): found again, or not, from the new addresses
        p.data = p.data.clone()
    assert mlp._gate_up.get() is None
    torch.testing.assert_close(mlp(x), separate)


def test_joined_weights_not_used_with_biases():
    a, b = nn.Linear(4, 2), nn.Linear(4, 2)
    assert JoinedWeights(a, b).get() is None
