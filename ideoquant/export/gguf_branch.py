"""GGUF output: one file per branch, bare fused names, written streaming, then verified.

Layout rules every GGUF reader of this model relies on (see formats.md): GGUF v3,
32-byte alignment, data contiguous in tensor-info order, dims in ggml order (the `gguf`
package reverses torch's [out, in]), `general.architecture = "ideogram4"`, and `uncond`
in the unconditional file's name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from ..codecs.ggml.base import GGMLType
from ..codecs.ggml.registry import GGML_TYPES, ggml_type
from ..errors import IdeoquantError
from ..io.gguf_writer import ALIGNMENT, GGUFStreamWriter
from ..io.source import BranchSource, Source
from ..io.staging import OutputSet, ensure_free_space, sha256_file
from ..recipes.formats import gguf_file_tag
from ..recipes.gguf_policy import FILE_TYPES, TensorChoice, gguf_tensor_types
from .error_meter import ErrorMeter
from .options import (
    BranchResult,
    ConvertOptions,
    Progress,
    TensorReport,
    common_metadata,
)

if TYPE_CHECKING:
    from .gguf_calibration import FeedbackMeasurement

ARCHITECTURE = "ideogram4"
# Dense types --clamp-overflow applies to: (largest finite value, the magnitude from which
# float32 values round to Inf: the largest value plus half its ulp).
CLAMP_LIMITS = {
    GGMLQuantizationType.F16: (65504.0, 65520.0),
    GGMLQuantizationType.BF16: (float(torch.finfo(torch.bfloat16).max), float(torch.finfo(torch.bfloat16).max) + 2.0**119),
}
# Rows decoded again by the `gguf` package itself when verifying each tensor.
VERIFY_ROWS = 8


def gguf_file_name(branch: str, fmt: str) -> str:
    """`ideogram4-Q8_0.gguf`, `ideogram4-uncond-Q8_0.gguf`."""
    infix = "-uncond" if branch == "unconditional_transformer" else ""
    return f"ideogram4{infix}-{gguf_file_tag(fmt)}.gguf"


def importance_source(options: ConvertOptions, bs: BranchSource):
    """A function module -> importance vector (or None) for the K-quant `_impl` path."""
    if options.imatrix is None:
        return lambda module, width: None
    if options.imatrix == "ones":
        return lambda module, width: torch.ones(width)
    from ..calibrate.statistics import load_importance

    path = Path(options.imatrix)
    if not path.is_file():
        raise IdeoquantError(f"--imatrix {path}: no such statistics file")
    return lambda module, width: load_importance(path, module, branch=bs.branch)


def write_gguf_branch(
    bs: BranchSource, source: Source, options: ConvertOptions, outputs: OutputSet, progress: Progress
) -> BranchResult:
    """Quantize one branch to a GGUF file, streaming chunk by chunk, then verify it."""
    if options.type_plan is not None:
        choices = options.type_plan[bs.branch]
    else:
        choices = gguf_tensor_types(bs.dims, options.fmt)
    calibration = None
    if options.calibration is not None:
        from .gguf_calibration import GGUFCalibration, check_calibration_format

        if options.type_plan is None:
            check_calibration_format(options.fmt, choices)
        if options.imatrix is not None:
            raise IdeoquantError("--calibration takes its importance matrix from the statistics; leave out --imatrix")
        calibration = GGUFCalibration(Path(options.calibration), bs)
    if options.imatrix is not None and not any(ggml_type(c.qtype).uses_imatrix for c in choices):
        users = ", ".join(t.qtype.name for t in GGML_TYPES.values() if t.uses_imatrix)
        raise IdeoquantError(f"--imatrix has no effect on {options.fmt} (the types that use one: {users}); leave it out")
    if options.clamp_overflow and not any(c.qtype in CLAMP_LIMITS for c in choices):
        raise IdeoquantError(f"--clamp-overflow applies to f16/bf16 tensors; {options.fmt} stores none")
    path = options.out / gguf_file_name(bs.branch, options.fmt)
    outputs.claim(path)
    ensure_free_space(options.out, sum(tensor_nbytes(c) for c in choices))
    importance = importance_source(options, bs)
    # While the source is hashed for the header below (a first run compiles the K-quant kernel).
    progress.note("preparing the encoders")
    for qtype in dict.fromkeys(c.qtype for c in choices):
        ggml_type(qtype).prepare(imatrix=options.imatrix is not None or calibration is not None)
    recipe = {c.name: {"type": c.qtype.name, "reason": c.reason} for c in choices}
    if calibration is not None:
        for c in choices:
            if calibration.serves(c):
                recipe[c.name]["encoder"] = "error feedback"
    metadata: dict[str, str | int] = {
        "general.name": f"Ideogram 4 {'unconditional ' if bs.branch != 'transformer' else ''}{gguf_file_tag(options.fmt)}",
        "general.file_type": int(FILE_TYPES[options.fmt]),
        "general.quantization_version": GGML_QUANT_VERSION,
        **common_metadata(bs, source, options),
        "ideoquant.imatrix": options.imatrix or ("calibration" if calibration is not None else "none"),
        "ideoquant.recipe": json.dumps(recipe, separators=(",", ":")),
    }
    if options.clamp_overflow:
        metadata["ideoquant.clamp_overflow"] = "true"
    if calibration is not None:
        from .gguf_calibration import METADATA_KEY

        metadata[METADATA_KEY] = calibration.metadata()
    aware_measured: dict[str, FeedbackMeasurement] = {}
    reports: list[TensorReport] = []
    clamps: dict[str, int] = {}
    with outputs.writing(path) as staged:
        infos = [(c.name, c.shape, c.qtype, tensor_nbytes(c)) for c in choices]
        writer = GGUFStreamWriter(staged.file, ARCHITECTURE, metadata, infos)
        try:
            for c in choices:
                progress.start(c.name)
                cls = ggml_type(c.qtype)
                imatrix = None
                if cls.uses_imatrix and len(c.shape) == 2:
                    if calibration is not None:
                        imatrix = calibration.importance(c.name)
                    else:
                        imatrix = importance(c.name.rsplit(".", 1)[0], c.shape[1])
                limit = CLAMP_LIMITS.get(c.qtype)
                hint = f"; --clamp-overflow stores them as ±{limit[0]:g}" if limit and not options.clamp_overflow else ""
                meter = ErrorMeter(c.name, c.qtype.name, hint)
                clamped = 0
                writer.begin_tensor(c.name)
                if calibration is not None and calibration.serves(c):
                    weight = bs.read_float32(c.name)
                    aware = calibration.encode(cls, c.name, weight)
                    writer.write_chunk(aware.data.numpy())
                    meter.add_encoded(cls, aware.data, weight)
                    writer.end_tensor()
                    aware_measured[c.name] = aware.measured
                    reports.append(TensorReport(c.name, c.shape, c.qtype.name, tensor_nbytes(c), meter.relative(), aware.measured.note()))
                    progress.advance(bs.stored_nbytes(c.name))
                    continue
                for rows in bs.iter_float32_rows(c.name):
                    stored = rows
                    if limit is not None and options.clamp_overflow:
                        over = int(torch.count_nonzero(rows.abs() >= limit[1]))
                        if over:
                            stored, clamped = rows.clamp(-limit[0], limit[0]), clamped + over
                    data = cls.quantize_rows(stored, imatrix)
                    writer.write_chunk(data.numpy())
                    meter.add_encoded(cls, data, rows)  # the error of the clamp counts
                writer.end_tensor()
                note = ""
                if clamped:
                    clamps[c.name] = clamped
                    note = f"{clamped} values beyond the {c.qtype.name} range stored as ±{limit[0]:g} (--clamp-overflow)"
                reports.append(TensorReport(c.name, c.shape, c.qtype.name, tensor_nbytes(c), meter.relative(), note))
                progress.advance(bs.stored_nbytes(c.name))
            digest = writer.finish()
        finally:
            writer.close()
        # The sha256 of the stream as written goes into the card; `ideoquant verify` checks
        # the file against it. Here: structure, and the gguf package decoding every tensor.
        verify_gguf_file(staged.path, choices)
    return BranchResult(
        branch=bs.branch,
        files=[path],
        tensors=reports,
        recipe={
            "types": recipe,
            **({"max_size": options.max_size} if options.max_size is not None else {}),
            "imatrix": options.imatrix or ("calibration" if calibration is not None else "none"),
            **({"clamped": clamps} if clamps else {}),
            **({"calibration": calibration.recipe(aware_measured)} if calibration is not None else {}),
        },
        source_checksum=str(metadata["ideoquant.source.checksum"]),
        source_bytes=sum(bs.stored_nbytes(n) for n in bs.specs),
        file_sha256={str(path): digest},
    )


def _rows(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape[:-1]:
        n *= s
    return n


def tensor_nbytes(c: TensorChoice) -> int:
    """Bytes a tensor takes in its chosen type."""
    return ggml_type(c.qtype).row_bytes(c.shape[-1]) * _rows(c.shape)


def verify_gguf_file(path: Path, choices: list[TensorChoice], sha256: str | None = None) -> None:
    """Reopen with `gguf.GGUFReader`: names, order, shapes, types, alignment, contiguity, a
    decode of each tensor's first rows by the `gguf` package itself, and (given) the sha256
    of the whole file as it was written."""
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/struct errors on damage
        raise IdeoquantError(f"{path}: GGUF reader rejects the file ({e})") from None
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() != ARCHITECTURE:
        raise IdeoquantError(f"{path}: general.architecture is not {ARCHITECTURE!r}")
    if len(reader.tensors) != len(choices):
        raise IdeoquantError(f"{path}: {len(reader.tensors)} tensors, expected {len(choices)}")
    expected_offset = reader.data_offset
    for t, c in zip(reader.tensors, choices):
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.name != c.name or shape != c.shape or t.tensor_type != c.qtype:
            raise IdeoquantError(
                f"{path}: tensor {t.name} {list(shape)} {t.tensor_type.name} does not match planned "
                f"{c.name} {list(c.shape)} {c.qtype.name}"
            )
        if t.data_offset != expected_offset or t.data_offset % ALIGNMENT:
            raise IdeoquantError(f"{path}: tensor {t.name} data is not contiguous and aligned")
        expected_offset += -(-int(t.n_bytes) // ALIGNMENT) * ALIGNMENT
        _check_decode(path, t.name, np.asarray(t.data).reshape(-1).view(np.uint8), c)
    if expected_offset != path.stat().st_size:
        raise IdeoquantError(f"{path}: file is {path.stat().st_size} bytes, tensors end at {expected_offset}")
    if sha256 is not None and sha256_file(path) != sha256:
        raise IdeoquantError(f"{path}: bytes on disk differ from what was written")


def _check_decode(path: Path, name: str, raw: np.ndarray, c: TensorChoice) -> None:
    """The gguf package's numpy decoder and ours agree bit for bit on the first rows."""
    cls: type[GGMLType] = ggml_type(c.qtype)
    row_bytes = cls.row_bytes(c.shape[-1])
    rows = min(VERIFY_ROWS, _rows(c.shape))
    head = np.array(raw[: rows * row_bytes]).reshape(rows, row_bytes)
    if c.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        theirs = head.view(np.float32 if c.qtype == GGMLQuantizationType.F32 else np.float16).astype(np.float32)
    else:
        theirs = gguf_quants.dequantize(head, c.qtype).reshape(rows, -1)
    ours = cls.dequantize_rows(torch.from_numpy(head.copy())).numpy()
    if not np.array_equal(theirs.view(np.uint32), ours.view(np.uint32)):
        raise IdeoquantError(f"{path}: tensor {name} does not decode to the written values")
