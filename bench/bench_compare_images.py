"""Peak memory and time of `ideoquant compare --images` on one pair of large PNGs.

Writes two WIDTHxHEIGHT RGB PNGs (a smooth pattern and a noisy copy of it), runs the
command in a child process and reports its wall time and peak RSS. Images above the pixel
limit (8192x8192) are refused with one line before decoding.
Usage: python bench/bench_compare_images.py [--width 8192] [--height 8192] [--work bench_out]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_pair(folder_a: Path, folder_b: Path, width: int, height: int) -> None:
    """Two PNGs of the given size, written a band of rows at a time into one array each."""
    rng = np.random.default_rng(0)
    a = np.empty((height, width, 3), dtype=np.uint8)
    x = np.arange(width, dtype=np.float32)
    for r in range(0, height, 1024):
        y = np.arange(r, min(r + 1024, height), dtype=np.float32)[:, None]
        for c in range(3):
            a[r : r + 1024, :, c] = (127.5 + 127.5 * np.sin((x + 7 * c) / 97.0) * np.cos(y / 131.0)).astype(np.uint8)
    folder_a.mkdir(parents=True, exist_ok=True)
    folder_b.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(folder_a / "img.png", compress_level=1)
    for r in range(0, height, 1024):
        band = a[r : r + 1024].astype(np.int16) + rng.integers(-3, 4, a[r : r + 1024].shape, dtype=np.int16)
        a[r : r + 1024] = np.clip(band, 0, 255).astype(np.uint8)
    Image.fromarray(a).save(folder_b / "img.png", compress_level=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--height", type=int, default=8192)
    parser.add_argument("--work", type=Path, default=Path("bench_out"))
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    base = args.work / f"images-{args.width}x{args.height}"
    if args.write_only:
        write_pair(base / "a", base / "b", args.width, args.height)
        return
    if not (base / "b" / "img.png").exists():
        # In a child: a fork of this process would otherwise carry the images' pages into
        # the measured command's peak RSS.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write-only", "--width", str(args.width), "--height",
                        str(args.height), "--work", str(args.work)], check=True)
        print(f"wrote {base} in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ideoquant.cli", "compare", "--images", str(base / "a"), str(base / "b")],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print((proc.stdout + proc.stderr).strip())
    print(f"{args.width}x{args.height} ({args.width * args.height / 1e6:.1f} MP): exit {proc.returncode}, "
          f"{seconds:.1f} s, peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
