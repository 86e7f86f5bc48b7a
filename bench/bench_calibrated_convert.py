"""Cost of activation-aware GGUF at full width: calibration, plain, aware and budgeted conversions.

On a full-width 2-block FP8 synthetic checkpoint (the one `bench_convert.py` uses), each step
runs as its own child process, as a user would run it, and is measured alone (wall seconds,
peak RSS of that child through `os.wait4`):

1. `ideoquant calibrate SRC --synthetic` (small settings: the statistics' size, not their
   quality, is measured here); the statistics file size per branch, scaled to 34 blocks;
2. `convert --format q4_k` (round-to-nearest);
3. `convert --format q4_k --calibration STATS` (error feedback on every block linear);
4. `convert --format q4_k_m --calibration STATS --max-size <the plain q4_k pair's bytes>`.

    .venv/bin/python bench/bench_calibrated_convert.py --work bench_out
    .venv/bin/python bench/bench_calibrated_convert.py --work bench_out --reuse-statistics --runs aware
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ideoquant.io.source import open_source
from ideoquant.io.synthetic import write_synthetic_pipeline
from ideoquant.model.inventory import ModelDims


def run_measured(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (GiB) of one child process; exits on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd[2:5])} failed: {stderr.strip().splitlines()[-1] if stderr.strip() else status}")
    return {"seconds": wall, "peak_rss_gib": usage.ru_maxrss / 2**20}


def folder_bytes(folder: Path, suffix: str) -> int:
    """Bytes of the files with this suffix in a folder tree."""
    return sum(p.stat().st_size for p in folder.rglob(f"*{suffix}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("bench_out"))
    parser.add_argument("--calibration", default="--inputs 2 --steps 2 --resolution 256",
                        help="extra `calibrate` arguments (one string)")
    parser.add_argument("--runs", default="plain,aware,budget",
                        help="conversions to measure: plain (q4_k), aware (q4_k --calibration), budget "
                             "(q4_k_m --calibration --max-size; needs plain in the same run or a previous report)")
    parser.add_argument("--reuse-statistics", action="store_true",
                        help="keep the statistics file of an earlier run instead of calibrating again")
    args = parser.parse_args()

    src = args.work / f"full-{args.layers}blocks-fp8"
    if not (src / "model_index.json").exists():
        t0 = time.perf_counter()
        write_synthetic_pipeline(src, size="full", layers=args.layers, dtype="fp8", seed=0, overwrite=True)
        print(f"synthesized {src} in {time.perf_counter() - t0:.1f}s", flush=True)
    source = open_source(src)
    weights = sum(bs.total_weights for bs in source.branches.values())
    cli = [sys.executable, "-m", "ideoquant.cli"]
    stats = args.work / "full-stats.safetensors"
    report_path = args.work / "calibrated_convert.json"
    report: dict = {"layers": args.layers, "weights": weights, "runs": {}}
    if report_path.exists():  # runs not repeated now keep their earlier figures
        earlier = json.loads(report_path.read_text())
        if earlier.get("layers") == args.layers:
            report["runs"] = earlier.get("runs", {})
    if args.reuse_statistics and stats.exists():
        print(f"statistics: reusing {stats}", flush=True)
    else:
        calib = run_measured([*cli, "calibrate", str(src), "--synthetic", "--out", str(stats), "--overwrite", "--quiet",
                              *args.calibration.split()])
        stats_bytes = stats.stat().st_size
        per_branch_full = stats_bytes / len(source.branches) * ModelDims().num_layers / args.layers
        report["runs"]["calibrate"] = {**calib, "stats_bytes": stats_bytes,
                                       "stats_bytes_per_branch_34_blocks": per_branch_full}
        print(f"calibrate {args.calibration}: {calib['seconds']:.1f} s, peak RSS {calib['peak_rss_gib']:.2f} GiB, "
              f"statistics {stats_bytes / 2**30:.3f} GiB (about {per_branch_full / 1e9:.2f} GB per branch at "
              f"{ModelDims().num_layers} blocks)", flush=True)

    plain_bytes = report["runs"].get("q4_k", {}).get("gguf_bytes")
    wanted = set(args.runs.split(","))
    runs = {
        name: extra for key, name, extra in (
            ("plain", "q4_k", ["--format", "q4_k"]),
            ("aware", "q4_k --calibration", ["--format", "q4_k", "--calibration", str(stats)]),
            ("budget", "q4_k_m --calibration --max-size",
             ["--format", "q4_k_m", "--calibration", str(stats), "--max-size", None]),
        ) if key in wanted
    }
    if None in sum(runs.values(), []) and plain_bytes is None and "plain" not in wanted:
        sys.exit("budget needs the plain q4_k pair's bytes: add plain to --runs")
    print(f"{'conversion':<34} {'wall s':>8} {'M weights/s':>12} {'peak RSS GiB':>13} {'GGUF bytes':>14}")
    for name, extra in runs.items():
        out = args.work / ("out-" + name.replace(" --", "-").replace(" ", ""))
        shutil.rmtree(out, ignore_errors=True)
        extra = [str(plain_bytes) if a is None else a for a in extra]
        result = run_measured([*cli, "convert", str(src), "--out", str(out), "--quiet", *extra])
        size = folder_bytes(out, ".gguf")
        if name == "q4_k":
            plain_bytes = size
        result.update({"rate_m_weights_s": weights / result["seconds"] / 1e6, "gguf_bytes": size, "out": str(out),
                       "measured_at": time.strftime("%Y-%m-%d %H:%M")})
        report["runs"][name] = result
        print(f"{name:<34} {result['seconds']:8.1f} {result['rate_m_weights_s']:12.2f} "
              f"{result['peak_rss_gib']:13.2f} {size:14d}", flush=True)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{weights / 1e6:.0f} M weights (both branches); report: {report_path}")


if __name__ == "__main__":
    main()
