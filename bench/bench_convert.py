"""Whole-process conversion speed and peak memory on a full-width 2-block synthetic checkpoint.

Runs `ideoquant convert` in a child process (imports, reading, encoding, writing and
verification all included) and reports wall time, weights per second and the child's
peak RSS. Usage: python bench/bench_convert.py --format q8_0 [--layers 2] [--work bench_out] [--extra="--imatrix ones"]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ideoquant.io.source import open_source
from ideoquant.io.synthetic import write_synthetic_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="q8_0")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("bench_out"))
    parser.add_argument("--extra", default="", help='Extra convert arguments, one string: --extra="--imatrix ones".')
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
    print(f"format {args.format}: {weights / 1e6:.0f} M weights (both branches, {args.layers} blocks, full width)")
    print(f"wall {wall:.2f} s  ->  {weights / wall / 1e6:.1f} M weights/s (whole process)")
    print(f"peak RSS {peak_kib / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
