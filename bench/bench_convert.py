"""Whole-process conversion speed and peak memory on a full-width 2-block synthetic checkpoint.

Runs `ideoquant convert` in a child process (imports, reading, encoding, writing and
verification all included) and reports wall time, weights per second and the child's
peak RSS. With `--ggml PATH/libggml-base.so` it then times ggml's own encoder
(`ggml_quantize_chunk`, single thread) on the same tensors in the same types as the
converter's plan (every tensor the plan stores in a block type; with `--imatrix` in
--extra, through ggml's importance-matrix path with an all-ones vector) and prints the
ratio of the two rates. Reading the tensors is not part of ggml's time.

Usage: python bench/bench_convert.py --format q8_0 [--layers 2] [--work bench_out]
       [--extra="--imatrix ones"] [--ggml LIB] [--ggml-rows N]
"""

from __future__ import annotations

import argparse
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ggml_lib import load_ggml

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf import GGMLQuantizationType as QT

from ideoquant.io.source import open_source
from ideoquant.io.synthetic import write_synthetic_pipeline
from ideoquant.recipes.gguf_policy import gguf_tensor_types

UNBLOCKED = (QT.F32, QT.F16, QT.BF16)


def ggml_seconds(lib_path: str, source, fmt: str, imatrix: bool, max_rows: int) -> tuple[float, int]:
    """Seconds ggml's single-thread encoder spends on the plan's block-type tensors, and their weights."""
    lib = load_ggml(lib_path)
    seconds, weights = 0.0, 0
    for bs in source.branches.values():
        for choice in gguf_tensor_types(bs.dims, fmt):
            if choice.qtype in UNBLOCKED:
                continue
            x = bs.read_float32(choice.name).reshape(-1, choice.shape[-1])
            if max_rows:
                x = x[:max_rows]
            x = np.ascontiguousarray(x.numpy(), dtype=np.float32)
            m, k = x.shape
            out = np.empty((m, lib.ggml_row_size(int(choice.qtype), k)), dtype=np.uint8)
            ones = np.ones(k, dtype=np.float32) if imatrix else None
            t0 = time.perf_counter()
            lib.ggml_quantize_chunk(int(choice.qtype), x.ctypes.data, out.ctypes.data, 0, m, k,
                                    None if ones is None else ones.ctypes.data)
            seconds += time.perf_counter() - t0
            weights += m * k
    return seconds, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="q8_0")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("bench_out"))
    parser.add_argument("--extra", default="", help='Extra convert arguments, one string: --extra="--imatrix ones".')
    parser.add_argument("--ggml", default=None, help="libggml-base.so: time ggml's single-thread encoder too")
    parser.add_argument("--ggml-rows", type=int, default=0, help="time ggml on the first N rows of each tensor only")
    args = parser.parse_args()

    src = args.work / f"full-{args.layers}blocks-fp8"
    if not (src / "model_index.json").exists():
        t0 = time.perf_counter()
        write_synthetic_pipeline(src, size="full", layers=args.layers, dtype="fp8", seed=0, overwrite=True)
        print(f"synthesized {src} in {time.perf_counter() - t0:.1f}s")
    source = open_source(src)
    weights = sum(bs.total_weights for bs in source.branches.values())
    out = args.work / f"out-{args.format}"
    shutil.rmtree(out, ignore_errors=True)  # deleting old multi-GB outputs is not conversion time
    cmd = [sys.executable, "-m", "ideoquant.cli", "convert", str(src), "--format", args.format,
           "--out", str(out), "--quiet", *shlex.split(args.extra)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"convert failed: {proc.stderr.strip()}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(proc.stdout)
    rate = weights / wall / 1e6
    print(f"format {args.format} {args.extra}: {weights / 1e6:.0f} M weights (both branches, {args.layers} blocks, full width)")
    print(f"wall {wall:.2f} s  ->  {rate:.1f} M weights/s (whole process)")
    print(f"peak RSS {peak_kib / 2**20:.2f} GiB")
    if args.ggml:
        secs, timed = ggml_seconds(args.ggml, source, args.format, "--imatrix" in args.extra, args.ggml_rows)
        ggml_rate = timed / secs / 1e6
        print(f"ggml single thread: {timed / 1e6:.0f} M weights in {secs:.2f} s  ->  {ggml_rate:.1f} M weights/s (encoder only)")
        print(f"ratio {rate / ggml_rate:.2f}x")


if __name__ == "__main__":
    main()
