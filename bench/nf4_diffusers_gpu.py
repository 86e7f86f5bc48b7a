"""An `ideoquant convert --format nf4` folder through diffusers' own bitsandbytes loader, against ideoquant's runtime.

Converts a synthetic FP8 checkpoint (or --source) to NF4 in the diffusers layout, then loads the
conditional branch three ways on the GPU:

* `Ideogram4Transformer2DModel.from_pretrained(DIR/transformer)`: bitsandbytes Linear4bit, CUDA kernels;
* `ideoquant.runtime.load_transformer(DIR)` in bf16;
* the same in float32: the float32 model of the dequantized weights, the reference.

It checks that diffusers found every key (no missing or unexpected weights, every 4-bit linear a
Linear4bit), compares the dequantized weights of each 4-bit linear bit for bit, and prints the
relative velocity differences. bf16 alone moves the tiny synthetic model's velocity by ~0.19 from
float32 (a plain diffusers model cast to bf16 does the same), so the bf16 loaders are compared with
each other (--tolerance), not with the float32 reference. diffusers refuses bitsandbytes
checkpoints without CUDA: without a GPU the script says so and exits 0.

    .venv/bin/python bench/nf4_diffusers_gpu.py [--size tiny|full] [--layers 2] [--double-quant]
        [--all-linears] [--source DIR] [--work DIR] [--tolerance 0.05] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ideoquant.export.convert import convert
from ideoquant.export.options import ConvertOptions
from ideoquant.io.synthetic import write_synthetic_pipeline
from ideoquant.model.sequence import velocity_inputs
from ideoquant.runtime.nf4_loader import NF4Linear
from ideoquant.runtime.pipeline import load_transformer


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def velocity(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One denoising call's output in float32."""
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float()


def load_with_diffusers(folder: Path):
    """diffusers' loader on the folder: (model, loading info); raises when it did not take every weight."""
    from diffusers import Ideogram4Transformer2DModel

    model, info = Ideogram4Transformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"diffusers did not load {folder} cleanly: {json.dumps(problems)[:2000]}")
    if next(model.parameters()).device.type != "cuda":
        model = model.to("cuda")
    return model.eval(), info


def compare_weights(bnb_model: torch.nn.Module, ours: torch.nn.Module) -> dict:
    """Each Linear4bit dequantized by bitsandbytes (CUDA, float32) against ideoquant's decode, bit for bit."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    ours_modules = dict(ours.named_modules())
    count = identical = 0
    worst = 0.0
    for name, module in bnb_model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        count += 1
        state = copy.copy(module.weight.quant_state)
        state.dtype = torch.float32  # decode in float32, not in the compute dtype
        theirs = F.dequantize_4bit(module.weight.data, state)
        mine = ours_modules[name]
        if not isinstance(mine, NF4Linear):
            raise SystemExit(f"{name}: 4-bit in diffusers, {type(mine).__name__} in ideoquant's runtime")
        mine = mine.dequantize(torch.float32)
        if torch.equal(theirs.view(torch.int32), mine.view(torch.int32)):
            identical += 1
        worst = max(worst, float((theirs - mine).abs().max()))
    return {"linear4bit": count, "bit_identical": identical, "max_abs_diff": worst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny", help="synthetic model width")
    parser.add_argument("--layers", type=int, default=2, help="synthetic blocks")
    parser.add_argument("--source", type=Path, default=None, help="convert this checkpoint instead of a synthetic one")
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--all-linears", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="folder for the source and output (default: a temp dir)")
    parser.add_argument("--tolerance", type=float, default=5e-2, help="fail above this diffusers-vs-ideoquant bf16 difference")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("nf4_diffusers_gpu.py: no CUDA device; diffusers loads bitsandbytes checkpoints only on a GPU. Nothing run.")
        return 0
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("nf4_diffusers_gpu.py: bitsandbytes is not installed (pip install bitsandbytes). Nothing run.")
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="nf4_gpu_"))
    src = args.source
    if src is None:
        src = work / "src"
        t0 = time.perf_counter()
        write_synthetic_pipeline(src, size=args.size, layers=args.layers, dtype="fp8", layout="fused", seed=0, overwrite=True)
        print(f"synthetic {args.size} source, {args.layers} blocks: {src} ({time.perf_counter() - t0:.1f}s)")
    out = work / "nf4"
    options = ConvertOptions(
        fmt="nf4", out=out, branches="cond", layout="diffusers", double_quant=args.double_quant,
        all_linears=args.all_linears, quiet=True, overwrite=True,
    )
    t0 = time.perf_counter()
    result = convert(str(src), options)[0]
    print(f"converted to {out} ({time.perf_counter() - t0:.1f}s, {result.output_bytes / 2**20:.1f} MiB, "
          f"{8 * result.output_bytes / result.weights:.2f} bits/weight)")

    folder = out / "transformer"
    bnb_model, _ = load_with_diffusers(folder)
    ours = load_transformer(out, device="cuda", dtype=torch.bfloat16)
    ref = load_transformer(out, device="cuda", dtype=torch.float32)
    weights = compare_weights(bnb_model, ref)
    print(f"diffusers Linear4bit modules: {weights['linear4bit']} (recipe quantized {result.recipe['quantized']}); "
          f"bit-identical decodes: {weights['bit_identical']}; max |diff| {weights['max_abs_diff']:.3e}")
    if weights["linear4bit"] != result.recipe["quantized"]:
        raise SystemExit("diffusers did not make every 4-bit weight a Linear4bit")

    rows = []
    for unconditional in (False, True):
        inputs32 = velocity_inputs(ref.config, seed=0, grid=(8, 8), device="cuda", unconditional=unconditional)
        inputs16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs32.items()}
        v_ref = velocity(ref, inputs32)
        v_bnb = velocity(bnb_model, inputs16)
        v_ours = velocity(ours, inputs16)
        if not (torch.isfinite(v_bnb).all() and torch.isfinite(v_ours).all()):
            raise SystemExit("non-finite velocity")
        row = {
            "inputs": "unconditional" if unconditional else "conditional",
            "diffusers_vs_ideoquant": rel_diff(v_bnb, v_ours),
            "diffusers_vs_float32": rel_diff(v_bnb, v_ref),
            "ideoquant_vs_float32": rel_diff(v_ours, v_ref),
        }
        rows.append(row)
        print(f"{row['inputs']:<14} rel diff  diffusers vs ideoquant (bf16) {row['diffusers_vs_ideoquant']:.3e}  "
              f"diffusers vs float32 ref {row['diffusers_vs_float32']:.3e}  ideoquant vs float32 ref {row['ideoquant_vs_float32']:.3e}")
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "weights": weights, "rows": rows}, indent=2) + "\n")
    worst = max(r["diffusers_vs_ideoquant"] for r in rows)
    if worst > args.tolerance:
        print(f"FAIL: diffusers and ideoquant differ by {worst:.3e} > {args.tolerance}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
