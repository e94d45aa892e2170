from __future__ import annotations

import json

import pytest

from services.common import placement_config as pc

ORIGINAL_EXAMPLE = [
    {
        "model_name": "model_1",
        "model_path": "meta-llama/Llama-3.2-1B",
        "tp_size": 1,
        "init_placements": [{"gpu_ids": [0], "on": True, "max_memory_pool_size": 15}],
    },
    {
        "model_name": "model_2",
        "model_path": "meta-llama/Llama-3.2-3B",
        "tp_size": 1,
        "init_placements": [{"gpu_ids": [0], "on": False, "max_memory_pool_size": 15}],
    },
]


def test_original_prism_file_loads(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps(ORIGINAL_EXAMPLE))
    config = pc.load(path)
    assert [m.model_name for m in config.models] == ["model_1", "model_2"]
    m2 = config.model("model_2")
    assert m2.init_placements[0].on is False
    assert m2.init_placements[0].gpu_ids == (0,)
    assert m2.init_placements[0].memory_limit_bytes == 15 * pc.GB
    assert m2.load_format == "auto" and m2.engine == "auto"


def test_tensor_parallel_example_and_yaml(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(
        "- model_name: large_model\n"
        "  model_path: meta-llama/Llama-3.3-70B-Instruct\n"
        "  tp_size: 4\n"
        "  load_format: dummy\n"
        "  init_placements: [{gpu_ids: [0, 1, 2, 3], on: true, max_memory_pool_size: 10}]\n"
    )
    model = pc.load(path).models[0]
    assert model.tp_size == 4 and model.init_placements[0].gpu_ids == (0, 1, 2, 3)
    assert model.load_format == "dummy"


def test_every_error_is_reported_with_its_path():
    bad = [
        {"model_name": "a", "model_path": "", "tp_size": 0, "init_placements": []},
        {
            "model_name": "a",
            "model_path": "p",
            "tp_size": 2,
            "colour": "red",
            "init_placements": [{"gpu_ids": [0], "on": "yes", "max_memory_pool_size": -1}],
        },
        "not an object",
        {"model_path": "p", "engine": "vllm", "init_placements": [{"gpu_ids": [1, 1]}]},
    ]
    with pytest.raises(pc.ConfigError) as info:
        pc.parse(bad)
    errors = "\n".join(info.value.errors)
    for expected in [
        "[0].model_path: required",
        "[0].tp_size: must be an integer >= 1",
        "[0].init_placements: must be a non-empty list",
        "[1].model_name: duplicate model name 'a'",
        "[1].colour: unknown field",
        "[1].init_placements[0].gpu_ids: has 1 GPU(s) but tp_size is 2",
        "[1].init_placements[0].on: must be true or false",
        "[1].init_placements[0].max_memory_pool_size: must be a positive number",
        "[2]: must be an object",
        "[3].model_name: required",
        "[3].engine: must be one of auto, torch, sglang",
        "[3].init_placements[0].gpu_ids: lists a GPU twice",
    ]:
        assert expected in errors, f"missing {expected!r} in:\n{errors}"
    assert len(info.value.errors) == 12


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(pc.ConfigError, match="cannot read"):
        pc.load(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(pc.ConfigError, match="not valid JSON"):
        pc.load(bad)
    with pytest.raises(pc.ConfigError, match="lists no models"):
        pc.parse([])


def test_relative_model_path_resolves_against_config_folder(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"model_name": "m", "model_path": "models/m", "init_placements": [{"gpu_ids": [0]}]}]))
    assert pc.load(path).models[0].model_path == str((tmp_path / "models" / "m").resolve())


def test_slo_priority_and_shed_load():
    base = {"model_name": "m", "model_path": "/m", "init_placements": [{"gpu_ids": [0]}]}
    cfg = pc.parse([{**base, "slo": {"ttft_ms": 250, "tpot_ms": 40.5}, "priority": 3, "shed_load": True}])
    m = cfg.models[0]
    assert (m.ttft_slo_ms, m.tpot_slo_ms, m.priority, m.shed_load) == (250.0, 40.5, 3, True)
    m = pc.parse([base]).models[0]
    assert (m.ttft_slo_ms, m.tpot_slo_ms, m.priority, m.shed_load) == (None, None, 1, False)
    with pytest.raises(pc.ConfigError) as err:
        pc.parse([{**base, "slo": {"ttft_ms": 0, "tpot": 5}, "priority": 0, "shed_load": "yes"}])
    assert sorted(err.value.errors) == sorted(
        [
            "[0].slo.ttft_ms: must be a positive number of milliseconds, got 0",
            "[0].slo.tpot: unknown field",
            "[0].priority: must be an integer >= 1, got 0",
            "[0].shed_load: must be true or false, got 'yes'",
        ]
    )


def test_policy_in_the_file_and_its_names_match_the_schedulers():
    from services.scheduler.policies import POLICIES

    assert set(pc.POLICY_NAMES) == set(POLICIES)
    model = {"model_name": "m", "model_path": "/m", "init_placements": [{"gpu_ids": [0]}]}
    assert pc.parse({"models": [model], "policy": "prism"}).policy == "prism"
    assert pc.parse([model]).policy is None
    with pytest.raises(pc.ConfigError) as err:
        pc.parse({"models": [model], "policy": "best"})
    assert err.value.errors == ["<root>.policy: must be one of static, dedicated, time-share, kvpr, prism, got 'best'"]
    with pytest.raises(pc.ConfigError) as err:
        pc.parse({"models": [model], "polcy": "prism"})
    assert err.value.errors == ["<root>.polcy: unknown field"]
