"""CPU cost of INT8 error-feedback rounding at the published model's widths, per linear and in all.

Error feedback (GPTQ) rounds each int8-eligible block linear twice in a conversion: once while
planning (fitted on 3/4 of the sample rows, measured on the rest, `ALPHA_FINALISTS` times per
group) and once when the file is written (all rows). Each rounding factors the input
second-moment matrix (in x in) and sweeps the weight column by column. This script times
one rounding of each block linear kind on a random weight and the second moment of 512
random sample rows at full width, splits out the factorization, and extrapolates to the
whole model (34 blocks, both branches). `llm_cond_proj` (53248 inputs) is rounded to
nearest by design and is not counted.

    .venv/bin/python bench/int8_rounding_cost.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ideoquant.codecs.int8 import (
    ERROR_FEEDBACK_DAMP,
    _upper_inverse_cholesky,
    input_second_moment,
    quantize_weight_error_feedback,
    quantize_weight_per_channel,
)
from ideoquant.model.inventory import ModelDims
from ideoquant.recipes.int8_policy import ALPHA_FINALISTS


def block_linears(dims: ModelDims) -> dict[str, tuple[int, int]]:
    """(out, in) of each block linear kind that error feedback rounds."""
    h, f = dims.hidden, dims.intermediate
    return {"attention.qkv": (3 * h, h), "attention.o": (h, h), "feed_forward.w1": (f, h),
            "feed_forward.w3": (f, h), "feed_forward.w2": (h, f)}


def timed(fn, repeat: int) -> float:
    """Best wall seconds of `repeat` calls."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512, help="calibration sample rows per linear")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/int8_rounding_cost.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = ModelDims()
    gen = torch.Generator().manual_seed(0)
    roundings_per_linear = ALPHA_FINALISTS + 1  # planning finalists + the written file
    print(f"error-feedback rounding at full width, {args.rows} sample rows, {torch.get_num_threads()} threads")
    print(f"{'linear':<18} {'shape':>13} {'nearest s':>10} {'factor s':>9} {'rounding s':>11}")
    rows, per_block = {}, 0.0
    for name, (n_out, n_in) in block_linears(dims).items():
        weight = torch.randn(n_out, n_in, generator=gen) * 0.02
        x = torch.randn(args.rows, n_in, generator=gen)
        hessian = input_second_moment(x)
        nearest = timed(lambda: quantize_weight_per_channel(weight), args.repeat)
        factor = timed(lambda: _upper_inverse_cholesky(hessian, ERROR_FEEDBACK_DAMP), args.repeat)
        rounding = timed(lambda: quantize_weight_error_feedback(weight, hessian), args.repeat)
        rows[name] = {"shape": [n_out, n_in], "nearest_s": nearest, "factor_s": factor, "rounding_s": rounding}
        per_block += rounding * roundings_per_linear
        print(f"{name:<18} {f'{n_out}x{n_in}':>13} {nearest:10.2f} {factor:9.2f} {rounding:11.2f}", flush=True)
        del weight, x, hessian
    total_h = per_block * dims.num_layers * 2 / 3600
    print(f"\n{roundings_per_linear} roundings per linear ({ALPHA_FINALISTS} while planning, 1 written): "
          f"{per_block:.0f} s per block, {total_h:.2f} h for {dims.num_layers} blocks x 2 branches")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": args.rows,
                                    "alpha_finalists": ALPHA_FINALISTS, "linears": rows,
                                    "seconds_per_block": per_block, "hours_full_model": total_h}, indent=2) + "\n")


if __name__ == "__main__":
    main()
