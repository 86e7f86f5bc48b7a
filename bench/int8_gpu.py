"""Int8Linear against a bf16 nn.Linear at Ideogram 4's real shapes, timed with CUDA events.

M = 4096 image + 2048 text tokens (one 1024px image with a full text window); K/N of the
block linears. Three timings per shape: the bf16 linear, the whole Int8Linear forward
(per-token activation quantization + int8 GEMM + scales), and the bare `torch._int_mm`.

    .venv/bin/python bench/int8_gpu.py [--tokens 6144] [--repeats 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ideoquant.codecs.int8 import quantize_per_token, quantize_weight_per_channel
from ideoquant.runtime.int8_loader import Int8Linear

HIDDEN, FFN = 4608, 12288
SHAPES = {  # name: (in_features K, out_features N)
    "attention.qkv": (HIDDEN, 3 * HIDDEN),
    "attention.o": (HIDDEN, HIDDEN),
    "feed_forward.w1": (HIDDEN, FFN),
    "feed_forward.w2": (FFN, HIDDEN),
}


def time_ms(fn, repeats: int, warmup: int = 5) -> float:
    """Median milliseconds of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096 + 2048)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("int8_gpu.py needs a CUDA GPU")
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  M = {args.tokens}")
    print(f"{'linear':<17} {'K':>6} {'N':>6} {'bf16 ms':>8} {'int8 ms':>8} {'_int_mm ms':>10} {'speedup':>8} {'rel err':>8}")
    for name, (k, n) in SHAPES.items():
        weight = torch.randn((n, k), device=device, generator=gen) / k**0.5
        x = torch.randn((args.tokens, k), device=device, generator=gen, dtype=torch.bfloat16)
        dense = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        dense.weight.copy_(weight)
        q, scale = quantize_weight_per_channel(weight)
        int8 = Int8Linear(q, scale).to(device)
        qx, _ = quantize_per_token(x)
        wt = int8.weight.t()
        t_bf16 = time_ms(lambda: dense(x), args.repeats)
        t_int8 = time_ms(lambda: int8(x), args.repeats)
        t_mm = time_ms(lambda: torch._int_mm(qx, wt), args.repeats)
        ref = dense(x).float()
        err = float((int8(x).float() - ref).norm() / ref.norm())
        rows.append({"linear": name, "K": k, "N": n, "M": args.tokens, "bf16_ms": t_bf16, "int8_ms": t_int8,
                     "int_mm_ms": t_mm, "speedup": t_bf16 / t_int8, "rel_error": err})
        print(f"{name:<17} {k:6d} {n:6d} {t_bf16:8.3f} {t_int8:8.3f} {t_mm:10.3f} {t_bf16 / t_int8:8.2f} {err:8.4f}")
        del weight, dense, int8, q, qx, x
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
