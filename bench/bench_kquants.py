"""Encoder speed of the ggml types on full-width Ideogram 4 shaped float32 tensors.

For each type (Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q4_K, Q5_K, Q6_K, Q8_0, Q3_K, Q2_K, IQ4_XS) and each path (ggml's
`_ref` encoder without an importance matrix, its `_impl` encoder with one) this encodes
[12288, 4608] and [4608, 12288] float32 tensors through `quantize_tensor` (the converter's
entry point: row chunks, inner chunks, padding, packing, everything) and prints weights per
second. With `--ggml PATH/libggml-base.so` it also times ggml's own single-thread encoder
(`ggml_quantize_chunk`) on the same tensor in the same run, checks that both wrote the same
bytes, and prints the ratio.

The tensors look like trained weights: gaussian rows with uneven (log-normal) row scales,
per-column scale variation, and a few large outliers.

Usage: python bench/bench_kquants.py [--types Q4_K,Q6_K] [--paths ref,imatrix]
       [--shapes 12288x4608,4608x12288] [--rows N] [--repeat 1] [--threads N] [--ggml LIB] [--clock cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ggml_lib import load_ggml

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ideoquant.codecs.ggml import fused_kernel
from ideoquant.codecs.ggml.registry import ggml_type
from ideoquant.codecs.ggml.scale_search import fused_search_available


def realistic_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    w *= torch.exp(0.5 * torch.randn(rows, 1, generator=gen)) * 0.02  # uneven row scales
    w *= torch.exp(0.2 * torch.randn(1, cols, generator=gen))  # uneven column scales
    n_out = max(1, rows * cols // 20000)  # a few large outliers
    idx = torch.randint(0, rows * cols, (n_out,), generator=gen)
    w.view(-1)[idx] *= 10 + 40 * torch.rand(n_out, generator=gen)
    return w


def ggml_encoder(lib_path: str):
    """ggml's ggml_quantize_chunk through ctypes: encode(type name, float32 [m, k], imatrix) -> uint8."""
    import numpy as np
    from gguf import GGMLQuantizationType

    lib = load_ggml(lib_path)

    def encode(name: str, w: torch.Tensor, imatrix: torch.Tensor | None) -> np.ndarray:
        t = int(GGMLQuantizationType[name])
        x = np.ascontiguousarray(w.numpy(), dtype=np.float32)
        m, k = x.shape
        out = np.empty((m, lib.ggml_row_size(t, k)), dtype=np.uint8)
        im = None if imatrix is None else np.ascontiguousarray(imatrix.numpy(), dtype=np.float32)
        lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, m, k, None if im is None else im.ctypes.data)
        return out

    return encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_0,Q4_1,Q5_0,Q5_1,IQ4_NL,Q4_K,Q5_K,Q6_K,Q8_0,Q3_K,Q2_K,IQ4_XS")
    parser.add_argument("--paths", default="ref,imatrix")
    parser.add_argument("--shapes", default="12288x4608,4608x12288")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per case (best is kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--rows", type=int, default=0, help="encode only the first N rows of each shape")
    parser.add_argument("--ggml", default=None, help="libggml-base.so: time ggml's single-thread encoder too")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU seconds (with --threads 1, steadier than wall time on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tensors = {s: realistic_weight(*s, seed=i) for i, s in enumerate(shapes)}
    if args.rows:
        tensors = {s: w[: args.rows].contiguous() for s, w in tensors.items()}
    ggml = ggml_encoder(args.ggml) if args.ggml else None
    fused = fused_search_available()  # compiles the kernel here, outside the timings
    lanes = fused_kernel.search_lanes()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, compiled Q4_K/Q5_K kernel: {'on' if fused else 'off'}"
          f"{f', {lanes} blocks per vector' if lanes else ''}")
    head = f"{'type':6s} {'path':8s} {'shape':>12s} {'seconds':>9s} {'M weights/s':>12s}"
    print(head + (f" {'ggml 1 thr':>11s} {'ratio':>6s} same" if ggml else ""))
    for name in args.types.split(","):
        cls = ggml_type(name)
        for path in args.paths.split(","):
            for shape, w in tensors.items():
                gen = torch.Generator().manual_seed(1)
                imatrix = None if path == "ref" else torch.rand(shape[1], generator=gen) * 2 + 0.1
                cls.quantize_tensor(w[:64], imatrix)  # warm-up (lazy checks, allocator)
                best = float("inf")
                for _ in range(args.repeat):
                    t0 = clock()
                    ours = cls.quantize_tensor(w, imatrix)
                    best = min(best, clock() - t0)
                rate = w.numel() / best / 1e6
                line = f"{name:6s} {path:8s} {w.shape[0]:>5d}x{w.shape[1]:<6d} {best:9.2f} {rate:12.1f}"
                if ggml is not None:
                    theirs_best = float("inf")
                    for _ in range(args.repeat):
                        t0 = clock()
                        theirs = ggml(name, w, imatrix)
                        theirs_best = min(theirs_best, clock() - t0)
                    theirs_rate = w.numel() / theirs_best / 1e6
                    same = "yes" if (ours.numpy() == theirs).all() else "NO"
                    line += f" {theirs_rate:11.1f} {rate / theirs_rate:6.2f} {same}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
