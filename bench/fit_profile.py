"""Fits the simulator's latency profile (prism/simulator/profile.py) to the
committed benchmark results and writes it as JSON, its sources, device and
which numbers are measured or assumed recorded inside.

    python bench/fit_profile.py [--results bench/results] [--configs bench/configs]
        [--decode decode_throughput-h200-fused.json] [--attention decode_attention-h200.json]
        [--activation activation-h200.json] [--colocated colocated_steps-h100.json]
        [--prefill prefill_steps-h100.json] [--step-log one_gpu-h100-live-17-steps.json] [--parallelism-by-size]
        [--step-costs step_costs-h100.json]
        [--out bench/results/sim-profile-h200.json]

The committed H100 profile (tests/test_simulator.py regenerates it):

    python bench/fit_profile.py --decode decode_throughput-h100.json --attention decode_attention-h100.json \
        --activation activation-h100.json --colocated colocated_steps-h100.json \
        --prefill prefill_steps-h100.json --step-costs step_costs-h100.json \
        --step-log one_gpu-h100-live-17-steps.json --parallelism-by-size --out bench/results/sim-profile-h100.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prism.simulator.profile import fit_profile

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--configs", type=Path, default=HERE / "configs")
    p.add_argument("--decode", default="decode_throughput-h200-fused.json")
    p.add_argument("--attention", default="decode_attention-h200.json")
    p.add_argument("--activation", default="activation-h200.json")
    p.add_argument("--colocated", default=None, help="bench/colocated_steps.py's result: the device's parallelism")
    p.add_argument(
        "--prefill", default=None, help="bench/prefill_steps.py's result: the prefill costs, per prompt and per token"
    )
    p.add_argument(
        "--step-log",
        default=None,
        help="bench/step_log_summary.py's JSON of a cluster run: the CUDA-graph capture time",
    )
    p.add_argument(
        "--parallelism-by-size",
        action="store_true",
        help="each size's parallelism beside other engines from the step log's contention table "
        "(bench/step_log_summary.py --contention) in place of the colocated steps' one "
        "(fit_profile's parallelism_by_size says how it was validated; the committed H100 profile has it)",
    )
    p.add_argument(
        "--step-costs",
        default=None,
        help="bench/step_costs.py's result: the prefill costs a live cluster fitted from its steps",
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "sim-profile-h200.json")
    args = p.parse_args()
    profile = fit_profile(
        args.results,
        args.configs,
        decode_file=args.decode,
        attention_file=args.attention,
        activation_file=args.activation,
        colocated_file=args.colocated,
        prefill_file=args.prefill,
        step_log_file=args.step_log,
        step_costs_file=args.step_costs,
        parallelism_by_size=args.parallelism_by_size,
    )
    profile.save(args.out)
    for point in profile.points:
        print(
            f"{point.model}: decode {point.decode_base_s * 1e3:.2f} ms + {point.decode_per_seq_s * 1e6:.1f} us/seq, "
            f"prefill +{point.prefill_base_s * 1e3:.1f} ms + {point.prefill_per_seq_s * 1e3:.2f} ms/prompt + "
            f"{1 / point.prefill_per_token_s:,.0f} tokens/s"
        )
    print(
        f"attention {profile.attention_bytes_per_s / 1e12:.2f} TB/s, activation copy "
        f"{profile.copy_bytes_per_s / 1e9:.1f} GB/s + {profile.activation_overhead_s * 1e3:.1f} ms"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
