"""Cost of the per-chunk work around the encoder: measuring the error (decoding and
`ErrorMeter.add`, with and without its finiteness check, or the C++ error sums of
`ErrorMeter.add_encoded`) and the FP8 decode (torch with and without its large-scale
branch, and the C++ decoder).

Interleaves the variants over many repetitions of one full-width chunk (2 M weights, as the
converter reads them) and reports the median time of each, so that a busy machine slows all
variants alike. Usage: python bench/bench_output_checks.py [--repeat 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ideoquant.codecs.fp8 import fp8_to_float32, fp8_to_float32_eager
from ideoquant.codecs.ggml.registry import ggml_type
from ideoquant.export.error_meter import ErrorMeter
from gguf import GGMLQuantizationType


def fp8_to_float32_unchecked(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The decode without the large-scale branch (the fused 2^8 always in the scale)."""
    half = (w.view(torch.int8).to(torch.int16) << 7).bitwise_and_(-16512).view(torch.float16)
    return half.to(torch.float32).mul_(scale * 256.0)


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, width = 512, 4096  # 2 M weights: one chunk of a full-width linear
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(rows, width, generator=g)
    q8 = ggml_type(GGMLQuantizationType.Q8_0)
    approx = q8.dequantize_rows(q8.quantize_rows(exact))
    codes = (exact / exact.abs().amax() * 400).to(torch.float8_e4m3fn)
    scale = torch.rand(rows, 1, generator=g) * 1e-2

    data = q8.quantize_rows(exact)
    q8.error_sums(data, exact)  # builds and checks the kernel outside the timing
    fp8_to_float32(codes, scale)
    variants = {
        "meter, unnamed": lambda: ErrorMeter().add(approx, exact),
        "meter, named (finiteness checked)": lambda: ErrorMeter("w", "Q8_0").add(approx, exact),
        "decode + meter, named": lambda: ErrorMeter("w", "Q8_0").add(q8.dequantize_rows(data), exact),
        "error sums in C++ (add_encoded)": lambda: ErrorMeter("w", "Q8_0").add_encoded(q8, data, exact),
        "fp8 decode in torch, unchecked": lambda: fp8_to_float32_unchecked(codes, scale),
        "fp8 decode in torch": lambda: fp8_to_float32_eager(codes, scale),
        "fp8 decode in C++": lambda: fp8_to_float32(codes, scale),
    }
    results = {name: [] for name in variants}
    for _ in range(3):  # interleaved rounds
        for name, fn in variants.items():
            results[name].append(median_ms(fn, args.repeat))
    print(f"{rows} x {width} float32 chunk, {args.threads} thread(s), median of {args.repeat} x 3 rounds")
    for name, ms in results.items():
        print(f"  {name:36s} {min(ms):7.2f} ms (rounds: {', '.join(f'{m:.2f}' for m in ms)})")


if __name__ == "__main__":
    main()
