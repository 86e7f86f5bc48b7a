"""The convert pipeline's option, progress and result types, shared by every branch writer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from .. import __version__
from ..io.source import BranchSource, Source
from ..io.staging import OutputSet
from ..recipes.formats import DEFAULT_LAYOUT
from ..recipes.int8_policy import DEFAULT_PROTECT_BUDGET, ProtectBudget


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
    rounding: str = "error_feedback"  # INT8 weights: GPTQ error feedback or round-to-nearest
    # INT8 protection: a budget of bf16 bytes (fraction of the int8-eligible weights or a size)
    # spent on the linears with the best measured error reduction per byte...
    protect_budget: ProtectBudget | str | float = DEFAULT_PROTECT_BUDGET
    protect: int | None = None  # ...or an explicit count: the N largest measured impacts stay bf16
    protect_patterns: tuple[str, ...] = ()
    all_linears: bool = False  # NF4: quantize the one-row adaLN linears too (as the official release)
    double_quant: bool = False  # NF4
    layout: str = DEFAULT_LAYOUT  # INT8/NF4 tensor names: diffusers or fused
    compute_dtype: str = "bfloat16"
    base_model: str | None = None
    clamp_overflow: bool = False  # GGUF F16/BF16: values beyond the type's range stored as its largest value
    max_shard_bytes: int = 10 * 2**30
    max_size: int | None = None  # GGUF: bytes of both files; types per tensor from measured sensitivity
    # GGUF under --max-size: branch -> the planned type of every tensor (set by the pipeline).
    type_plan: dict | None = None


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
