"""Shared fixtures. `cluster` is a real local cluster: etcd, scheduler, one
agent and the gateway as separate processes on loopback, serving the two
tiny generated models (`prism up`'s own default, with the real SmolLM2, is
tests/test_real_model.py's). It is started once per session."""

from __future__ import annotations

import pytest

from prism.cluster import LocalCluster
from services.common.etcd_server import free_port
from tests.tiers import TIERS

# The gateway tests' fixtures (gateway_stack, fake_agent, echo_model), for every module that asks for them.
pytest_plugins = ("test_gateway_support",)


def pytest_collection_modifyitems(config, items):
    """Marks each test with its module's tier (tests/tiers.py): `pytest -m unit`, `-m cluster`, `-m cuda`,
    `-m lint`; the lint tier runs first, so that CI reports a formatting or type error before the rest."""
    tiers = {}
    for item in items:
        tier = TIERS.get(item.module.__name__.rsplit(".", 1)[-1]) if item.module is not None else None
        tiers[item.nodeid] = tier
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))
    items.sort(key=lambda item: tiers[item.nodeid] != "lint")  # stable: the rest keep their order


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    c = LocalCluster(
        state_dir=tmp_path_factory.mktemp("cluster"),
        http_port=free_port(),
        grpc_port=free_port(),
        device="cpu",
        cpu_memory_gb=2.0,
        default_models="tiny",
    )
    c.start()
    yield c
    c.stop()


@pytest.fixture()
def engine_factory(model_dir):
    """Starts built-in engines on the module's `model_dir` (Engine's keyword arguments), stops them after the test."""
    from services.gpu_agent.engine import Engine

    made: list[Engine] = []

    def make(**kwargs) -> Engine:
        engine = Engine(model_dir, **kwargs)
        engine.start()
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.stop()


@pytest.fixture()
def etcd_server(tmp_path):
    """A fresh etcd of our own for one test."""
    from services.common.etcd_server import EmbeddedEtcd

    server = EmbeddedEtcd(tmp_path / "etcd")
    server.start()
    yield server
    server.stop()
