"""`ideoquant demo`: a tiny synthetic FP8 checkpoint converted to every format, summarised."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..io.synthetic import write_synthetic_pipeline
from .convert import convert
from .options import ConvertOptions
from .report import bits_per_weight, format_table, human_bytes

DEMO_FORMATS = ("f32", "bf16", "f16", "q8_0", "q6_k", "q5_k", "q5_k_m", "q5_1", "q5_0", "q4_k", "q4_k_m", "q4_1", "q4_0", "iq4_nl", "nf4", "int8")


def run_demo(out: Path, formats: tuple[str, ...] = DEMO_FORMATS, seed: int = 0) -> str:
    """Synthesize, calibrate, convert to each format; return the summary table."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    source = out / "source"
    write_synthetic_pipeline(source, size="tiny", dtype="fp8", seed=seed)
    stats = None
    rows = []
    for fmt in formats:
        options = ConvertOptions(fmt=fmt, out=out / fmt, quiet=True)
        if fmt == "int8":
            from ..calibrate.run import calibrate_synthetic

            stats = stats or calibrate_synthetic(source, out / "calibration.safetensors")
            options.calibration = stats
        for r in convert(str(source), options):
            err = r.error_summary()
            rows.append([
                fmt,
                r.branch,
                ", ".join(sorted({str(p.relative_to(out)) for p in r.files if p.suffix in (".gguf", ".safetensors")})),
                human_bytes(r.output_bytes),
                f"{bits_per_weight(r):.2f}",
                f"{err['mean']:.2e}",
                f"{err['max']:.2e}",
            ])
    header = ["format", "branch", "file", "size", "bits/weight", "mean rel err", "worst rel err"]
    return format_table(header, rows)
