"""The convert pipeline: source -> (calibration, smoothing) -> quantize -> write -> verify -> card.

Each format supplies one branch writer with the signature of `BranchWriter`; this module
runs it for every selected branch, inside one `OutputSet` so that a failure anywhere
leaves no finished-looking output behind.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from tqdm import tqdm

from . import __version__
from .errors import IdeoquantError
from .memory import reuse_freed_memory
from .recipe import ALL_FORMATS, is_gguf_format
from .source import BranchSource, Source, open_source
from .writers.files import OutputSet

log = logging.getLogger("ideoquant")


@dataclass
class ConvertOptions:
    """Everything a user can ask of one conversion."""

    fmt: str
    out: Path
    branches: str = "both"
    overwrite: bool = False
    quiet: bool = False
    imatrix: str | None = None  # GGUF: None, "ones", or a calibration statistics file
    calibration: Path | None = None  # INT8: statistics file from `ideoquant calibrate`
    alpha: float | None = None  # INT8: fixed SmoothQuant alpha (None = searched per linear)
    protect: int = 17  # INT8: the N linears with the worst measured W8A8 error stay bf16
    protect_patterns: tuple[str, ...] = ()
    all_linears: bool = False  # NF4: quantize the one-row adaLN linears too (as the official release)
    double_quant: bool = False  # NF4
    layout: str = "diffusers"  # INT8/NF4 tensor names: diffusers or fused
    compute_dtype: str = "bfloat16"
    base_model: str | None = None
    max_shard_bytes: int = 10 * 2**30


@dataclass
class TensorReport:
    """What happened to one tensor: its output type and measured error against the source."""

    name: str
    shape: tuple[int, ...]
    out_type: str
    nbytes: int
    rel_error: float | None = None
    note: str = ""


@dataclass
class BranchResult:
    """One converted branch: its files, per-tensor report and recipe metadata."""

    branch: str
    files: list[Path]
    tensors: list[TensorReport]
    recipe: dict = field(default_factory=dict)
    source_checksum: str = ""
    source_bytes: int = 0
    weights: int = 0
    seconds: float = 0.0
    # sha256 of output files computed while writing (by file name), reused by the card.
    file_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def output_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files if p.exists())

    def error_summary(self) -> dict:
        errs = [(t.rel_error, t.name) for t in self.tensors if t.rel_error is not None and t.out_type not in ("F32",)]
        quantized = [e for e in errs if e[0] > 0]
        if not quantized:
            return {"mean": 0.0, "max": 0.0, "worst": []}
        return {
            "mean": sum(e for e, _ in quantized) / len(quantized),
            "max": max(e for e, _ in quantized),
            "worst": [n for _, n in sorted(quantized, reverse=True)[:5]],
        }


class Progress:
    """A byte-counting progress bar per branch (silent with --quiet)."""

    def __init__(self, branch: str, total_bytes: int, quiet: bool):
        self.bar = None if quiet else tqdm(total=total_bytes, unit="B", unit_scale=True, desc=branch, leave=True)

    def start(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=False)

    def note(self, text: str) -> None:
        """Say what is happening before the next tensor starts (shown at once)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def advance(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BranchWriter(Protocol):
    def __call__(self, bs: BranchSource, source: Source, options: ConvertOptions, outputs: OutputSet, progress: Progress) -> BranchResult: ...


def branch_writer(fmt: str) -> BranchWriter:
    """The branch writer of a format."""
    if is_gguf_format(fmt):
        from .formats.gguf import write_gguf_branch

        return write_gguf_branch
    if fmt == "int8":
        from .formats.int8 import write_int8_branch

        return write_int8_branch
    if fmt == "nf4":
        from .formats.nf4_checkpoint import write_nf4_branch

        return write_nf4_branch
    raise IdeoquantError(f"unknown format {fmt!r}; choose one of {', '.join(ALL_FORMATS)}")


def convert(src: str, options: ConvertOptions, on_branch_done: Callable[[BranchResult], None] | None = None) -> list[BranchResult]:
    """Convert the selected branches of SRC to one format under options.out."""
    writer = branch_writer(options.fmt)
    reuse_freed_memory()
    source = open_source(src, options.branches)
    outputs = OutputSet(overwrite=options.overwrite)
    results: list[BranchResult] = []
    # Hash the sources in the background: the second branch's checksum is ready by the
    # time its header is written (hashing releases the GIL).
    threading.Thread(target=lambda: [bs.checksum() for bs in source.branches.values()], daemon=True).start()
    try:
        for branch, bs in source.branches.items():
            t0 = time.perf_counter()
            progress = Progress(branch, sum(bs.stored_nbytes(n) for n in bs.specs), options.quiet)
            try:
                result = writer(bs, source, options, outputs, progress)
            finally:
                progress.close()
            result.seconds = time.perf_counter() - t0
            result.weights = bs.total_weights
            results.append(result)
            if on_branch_done:
                on_branch_done(result)
        from .model_card import write_model_card

        write_model_card(source, options, results, outputs)
    except BaseException:
        outputs.discard()
        raise
    return results


def common_metadata(bs: BranchSource, source: Source, options: ConvertOptions) -> dict[str, str]:
    """The `ideoquant.*` provenance every output file carries."""
    return {
        "ideoquant.version": __version__,
        "ideoquant.branch": bs.branch,
        "ideoquant.format": options.fmt,
        "ideoquant.source.name": source.name,
        "ideoquant.source.checksum": bs.checksum(),
        "ideoquant.source.dtype": bs.source_dtype,
        "ideoquant.source.layout": bs.layout,
    }
