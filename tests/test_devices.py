"""Which devices an agent offers, and how much memory it plans each with."""

from __future__ import annotations

import pytest

from services.gpu_agent.devices import GB, discover_devices, gpu_memory_bytes


def test_a_gpu_memory_cap_plans_the_card_as_the_smaller_one_and_never_as_more_than_it_has():
    h200, h100 = 150_109_323_264, 85_017_493_504
    assert gpu_memory_bytes(h200, 0) == h200  # no cap: the whole card
    assert gpu_memory_bytes(h200, 79.18) == int(79.18 * GB)  # an H200 run as an H100
    assert gpu_memory_bytes(h100, 141) == h100  # a cap above the card changes nothing


def test_the_cpu_device_keeps_its_budget_and_a_negative_gpu_cap_is_refused():
    (cpu,) = discover_devices("cpu", cpu_memory_gb=2.0, gpu_memory_gb=79.0)
    assert (cpu.kind, cpu.memory_bytes) == ("cpu", 2 * GB)
    with pytest.raises(ValueError, match="gpu memory must be positive"):
        discover_devices("cpu", gpu_memory_gb=-1)
