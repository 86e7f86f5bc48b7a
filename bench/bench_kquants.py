"""Encoder speed of the ggml types on full-width Ideogram 4 shaped float32 tensors.

For each type (Q4_0, Q4_K, Q5_K, Q6_K, Q8_0, Q3_K, Q2_K, IQ4_XS) and each path (ggml's `_ref`
encoder without an importance matrix, its `_impl` encoder with one) this encodes [12288, 4608]
and [4608, 12288] float32 tensors through `quantize_tensor` (the converter's entry point: row
chunks, inner chunks, padding, packing, everything) and prints weights per second. With
`--ggml path/to/libggml-base.so` it also times ggml's own C encoder (`ggml_quantize_chunk`, one
thread) on the same tensors in the same run, checks that the bytes are the same, and prints
the ratio.

The tensors look like trained weights: gaussian rows with uneven (log-normal) row scales,
per-column scale variation, and a few large outliers.

Usage: python bench/bench_kquants.py [--types Q4_K,Q6_K] [--paths ref,imatrix]
       [--shapes 12288x4608,4608x12288] [--repeat 1] [--threads N] [--ggml ../shared/tools/libggml-base.so]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


class GGMLEncoder:
    """ggml's `ggml_quantize_chunk` through ctypes: its single-thread C encoders."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def quantize(self, cls, w: torch.Tensor, imatrix: torch.Tensor | None) -> np.ndarray:
        x = np.ascontiguousarray(w.numpy(), dtype=np.float32)
        out = np.empty((x.shape[0], cls.row_bytes(x.shape[1])), dtype=np.uint8)
        im = None if imatrix is None else np.ascontiguousarray(imatrix.numpy(), dtype=np.float32)
        self.lib.ggml_quantize_chunk(int(cls.qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                     None if im is None else im.ctypes.data)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_0,Q4_K,Q5_K,Q6_K,Q8_0,Q3_K,Q2_K,IQ4_XS")
    parser.add_argument("--paths", default="ref,imatrix")
    parser.add_argument("--shapes", default="12288x4608,4608x12288")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per case (best is kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--ggml", type=Path, default=None, help="libggml-base.so: also time ggml's encoder")
    args = parser.parse_args()
    ggml = GGMLEncoder(args.ggml) if args.ggml else None
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tensors = {s: realistic_weight(*s, seed=i) for i, s in enumerate(shapes)}
    fused = fused_search_available()  # compiles the kernel here, outside the timings
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, compiled Q4_K/Q5_K kernel: {'on' if fused else 'off'}")
    head = f"{'type':6s} {'path':8s} {'shape':>12s} {'seconds':>9s} {'M weights/s':>12s}"
    print(head + (f" {'ggml 1 thread':>14s} {'ratio':>6s} {'same bytes':>10s}" if ggml else ""))
    for name in args.types.split(","):
        cls = ggml_type(name)
        for path in args.paths.split(","):
            for shape, w in tensors.items():
                gen = torch.Generator().manual_seed(1)
                imatrix = None if path == "ref" else torch.rand(shape[1], generator=gen) * 2 + 0.1
                cls.quantize_tensor(w[:64], imatrix)  # warm-up (lazy checks, allocator)
                best = float("inf")
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    ours = cls.quantize_tensor(w, imatrix)
                    best = min(best, time.perf_counter() - t0)
                rate = w.numel() / best / 1e6
                line = f"{name:6s} {path:8s} {shape[0]:>5d}x{shape[1]:<6d} {best:9.2f} {rate:12.1f}"
                if ggml is not None:
                    t0 = time.perf_counter()
                    theirs = ggml.quantize(cls, w, imatrix if cls.uses_imatrix else None)
                    ggml_rate = w.numel() / (time.perf_counter() - t0) / 1e6
                    same = np.array_equal(ours.numpy(), theirs)
                    line += f" {ggml_rate:14.1f} {rate / ggml_rate:5.2f}x {'yes' if same else 'NO':>10s}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
