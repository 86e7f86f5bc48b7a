"""The GGUF quality-size frontier: every format, plain and activation-aware (`--calibration`).

For each generated checkpoint (the project's, then generator settings no part of the method
was tuned on), both branches are converted by `ideoquant convert` as a user would, loaded
back with the project's runtime (`load_gguf_transformer`), and run on held-out synthetic
inputs (a seed calibration never draws, several timesteps over [0, 1]). The figure is the
mean over forwards and both branches of the velocity's relative error against the float32
model; the size is both files together. Writes a table, `report.json` and `frontier.png`.

    .venv/bin/python bench/frontier.py --formats q4_k --only project --layers 2 --threads 1
    .venv/bin/python bench/frontier.py --layers 2 --threads 1          # every format and checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int8_errors import EVAL_SEED, checkpoints, mean_relative, velocities  # noqa: E402

from ideoquant.calibrate.inputs import synthetic_calls  # noqa: E402
from ideoquant.calibrate.run import calibrate  # noqa: E402
from ideoquant.calibrate.source_model import load_source_transformer  # noqa: E402
from ideoquant.export.convert import convert  # noqa: E402
from ideoquant.export.gguf_branch import gguf_file_name  # noqa: E402
from ideoquant.export.options import ConvertOptions  # noqa: E402
from ideoquant.io.source import open_source  # noqa: E402
from ideoquant.io.synthetic import OutlierPattern, write_synthetic_pipeline  # noqa: E402
from ideoquant.model.inventory import ModelDims, expected_tensors  # noqa: E402
from ideoquant.runtime.gguf_loader import load_gguf_transformer  # noqa: E402

FORMATS = "q4_0,q4_k,q4_k_m,q5_k,q5_k_m,q6_k,q8_0"


def frontier_checkpoints(layers: int) -> dict[str, dict]:
    """The INT8 benchmark's checkpoints plus two wide ones whose widths fit 256-weight super-blocks.

    At 384 and 320 hidden most linears' rows do not fit K-quant super-blocks, so their Q4_K
    files hold those linears in the Q8_0 fallback (as the real model's 128-wide input_proj);
    the two below keep every block linear in the format's own type, as the real model does.
    """
    out = dict(checkpoints(layers))
    for hidden, head, ffn, llm, seed in ((512, 64, 1536, 1024, 29), (768, 128, 2048, 1536, 31)):
        dims = ModelDims(in_channels=64, hidden=hidden, head_dim=head, intermediate=ffn, adaln_dim=256,
                         llm_features=llm, num_layers=layers)
        out[f"wide {hidden}/{ffn} (fits super-blocks), seed {seed}"] = {"dims": dims, "seed": seed, "outliers": OutlierPattern()}
    return out


def variant_error(folder: Path, fmt: str, calls: dict, references: dict) -> tuple[float, int, dict]:
    """Mean velocity error over both branches of a converted folder, and its bytes."""
    per_branch, size = {}, 0
    for branch in references:
        path = folder / gguf_file_name(branch, fmt)
        size += path.stat().st_size
        per_branch[branch] = mean_relative(velocities(load_gguf_transformer(path, dtype=torch.float32), calls[branch]), references[branch])
    return sum(per_branch.values()) / len(per_branch), size, per_branch


def measure(name: str, spec: dict, args: argparse.Namespace) -> dict:
    """Every format, plain and aware, on one generated checkpoint."""
    folder = args.out / name.split(" (")[0].replace(" ", "_").replace(",", "").replace("/", "-")
    shutil.rmtree(folder, ignore_errors=True)
    src, stats_path = folder / "pipeline", folder / "stats.safetensors"
    write_synthetic_pipeline(src, dims=spec["dims"], seed=spec["seed"], outliers=spec["outliers"])
    calibrate(src, stats_path, synthetic=True, steps=args.steps, resolution=args.resolution, seed=spec["seed"],
              synthetic_inputs=args.calibration_inputs, text_tokens=args.text_tokens, quiet=True)
    source = open_source(src)
    calls, references = {}, {}
    for branch, bs in source.branches.items():
        calls[branch] = [c for i in range(args.eval_inputs)
                         for c in synthetic_calls(bs.dims, 1000 + i, EVAL_SEED, args.eval_steps, args.resolution,
                                                  args.text_tokens, branch)]
        references[branch] = velocities(load_source_transformer(bs, keep_fp8=False), calls[branch])
    rows = {}
    budgeted = args.budget_formats.split(",") if args.budget_formats else []
    for fmt in args.formats.split(","):
        variants = [("plain", {}), ("aware", {"calibration": stats_path})]
        if fmt in budgeted:  # --max-size at the plain file's size, with calibration
            variants.append(("budget", {"calibration": stats_path}))
        for variant, extra in variants:
            if variant == "budget":
                extra = {**extra, "max_size": rows[f"{fmt} plain"]["bytes"]}
            out = folder / f"{fmt}-{variant}"
            start = time.perf_counter()
            convert(str(src), ConvertOptions(fmt=fmt, out=out, quiet=True, overwrite=True, **extra))
            seconds = time.perf_counter() - start
            error, size, per_branch = variant_error(out, fmt, calls, references)
            rows[f"{fmt} {variant}"] = {"format": fmt, "variant": variant, "velocity": error, "bytes": size,
                                        "branches": per_branch, "convert_seconds": seconds}
            print(f"{name:<34} {fmt:<7} {variant:<6} {size / 2**20:8.3f} {error:9.4f}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return {"seed": spec["seed"], "dims": spec["dims"].as_dict(), "rows": rows}


# --- a PNG without matplotlib ---------------------------------------------------------------

def _png(path: Path, pixels: list[bytearray], width: int, height: int) -> None:
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def bits_per_weight(row: dict, dims: dict) -> float:
    """File bits (both branches) per stored weight of the checkpoint: one size axis for all widths."""
    weights = sum(math.prod(t.shape) for t in expected_tensors(ModelDims(**dims)))
    return row["bytes"] * 8 / (2 * weights)


def plot(path: Path, report: dict) -> None:
    """Error against bits per weight: one point per variant (plain grey squares, aware
    coloured discs, --max-size coloured squares; triangles with matplotlib), one hue per
    checkpoint; log-scaled error axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    points = [(cp, {**r, "bpw": bits_per_weight(r, res["dims"])})
              for cp, res in report["checkpoints"].items() for r in res["rows"].values()]
    if not points:
        return
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, cp in enumerate(report["checkpoints"]):
            for variant, marker in (("plain", "s"), ("aware", "o"), ("budget", "^")):
                pts = sorted((r["bpw"], r["velocity"], r["format"]) for c, r in points if c == cp and r["variant"] == variant)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=f"C{i}",
                        linestyle=":" if variant == "plain" else "-", label=f"{cp} {variant}")
                for x, y, f in pts:
                    ax.annotate(f, (x, y), fontsize=6)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (both files)")
        ax.set_ylabel("mean velocity error vs float32")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return
    width, height, margin = 640, 400, 40
    pixels = [bytearray([255] * (3 * width)) for _ in range(height)]
    xs = [r["bpw"] for _, r in points]
    ys = [math.log(max(r["velocity"], 1e-9)) for _, r in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    hues = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (188, 189, 34), (23, 190, 207)]
    names = list(report["checkpoints"])
    for (cp, r), y in zip(points, ys):
        px = margin + int((r["bpw"] - x0) / max(x1 - x0, 1e-9) * (width - 2 * margin))
        py = height - margin - int((y - y0) / max(y1 - y0, 1e-9) * (height - 2 * margin))
        color = hues[names.index(cp) % len(hues)] if r["variant"] != "plain" else (128, 128, 128)
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                if r["variant"] == "aware" and dx * dx + dy * dy > 9:
                    continue
                if 0 <= py + dy < height and 0 <= px + dx < width:
                    pixels[py + dy][3 * (px + dx) : 3 * (px + dx) + 3] = bytes(color)
    for x in range(margin, width - margin):
        pixels[height - margin][3 * x : 3 * x + 3] = b"\x00\x00\x00"
    for y in range(margin, height - margin + 1):
        pixels[y][3 * margin : 3 * margin + 3] = b"\x00\x00\x00"
    _png(path, pixels, width, height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default=FORMATS)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--calibration-inputs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="calibration timesteps per input")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--eval-inputs", type=int, default=2)
    parser.add_argument("--eval-steps", type=int, default=4, help="held-out timesteps per input")
    parser.add_argument("--budget-formats", default="q4_k",
                        help="formats also converted with --max-size at their plain size (and --calibration)")
    parser.add_argument("--only", default=None, help="run only the checkpoints whose name contains this")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/frontier"))
    parser.add_argument("--plot-only", type=Path, default=None, metavar="REPORT",
                        help="redraw the plot of a saved report.json into --out, converting nothing")
    args = parser.parse_args()
    if args.plot_only is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(args.out / "frontier.png", json.loads(args.plot_only.read_text()))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "checkpoints": {}}
    print(f"mean end-to-end velocity error vs float32 ({args.eval_inputs} held-out inputs x {args.eval_steps} "
          f"timesteps, both branches, {args.layers} blocks)")
    print(f"{'checkpoint':<34} {'format':<7} {'kind':<6} {'MiB':>8} {'velocity':>9}")
    for name, spec in frontier_checkpoints(args.layers).items():
        if args.only and args.only not in name:
            continue
        report["checkpoints"][name] = measure(name, spec, args)
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'checkpoint':<34} {'format':<7} {'plain':>8} {'aware':>8} {'aware/plain':>11} {'budget':>8} {'budget/plain':>12}")
    for name, res in report["checkpoints"].items():
        for fmt in args.formats.split(","):
            p, a = res["rows"][f"{fmt} plain"]["velocity"], res["rows"][f"{fmt} aware"]["velocity"]
            b = res["rows"].get(f"{fmt} budget", {}).get("velocity")
            tail = f" {b:8.4f} {b / p:12.3f}" if b is not None else ""
            print(f"{name:<34} {fmt:<7} {p:8.4f} {a:8.4f} {a / p:11.3f}{tail}")
    plot(args.out / "frontier.png", report)
    print(f"\nreport: {args.out / 'report.json'}, plot: {args.out / 'frontier.png'}")


if __name__ == "__main__":
    main()
