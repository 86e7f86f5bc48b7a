"""Every ggml type, plain and with an importance matrix, against ggml's single thread: one run.

Runs `bench_convert.py` once per row (each conversion its own child process, ggml timed on
the same tensors right after it) on the full-width 2-block FP8 checkpoint and prints one
table of whole-process rate, ggml's rate, their ratio and the converter's peak RSS.

Usage: python bench/speed_table.py [--work bench_out] [--ggml ../shared/tools/libggml-base.so]
       [--formats q4_k,q2_k]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (format, extra convert arguments, rows of each tensor ggml is timed on, OMP threads or None)
ROWS = [
    ("q8_0", "", 0, 1), ("q8_0", "", 0, None),
    ("q4_k", "", 1024, None), ("q4_k", "--imatrix ones", 1024, None),
    ("q5_k", "", 1024, None), ("q5_k", "--imatrix ones", 1024, None),
    ("q6_k", "", 1024, None), ("q6_k", "--imatrix ones", 1024, None),
    ("q4_0", "", 1024, None), ("q4_0", "--imatrix ones", 1024, None),
    ("q4_1", "", 1024, None), ("q4_1", "--imatrix ones", 256, None),
    ("q5_0", "", 1024, None), ("q5_0", "--imatrix ones", 256, None),
    ("q5_1", "", 1024, None), ("q5_1", "--imatrix ones", 256, None),
    ("q3_k", "", 1024, None), ("q3_k", "--imatrix ones", 256, None),
    ("q2_k", "", 1024, None), ("q2_k", "--imatrix ones", 256, None),
    ("iq4_nl", "", 256, None), ("iq4_nl", "--imatrix ones", 256, None),
    ("iq4_xs", "", 256, None), ("iq4_xs", "--imatrix ones", 256, None),
]
PATTERNS = {
    "ours": r"->\s+([\d.]+) M weights/s \(whole process\)",
    "ggml": r"->\s+([\d.]+) M weights/s \(encoder only\)",
    "ratio": r"ratio ([\d.]+)x",
    "rss": r"peak RSS ([\d.]+) GiB",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench_out")
    parser.add_argument("--ggml", default=str(HERE.parents[1] / "shared" / "tools" / "libggml-base.so"))
    parser.add_argument("--formats", default="", help="comma-separated subset of the formats")
    args = parser.parse_args()
    wanted = set(filter(None, args.formats.split(",")))
    print("| format | path | ideoquant, M weights/s | ggml, 1 thread | ratio | peak RSS |")
    print("|---|---|---:|---:|---:|---:|")
    for fmt, extra, rows, omp in ROWS:
        if wanted and fmt not in wanted:
            continue
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(omp)} if omp else {}))
        cmd = [sys.executable, str(HERE / "bench_convert.py"), "--format", fmt, "--work", args.work,
               "--ggml", args.ggml, f"--extra={extra}"] + (["--ggml-rows", str(rows)] if rows else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = {k: re.search(p, proc.stdout) for k, p in PATTERNS.items()}
        if proc.returncode != 0 or not all(found.values()):
            print(f"| {fmt} | {extra or 'plain'} | failed: {(proc.stderr or proc.stdout).strip()[-200:]} | | | |")
            continue
        label = ("imatrix" if extra else "plain") + (f", OMP_NUM_THREADS={omp}" if omp else "")
        v = {k: m.group(1) for k, m in found.items()}
        print(f"| {fmt} | {label} | {v['ours']} | {v['ggml']} | {v['ratio']}x | {v['rss']} GiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
