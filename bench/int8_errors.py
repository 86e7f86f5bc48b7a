"""Per-block and end-to-end velocity errors of three INT8 W8A8 recipes against the float32 model.

Recipes, each written to disk and loaded through the Int8Linear runtime (in float32, so only
the int8 error is measured):

* plain:     no SmoothQuant, no protection (only the one-row adaLN/timestep linears in bf16,
             as in every recipe);
* paper:     SmoothQuant alpha 0.5, every feed_forward.w2 kept in bf16;
* ideoquant: alpha searched per linear, the N linears with the worst measured impact kept.

The model is a synthetic Ideogram-4-shaped checkpoint (tiny widths, `--layers` blocks) with
activation-outlier channels; calibration is synthetic; the errors are measured on held-out
synthetic inputs (another seed) at timesteps spread over [0, 1].

    .venv/bin/python bench/int8_errors.py --layers 17 --out bench_out/int8_errors
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
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
from ideoquant.io.synthetic import write_synthetic_pipeline
from ideoquant.runtime.int8_loader import load_int8_transformer

IMAGE_INDICATOR = 2


def recipes(protect: int) -> dict[str, Int8Settings]:
    """The three settings compared."""
    return {
        "plain": Int8Settings(smooth=False, protect=0),
        "paper": Int8Settings(alpha=0.5, protect=0, protect_patterns=("layers.*.feed_forward.w2",)),
        "ideoquant": Int8Settings(protect=protect),
    }


@torch.no_grad()
def run(model: torch.nn.Module, calls: list[dict]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each block's output (content rows) and the velocity (image rows) over all calls."""
    blocks: dict[int, list[torch.Tensor]] = {}
    handles = [
        block.register_forward_hook(
            lambda m, a, out, i=i: blocks.setdefault(i, []).append(out.detach().reshape(-1, out.shape[-1]))
        )
        for i, block in enumerate(model.layers)
    ]
    velocity = []
    for call in calls:
        out = model(**call, return_dict=False)[0]
        velocity.append(out[0, call["indicator"][0] == IMAGE_INDICATOR])
    for h in handles:
        h.remove()
    return [torch.cat(blocks[i]) for i in range(len(model.layers))], torch.cat(velocity)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=17)
    parser.add_argument("--protect", type=int, default=17)
    parser.add_argument("--calibration-inputs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--eval-inputs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/int8_errors"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shutil.rmtree(args.out, ignore_errors=True)
    src, stats_path = args.out / "pipeline", args.out / "stats.safetensors"
    write_synthetic_pipeline(src, layers=args.layers)
    calibrate(src, stats_path, synthetic=True, steps=args.steps, resolution=args.resolution,
              synthetic_inputs=args.calibration_inputs, text_tokens=args.text_tokens, max_samples=256, quiet=True)
    stats = load_statistics(stats_path)
    source = open_source(src)

    report: dict = {"model": {"layers": args.layers, "dims": source.branches["transformer"].dims.as_dict()},
                    "calibration": {"inputs": args.calibration_inputs, "steps": args.steps,
                                    "resolution": args.resolution, "text_tokens": args.text_tokens},
                    "branches": {}}
    for branch, bs in source.branches.items():
        # Held-out inputs: a seed calibration never used, timesteps spread over [0, 1].
        calls = [c for i in range(args.eval_inputs)
                 for c in synthetic_calls(bs.dims, 1000 + i, 12345, 4, args.resolution, args.text_tokens, branch)]
        ref_blocks, ref_velocity = run(load_source_transformer(bs), calls)
        gains = residual_gains(stats.energies.get(branch, {}))
        rows = {}
        for name, settings in recipes(args.protect).items():
            recipe = plan_int8(bs.dims, bs.read_float32, stats.branch(branch), settings, gains)
            folder = args.out / name / branch
            write_int8_folder(bs, recipe, folder, OutputSet())
            blocks, velocity = run(load_int8_transformer(folder, dtype=torch.float32), calls)
            rows[name] = {
                "blocks": [relative(b, r) for b, r in zip(blocks, ref_blocks)],
                "velocity": relative(velocity, ref_velocity),
                "kept_in_bf16": len(recipe.kept),
                "protected": recipe.protected,
            }
        report["branches"][branch] = rows
        print(f"\n{branch}: relative error vs float32 ({len(calls)} held-out forward calls)")
        print(f"{'recipe':<10} {'velocity':>9} {'block mean':>11} {'block max':>10} {'bf16 linears':>13}")
        for name, r in rows.items():
            print(f"{name:<10} {r['velocity']:9.4f} {sum(r['blocks']) / len(r['blocks']):11.4f} "
                  f"{max(r['blocks']):10.4f} {r['kept_in_bf16']:13d}")
        print("per block:")
        for name, r in rows.items():
            print(f"  {name:<10} " + " ".join(f"{e:.4f}" for e in r["blocks"]))
        print(f"  ideoquant protected: {', '.join(rows['ideoquant']['protected'])}")
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nreport: {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
