"""The engine's speed before and after a change, side by side in one run.

Runs bench/decode_throughput.py and bench/activation.py from two source trees
on the same device, one after the other: BEFORE (a folder holding an earlier
commit's tree, for example `git archive <commit> services prism clients bench
| tar -x -C .before`) and the tree this script is in. Each tree runs with only
itself on the import path. Prints the decode step and the activation of each
model from both, with after / before, and writes them as JSON:

    python bench/before_after.py --before .before --out before_after.json [--models ...]

A refactor that should not change speed shows ratios within the spread between
repeats (decode steps of a few percent, activations of about 10%)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
DECODE_MODELS = ["llama-3.2-1b", "llama-3.1-8b"]
DECODE_BATCHES = [1, 32]
ACTIVATION_MODELS = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"]


def run_tree(tree: Path, out: Path, models: list[str], batches: list[int], repeats: int, device: str) -> dict:
    """Both benchmarks from `tree`, their JSON results."""
    env = dict(os.environ)
    # Only this tree's sources: the other's must not shadow them (site-packages stay as they were).
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not _inside_a_tree(p)]
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "clients" / "python"), *kept])
    decode, activation = out / "decode.json", out / "activation.json"
    subprocess.run(
        [
            sys.executable,
            str(tree / "bench" / "decode_throughput.py"),
            "--models",
            ",".join(models),
            "--batches",
            ",".join(map(str, batches)),
            "--attention",
            "triton",
            "--no-hf",
            "--device",
            device,
            "--json",
            str(decode),
        ],
        cwd=tree,
        env=env,
        check=True,
    )
    subprocess.run(
        [
            sys.executable,
            str(tree / "bench" / "activation.py"),
            "--models",
            *ACTIVATION_MODELS,
            "--repeats",
            str(repeats),
            "--json",
            str(activation),
        ],
        cwd=tree,
        env=env,
        check=True,
    )
    return {"decode": json.loads(decode.read_text()), "activation": json.loads(activation.read_text())}


def _inside_a_tree(path: str) -> bool:
    return (Path(path) / "services" / "gpu_agent").is_dir() or (Path(path) / "prism_client").is_dir()


def rows(before: dict, after: dict) -> list[dict]:
    """One row a decode point and one an activation, both trees' numbers and after / before."""
    out = []
    decode_before = {(r["model"], r["batch"]): r for r in before["decode"]["results"]}
    for r in after["decode"]["results"]:
        b = decode_before.get((r["model"], r["batch"]))
        if b is not None:
            out.append(
                {
                    "what": f"decode step, batch {r['batch']}",
                    "model": r["model"],
                    "unit": "ms",
                    "before": b["step_ms"],
                    "after": r["step_ms"],
                    "ratio": r["step_ms"] / b["step_ms"],
                }
            )
    activation_before = {r["model"]: r for r in before["activation"]["results"]}
    for r in after["activation"]["results"]:
        b = activation_before.get(r["model"])
        if b is not None:
            for key, what in (("activate_s", "activation"), ("deactivate_s", "deactivation")):
                out.append(
                    {
                        "what": what,
                        "model": r["model"],
                        "unit": "s",
                        "before": b[key],
                        "after": r[key],
                        "ratio": r[key] / b[key],
                    }
                )
    return out


def print_table(table: list[dict]) -> None:
    header = f"{'what':<22} {'model':<14} {'before':>10} {'after':>10} {'after/before':>13}"
    print(header)
    print("-" * len(header))
    for r in table:
        print(
            f"{r['what']:<22} {r['model']:<14} {r['before']:>9.4f}{r['unit']:<1} {r['after']:>9.4f}{r['unit']:<1} "
            f"{r['ratio']:>13.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the earlier commit's tree")
    parser.add_argument("--out", type=Path, required=True, help="JSON of both runs and the table")
    parser.add_argument("--models", nargs="*", default=DECODE_MODELS, help="decode_throughput's models")
    parser.add_argument("--batches", nargs="*", type=int, default=DECODE_BATCHES)
    parser.add_argument("--repeats", type=int, default=5, help="activation.py's repeats")
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, tree in (("before", args.before.resolve()), ("after", HERE)):
            (Path(tmp) / label).mkdir()
            results[label] = run_tree(tree, Path(tmp) / label, args.models, args.batches, args.repeats, args.device)
    table = rows(results["before"], results["after"])
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "before_after",
                "environment": results["after"]["decode"].get("environment"),
                "table": table,
                **results,
            },
            indent=1,
        )
    )
    print_table(table)


if __name__ == "__main__":
    main()
