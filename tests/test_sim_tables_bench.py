"""bench/sim_tables.py's summary of several seeds (a pure function over its tables)."""

from __future__ import annotations

from bench_scripts import load_bench_script


def table(seed: int, prism: dict[int, float], kvpr: dict[int, float], fewest: dict[str, int | None]) -> dict:
    def rows(values: dict[int, float]) -> dict:
        return {str(n): {"attainment": a} for n, a in values.items()}

    return {
        "name": "18 models",
        "models": 18,
        "target": 0.99,
        "gpu_counts": [4, 6],
        "trace": {"rate": 90.0, "duration_s": 150.0, "seed": seed},
        "fewest_gpus": fewest,
        "results": {"prism": rows(prism), "kvpr": rows(kvpr)},
    }


def test_the_seeds_summary_gives_each_cells_mean_with_the_seeds_values_and_each_seeds_fewest_gpus():
    sim_tables = load_bench_script("sim_tables")
    tables = [
        table(0, {4: 0.78, 6: 0.99}, {4: 0.86, 6: 0.99}, {"prism": 6, "kvpr": 6}),
        table(1, {4: 0.60, 6: 0.97}, {4: 0.45, 6: 0.80}, {"prism": 8, "kvpr": None}),
    ]
    text = sim_tables.seeds_markdown(tables)
    assert "mean of seeds 0, 1" in text
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "%" in line}
    assert lines["prism"] == "| prism | 69.0% (78/60) | 98.0% (99/97) | 6/8 |"
    assert lines["kvpr"] == "| kvpr | 65.5% (86/45) | 89.5% (99/80) | 6/- |"


def test_tables_run_without_the_search_say_so_rather_than_not_reached():
    sim_tables = load_bench_script("sim_tables")
    tables = [
        {**table(seed, {4: 0.78, 6: 0.99}, {4: 0.86, 6: 0.99}, {}), "searched": False, "dedicated_provisioned_gpus": 19}
        for seed in (0, 1)
    ]
    assert "| prism | 78.0% | 99.0% | not searched |" in sim_tables.markdown(tables[0])
    assert "| kvpr | 86.0% (86/86) | 99.0% (99/99) | not searched |" in sim_tables.seeds_markdown(tables)
