"""End-to-end velocity error of INT8 W8A8 recipes against the float32 model, at equal protected bytes.

Recipes, each written to disk and loaded through the Int8Linear runtime (in float32, so only
the int8 error is measured):

* plain:     no SmoothQuant, no protection (only the one-row adaLN/timestep linears in bf16,
             as in every recipe);
* paper:     SmoothQuant alpha 0.5, the `feed_forward.w2` of every other block kept in bf16
             (17 of 34 in the published model: the paper's share);
* ideoquant: alpha searched per input group, protection by measured error reduction per
             byte, with the budget set to the paper recipe's protected bytes (equal bytes);
* default:   ideoquant with its default budget (the paper's share of the int8-eligible
             weights at the published model's proportions).

Checkpoints: the project's synthetic outlier checkpoint (seed 0, tiny widths, the default
outlier pattern) and generator settings no part of the recipe was tuned on: other seeds,
other widths, other outlier patterns. Calibration is synthetic; the errors are measured on
held-out synthetic inputs (another seed) at timesteps spread over [0, 1], both branches; the
figure is the mean over forwards of ||v_int8 - v|| / ||v|| on the image rows.

    .venv/bin/python bench/int8_errors.py --layers 8 --threads 1 --out bench_out/int8_errors
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ideoquant.calibrate.inputs import synthetic_calls
from ideoquant.calibrate.run import calibrate
from ideoquant.calibrate.source_model import load_source_transformer
from ideoquant.calibrate.statistics import load_statistics, residual_gains
from ideoquant.export.int8_branch import write_int8_folder
from ideoquant.export.smoothing import Int8Settings, plan_int8
from ideoquant.io.source import open_source
from ideoquant.io.staging import OutputSet
from ideoquant.io.synthetic import TINY, OutlierPattern, write_synthetic_pipeline
from ideoquant.model.inventory import ModelDims
from ideoquant.model.sequence import IMAGE_INDICATOR
from ideoquant.recipes.int8_policy import PROTECTED_BYTES_PER_WEIGHT, ProtectBudget

EVAL_SEED = 12345  # held-out inputs: calibration never draws this seed


def checkpoints(layers: int) -> dict[str, dict]:
    """Generator settings: the project's checkpoint first, then settings the recipe never saw."""
    tiny = ModelDims(**{**TINY.as_dict(), "num_layers": layers})
    wide = ModelDims(in_channels=64, hidden=384, head_dim=64, intermediate=1024, adaln_dim=128, llm_features=768,
                     num_layers=layers)
    other_wide = ModelDims(in_channels=64, hidden=320, head_dim=64, intermediate=896, adaln_dim=128, llm_features=640,
                           num_layers=layers)
    return {
        "project (seed 0)": {"dims": tiny, "seed": 0, "outliers": OutlierPattern()},
        "seed 11": {"dims": tiny, "seed": 11, "outliers": OutlierPattern()},
        "wide 384/1024, seed 3": {"dims": wide, "seed": 3, "outliers": OutlierPattern()},
        "strong outliers, seed 5": {"dims": tiny, "seed": 5,
                                    "outliers": OutlierPattern(norm_gain=40.0, norm_every=64, weight_gain=6.0, weight_every=128)},
        "sparse norm outliers only, seed 6": {"dims": tiny, "seed": 6,
                                              "outliers": OutlierPattern(norm_gain=25.0, norm_every=256, weight_gain=1.0)},
        "sparse norm x18 in 1/128, seed 23": {"dims": tiny, "seed": 23,
                                              "outliers": OutlierPattern(norm_gain=18.0, norm_every=128, weight_gain=1.0)},
        "wide 320/896, seed 17": {"dims": other_wide, "seed": 17, "outliers": OutlierPattern()},
    }


def paper_patterns(layers: int) -> tuple[str, ...]:
    """`feed_forward.w2` of every other block (17 of 34 in the published model)."""
    return tuple(f"layers.{i}.feed_forward.w2" for i in range(1, layers, 2))


def recipes(dims: ModelDims) -> dict[str, Int8Settings]:
    """The settings compared; `ideoquant` spends exactly the paper recipe's protected bytes."""
    patterns = paper_patterns(dims.num_layers)
    paper_bytes = len(patterns) * dims.hidden * dims.intermediate * PROTECTED_BYTES_PER_WEIGHT
    return {
        "plain": Int8Settings(smooth=False, protect_budget=None, rounding="nearest"),
        "paper": Int8Settings(alpha=0.5, protect_budget=None, protect_patterns=patterns, rounding="nearest"),
        "ideoquant": Int8Settings(protect_budget=ProtectBudget(nbytes=paper_bytes)),
        "default": Int8Settings(),
    }


@torch.no_grad()
def velocities(model: torch.nn.Module, calls: list[dict]) -> list[torch.Tensor]:
    """The velocity of every call on its image rows."""
    return [model(**c, return_dict=False)[0][0, c["indicator"][0] == IMAGE_INDICATOR] for c in calls]


def mean_relative(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Mean over forwards of ||a - b|| / ||b||."""
    return sum(float((a - b).norm() / b.norm()) for a, b in zip(got, ref)) / len(ref)


def measure(name: str, spec: dict, args: argparse.Namespace) -> dict:
    """Every recipe on both branches of one generated checkpoint."""
    folder = args.out / name.split(" (")[0].replace(" ", "_").replace(",", "").replace("/", "-")
    shutil.rmtree(folder, ignore_errors=True)
    src, stats_path = folder / "pipeline", folder / "stats.safetensors"
    dims = write_synthetic_pipeline(src, dims=spec["dims"], seed=spec["seed"], outliers=spec["outliers"])
    calibrate(src, stats_path, synthetic=True, steps=args.steps, resolution=args.resolution, seed=spec["seed"],
              synthetic_inputs=args.calibration_inputs, text_tokens=args.text_tokens, max_samples=args.max_samples,
              quiet=True)
    stats = load_statistics(stats_path)
    source = open_source(src)
    result: dict = {"dims": dims.as_dict(), "seed": spec["seed"], "outliers": spec["outliers"].__dict__, "branches": {}}
    for branch, bs in source.branches.items():
        calls = [c for i in range(args.eval_inputs)
                 for c in synthetic_calls(bs.dims, 1000 + i, EVAL_SEED, args.eval_steps, args.resolution,
                                          args.text_tokens, branch)]
        reference = velocities(load_source_transformer(bs), calls)
        gains = residual_gains(stats.energies.get(branch, {}))
        rows = {}
        for recipe_name, settings in recipes(dims).items():
            recipe = plan_int8(bs.dims, bs.read_float32, stats.branch(branch), settings, gains)
            out = folder / recipe_name / branch
            write_int8_folder(bs, recipe, out, OutputSet(overwrite=True))
            got = velocities(load_int8_transformer(out), calls)
            protected = {m: c.weights for m, c in recipe.linears.items() if m in recipe.protected}
            rows[recipe_name] = {
                "velocity": mean_relative(got, reference),
                "protected_bytes": sum(protected.values()) * PROTECTED_BYTES_PER_WEIGHT,
                "protected": recipe.protected,
            }
        result["branches"][branch] = rows
    return result


def load_int8_transformer(folder: Path) -> torch.nn.Module:
    from ideoquant.runtime.int8_loader import load_int8_transformer as load

    return load(folder, dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--calibration-inputs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="calibration timesteps per input")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--max-samples", type=int, default=512,
                        help="calibration sample rows kept per linear (the `calibrate` default)")
    parser.add_argument("--eval-inputs", type=int, default=2)
    parser.add_argument("--eval-steps", type=int, default=4, help="held-out timesteps per input")
    parser.add_argument("--alpha-finalists", type=int, default=0,
                        help="what-if: alphas compared with error feedback per group (0: the recipe's ALPHA_FINALISTS)")
    parser.add_argument("--only", default=None, help="run only the checkpoints whose name contains this")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/int8_errors"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.alpha_finalists:
        import ideoquant.export.smoothing as smoothing

        smoothing.ALPHA_FINALISTS = args.alpha_finalists
    args.out.mkdir(parents=True, exist_ok=True)

    report: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "checkpoints": {}}
    print(f"mean end-to-end velocity error vs float32 ({args.eval_inputs} held-out inputs x {args.eval_steps} "
          f"timesteps per branch, {args.layers} blocks)")
    print(f"{'checkpoint':<36} {'branch':<7} {'plain':>7} {'paper':>7} {'ideoq.':>7} {'default':>7} "
          f"{'ideoq./paper':>12} {'bf16 MiB':>9}")
    for name, spec in checkpoints(args.layers).items():
        if args.only and args.only not in name:
            continue
        start = time.perf_counter()
        result = measure(name, spec, args)
        result["seconds"] = time.perf_counter() - start
        report["checkpoints"][name] = result
        for branch, rows in result["branches"].items():
            v = {k: r["velocity"] for k, r in rows.items()}
            print(f"{name:<36} {'cond' if branch == 'transformer' else 'uncond':<7} {v['plain']:7.4f} {v['paper']:7.4f} "
                  f"{v['ideoquant']:7.4f} {v['default']:7.4f} {v['ideoquant'] / v['paper']:12.2f} "
                  f"{rows['ideoquant']['protected_bytes'] / 2**20:9.2f}", flush=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nreport: {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
