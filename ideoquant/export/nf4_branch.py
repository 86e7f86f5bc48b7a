"""NF4 output: a diffusers branch folder in bitsandbytes' 4-bit serialization.

Per 4-bit linear the folder holds exactly what `bnb.nn.Linear4bit.state_dict()` holds:
`<m>.weight` (packed codes, uint8 [n/2, 1]), `<m>.weight.absmax`, `<m>.weight.quant_map`,
`<m>.weight.quant_state.bitsandbytes__nf4` and, with double quantization, the nested
absmax and map (see formats.md). Linears kept in higher precision are listed in
`quantization_config.llm_int8_skip_modules` and stored, like every other tensor, in the
compute dtype. `diffusers.Ideogram4Transformer2DModel.from_pretrained` loads the folder on a
GPU; `ideoquant.runtime.load_transformer` loads it anywhere.

Weights are encoded one tensor at a time from bounded float32 row chunks; a piece that
ends inside a 64-weight block is carried into the next, so the bytes equal those of
quantizing the whole tensor at once (`bitsandbytes.functional.quantize_4bit`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..codecs.nf4 import (
    NESTED_BLOCKSIZE,
    NF4_BLOCKSIZE,
    NestedAbsmax,
    _blockwise_dynamic_quantize,
    dequantize_nested_absmax,
    dequantize_nf4,
    double_quantize_absmax,
    dynamic_quant_map,
    nf4_serialized_tensors,
    quantize_nf4,
)
from ..errors import IdeoquantError
from ..io.safetensors_writer import DTYPE_NAMES, PlannedTensor, ShardedSafetensorsOutput
from ..io.source import BranchSource, Source
from ..io.staging import OutputSet, ensure_free_space
from ..model.inventory import (
    ModelDims,
    TensorSpec,
    expected_tensors,
    layout_modules,
    to_layout_names,
)
from ..recipes.formats import check_layout
from ..recipes.nf4_policy import nf4_kept_linears
from .error_meter import ErrorMeter
from .options import (
    BranchResult,
    ConvertOptions,
    Progress,
    TensorReport,
    common_metadata,
)

log = logging.getLogger("ideoquant")

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
RECIPE_METADATA_KEY = "ideoquant.nf4.recipe"
# Double quantization codes the absmax in blocks of 256; pieces aligned to 256 * 64 weights
# can be double-quantized on their own with the same result as the whole vector.
DOUBLE_QUANT_UNIT = NF4_BLOCKSIZE * NESTED_BLOCKSIZE
# Source rows per read: 16 M float32 weights (64 MB) at most.
CHUNK_WEIGHTS = 1 << 24


def quantization_config(skip_modules: list[str], double_quant: bool, compute_dtype: str) -> dict:
    """The `quantization_config` diffusers' `BitsAndBytesConfig.to_dict()` writes for NF4 (same keys, same order)."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": list(skip_modules),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": bool(double_quant),
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


def _diffusers_version() -> str:
    """The installed diffusers version, from package metadata (importing diffusers costs seconds)."""
    from importlib.metadata import version

    return version("diffusers")


def branch_config(bs: BranchSource, skip_modules: list[str], double_quant: bool, compute_dtype: str) -> dict:
    """The branch config.json: model arguments (source extras kept) plus the bitsandbytes quantization_config."""
    # The source's own values (rope_theta, norm_eps, ...) win over the defaults of the dims.
    config = {**bs.dims.to_config(), **(bs.config or {})}
    config.pop("quantization_config", None)
    config.setdefault("_class_name", "Ideogram4Transformer2DModel")
    config.setdefault("_diffusers_version", _diffusers_version())
    config["quantization_config"] = quantization_config(skip_modules, double_quant, compute_dtype)
    return config


# --- the plan ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputPart:
    """One stored weight or tensor: a canonical tensor, or a row range of it (q, k or v of qkv)."""

    name: str  # stored name in the chosen layout
    spec: TensorSpec
    rows: tuple[int, int]
    quantized: bool

    @property
    def shape(self) -> tuple[int, ...]:
        """The stored (logical) shape."""
        return (self.rows[1] - self.rows[0],) + tuple(self.spec.shape[1:])

    @property
    def numel(self) -> int:
        """Number of values."""
        return math.prod(self.shape)

    @property
    def prefix(self) -> str:
        """The module path (the name without `.weight`)."""
        return self.name[: -len(".weight")]


def output_parts(dims: ModelDims, layout: str, kept: list[str]) -> list[OutputPart]:
    """Every stored tensor of a branch in canonical order; linears outside `kept` are 4-bit."""
    kept_set = set(kept)
    parts = []
    for spec in expected_tensors(dims):
        names = to_layout_names(spec.name, layout)
        rows = spec.shape[0] // len(names)
        quantized = spec.kind == "linear" and spec.module not in kept_set
        parts += [OutputPart(n, spec, (i * rows, (i + 1) * rows), quantized) for i, n in enumerate(names)]
    return parts


def _serialized_layout(part: OutputPart, compute_dtype: torch.dtype, offset: float | None) -> dict[str, torch.Tensor]:
    """The tensors `nf4_serialized_tensors` emits for a part, built on zero-stride stand-ins (no memory)."""
    n = part.numel
    blocks = -(-n // NF4_BLOCKSIZE)
    nested = None
    if offset is not None:
        nested = NestedAbsmax(
            codes=torch.zeros(1, dtype=torch.uint8).expand(blocks),
            nested_absmax=torch.zeros(1, dtype=torch.float32).expand(-(-blocks // NESTED_BLOCKSIZE)),
            nested_quant_map=dynamic_quant_map(),
            offset=offset,
        )
    packed = torch.zeros(1, dtype=torch.uint8).expand((n + 1) // 2)
    absmax = torch.zeros(1, dtype=torch.float32).expand(blocks)
    return nf4_serialized_tensors(part.prefix, packed, absmax, part.shape, compute_dtype, nested)


def output_plan(
    parts: list[OutputPart], compute_dtype: torch.dtype, offsets: dict[str, float] | None
) -> tuple[list[PlannedTensor], dict[str, list[PlannedTensor]]]:
    """Every stored tensor with dtype and shape, and the tensors of each part by part name.

    `offsets` (double quantization) gives each 4-bit weight's absmax mean, which is written
    into its quant-state JSON and so fixes that tensor's length in the header.
    """
    plan: list[PlannedTensor] = []
    by_part: dict[str, list[PlannedTensor]] = {}
    for part in parts:
        if part.quantized:
            offset = offsets[part.name] if offsets is not None else None
            tensors = _serialized_layout(part, compute_dtype, offset)
            planned = [PlannedTensor(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
        else:
            planned = [PlannedTensor(part.name, compute_dtype, part.shape)]
        by_part[part.name] = planned
        plan += planned
    return plan, by_part


# --- streaming encoder -------------------------------------------------------------------------

class BlockStream:
    """Regroups flat float32 pieces of any length into segments of whole `unit`s (the last may be short)."""

    def __init__(self, unit: int) -> None:
        self.unit = unit
        self.carry: torch.Tensor | None = None

    def push(self, piece: torch.Tensor) -> None:
        """Hand over the next values of the flattened tensor."""
        x = piece.reshape(-1)
        if self.carry is not None:
            take = min(self.unit - self.carry.numel(), x.numel())
            self.carry = torch.cat([self.carry, x[:take]])
            x = x[take:]
            if self.carry.numel() < self.unit:
                return
            self.consume(self.carry)
            self.carry = None
        body = x.numel() // self.unit * self.unit
        if body:
            self.consume(x[:body])
        if body < x.numel():
            self.carry = x[body:].clone()

    def close(self) -> None:
        """Flush the last, possibly partial, segment."""
        if self.carry is not None:
            self.consume(self.carry)
            self.carry = None

    def consume(self, segment: torch.Tensor) -> None:  # pragma: no cover - abstract
        """Process one segment of whole units (or the final remainder)."""
        raise NotImplementedError


class AbsmaxMean(BlockStream):
    """The float32 mean of a weight's NF4 block absmax, as `quantize_nf4` would store them."""

    def __init__(self, numel: int) -> None:
        super().__init__(NF4_BLOCKSIZE)
        self.absmax = torch.empty(-(-numel // NF4_BLOCKSIZE), dtype=torch.float32)
        self.done = 0

    def consume(self, segment: torch.Tensor) -> None:
        """Record the absmax of the segment's blocks."""
        b0 = self.done // NF4_BLOCKSIZE
        full = segment.numel() // NF4_BLOCKSIZE
        if full:
            torch.amax(segment[: full * NF4_BLOCKSIZE].abs().view(full, NF4_BLOCKSIZE), dim=1, out=self.absmax[b0 : b0 + full])
        if segment.numel() > full * NF4_BLOCKSIZE:
            # A partial last block is stored clamped, as bitsandbytes does.
            self.absmax[b0 + full] = segment[full * NF4_BLOCKSIZE :].abs().max().clamp(min=1e-38)
        self.done += segment.numel()

    def mean(self) -> torch.Tensor:
        """The 0-d float32 mean, the offset double quantization subtracts."""
        return self.absmax.mean()


class NF4Encoder(BlockStream):
    """Quantizes one weight piece by piece into its packed codes and absmax, measuring the
    relative error of what the file decodes to (double-quantized absmax included)."""

    def __init__(self, numel: int, offset: torch.Tensor | None, name: str | None = None) -> None:
        super().__init__(NF4_BLOCKSIZE if offset is None else DOUBLE_QUANT_UNIT)
        blocks = -(-numel // NF4_BLOCKSIZE)
        self.numel = numel
        self.offset = offset
        self.packed = torch.empty((numel + 1) // 2, dtype=torch.uint8)
        self.absmax = torch.empty(blocks, dtype=torch.float32)
        if offset is not None:
            self.codes = torch.empty(blocks, dtype=torch.uint8)
            self.nested_absmax = torch.empty(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32)
            self.quant_map = dynamic_quant_map()
        self.meter = ErrorMeter(name, "NF4")
        self.done = 0

    def consume(self, segment: torch.Tensor) -> None:
        """Encode one segment into its slice of the packed codes and absmax; add its error."""
        m = segment.numel()
        packed, absmax = quantize_nf4(segment)
        b0 = self.done // NF4_BLOCKSIZE
        self.packed[self.done // 2 : self.done // 2 + packed.numel()] = packed.view(-1)
        self.absmax[b0 : b0 + absmax.numel()] = absmax
        scales = absmax
        if self.offset is not None:
            # Segments start on a 256-block boundary: their nested blocks are the whole vector's.
            codes, nested_absmax = _blockwise_dynamic_quantize(absmax - self.offset, NESTED_BLOCKSIZE)
            n0 = b0 // NESTED_BLOCKSIZE
            self.codes[b0 : b0 + codes.numel()] = codes
            self.nested_absmax[n0 : n0 + nested_absmax.numel()] = nested_absmax
            scales = dequantize_nested_absmax(
                NestedAbsmax(codes, nested_absmax, self.quant_map, float(self.offset), NESTED_BLOCKSIZE)
            )
        self.meter.add(dequantize_nf4(packed, scales, (m,)), segment)
        self.done += m

    def finish(self, name: str) -> NestedAbsmax | None:
        """Close the stream; with double quantization, the nested absmax (checked against the whole-vector encoder)."""
        self.close()
        if self.done != self.numel:
            raise IdeoquantError(f"{name}: encoded {self.done} weights, expected {self.numel}")
        if self.offset is None:
            return None
        nested = double_quantize_absmax(self.absmax)
        same = (
            nested.offset == float(self.offset)
            and torch.equal(nested.codes, self.codes)
            and torch.equal(nested.nested_absmax, self.nested_absmax)
        )
        if not same:
            raise IdeoquantError(f"{name}: piecewise double quantization differs from the whole-tensor result")
        return nested


class DenseCast:
    """Assembles a tensor kept unquantized in the output dtype from flat pieces, measuring the cast's error."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, name: str | None = None) -> None:
        self.out = torch.empty(shape, dtype=dtype)
        self.meter = ErrorMeter(name, DTYPE_NAMES[dtype])
        self.done = 0

    def push(self, piece: torch.Tensor) -> None:
        """Cast the next values of the flattened tensor into place."""
        target = self.out.view(-1)[self.done : self.done + piece.numel()]
        target.copy_(piece)
        self.meter.add(target.to(torch.float32, copy=True), piece)  # a copy: add() overwrites it
        self.done += piece.numel()

    def finish(self, name: str) -> torch.Tensor:
        """The assembled tensor (every value must have arrived)."""
        if self.done != self.out.numel():
            raise IdeoquantError(f"{name}: read {self.done} values, expected {self.out.numel()}")
        return self.out


def part_pieces(bs: BranchSource, spec: TensorSpec, parts: list[OutputPart]) -> Iterator[tuple[OutputPart, torch.Tensor]]:
    """(part, flat float32 values) pieces of a canonical tensor, read once in bounded row chunks and cut at part boundaries."""
    width = math.prod(spec.shape[1:])
    ranges = [(p, p.rows[0] * width, p.rows[1] * width) for p in parts]
    pos = 0
    for chunk in bs.iter_float32_rows(spec.name, CHUNK_WEIGHTS):
        flat = chunk.reshape(-1)
        for part, lo, hi in ranges:
            a, b = max(lo, pos), min(hi, pos + flat.numel())
            if a < b:
                yield part, flat[a - pos : b - pos]
        pos += flat.numel()


def measure_offsets(bs: BranchSource, parts: list[OutputPart]) -> dict[str, torch.Tensor]:
    """Each 4-bit weight's absmax mean (a read of every quantized weight, before any header is written)."""
    by_spec: dict[str, list[OutputPart]] = {}
    for part in parts:
        if part.quantized:
            by_spec.setdefault(part.spec.name, []).append(part)
    offsets: dict[str, torch.Tensor] = {}
    for name, group in by_spec.items():
        streams = {p.name: AbsmaxMean(p.numel) for p in group}
        for part, piece in part_pieces(bs, group[0].spec, group):
            streams[part.name].push(piece)
        for part_name, stream in streams.items():
            stream.close()
            offsets[part_name] = stream.mean()
    return offsets


# --- writing -----------------------------------------------------------------------------------

@dataclass
class _Written:
    reports: list[TensorReport]


def _stream(
    bs: BranchSource,
    parts: list[OutputPart],
    by_part: dict[str, list[PlannedTensor]],
    compute_dtype: torch.dtype,
    offsets: dict[str, torch.Tensor] | None,
    kept_notes: dict[str, str],
    progress: Progress | None,
    written: _Written,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in plan order, one canonical tensor at a time; reports on the way."""
    groups: dict[str, list[OutputPart]] = {}
    for part in parts:
        groups.setdefault(part.spec.name, []).append(part)
    dtype_name = DTYPE_NAMES[compute_dtype]
    for spec_name, group in groups.items():
        spec = group[0].spec
        if progress is not None:
            progress.start(spec_name)
        encoders: dict[str, NF4Encoder] = {}
        dense: dict[str, DenseCast] = {}
        for part in group:
            if part.quantized:
                encoders[part.name] = NF4Encoder(part.numel, offsets[part.name] if offsets is not None else None, part.name)
            else:
                dense[part.name] = DenseCast(part.shape, compute_dtype, part.name)
        for part, piece in part_pieces(bs, spec, group):
            if part.quantized:
                encoders[part.name].push(piece)
            else:
                dense[part.name].push(piece)
        for part in group:
            if part.quantized:
                enc = encoders.pop(part.name)
                nested = enc.finish(part.name)
                tensors = nf4_serialized_tensors(part.prefix, enc.packed, enc.absmax, part.shape, compute_dtype, nested)
                nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
                note = "NF4, blocks of 64" + (", double-quantized absmax" if nested is not None else "")
                written.reports.append(TensorReport(part.name, part.shape, "NF4", nbytes, enc.meter.relative(), note))
                for planned in by_part[part.name]:
                    yield planned.name, tensors[planned.name]
            else:
                cast = dense.pop(part.name)
                out = cast.finish(part.name)
                if spec.kind == "linear":
                    err, note = cast.meter.relative(), kept_notes.get(spec.module, "")
                else:
                    err, note = None, ""
                written.reports.append(TensorReport(part.name, part.shape, dtype_name, out.numel() * out.element_size(), err, note))
                yield part.name, out
        if progress is not None:
            progress.advance(bs.stored_nbytes(spec_name))


def write_nf4_folder(
    bs: BranchSource,
    folder: Path,
    outputs: OutputSet,
    options: ConvertOptions,
    metadata: dict[str, str] | None = None,
    progress: Progress | None = None,
    file_sha256: dict[str, str] | None = None,
) -> tuple[list[Path], list[TensorReport], dict]:
    """Write one NF4 branch folder (config.json + safetensors), verify it; (files, reports,
    recipe). `file_sha256`, given, receives the sha256 of each weight file as written."""
    check_layout(options.layout)
    if options.compute_dtype not in COMPUTE_DTYPES:
        raise IdeoquantError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {options.compute_dtype!r}")
    compute_dtype = COMPUTE_DTYPES[options.compute_dtype]
    folder = Path(folder)
    kept_reasons = nf4_kept_linears(bs.dims, options.protect_patterns, options.all_linears)
    kept = list(kept_reasons)
    parts = output_parts(bs.dims, options.layout, kept)
    skip = [m for module in kept for m in layout_modules(module, options.layout)]
    offsets = None
    if options.double_quant:
        log.info("%s: measuring absmax means for double quantization", bs.branch)
        offsets = measure_offsets(bs, parts)
    plan, by_part = output_plan(parts, compute_dtype, {k: float(v) for k, v in offsets.items()} if offsets else None)
    ensure_free_space(folder, sum(p.nbytes for p in plan))
    recipe = {
        "kept": skip,
        "quantized": sum(p.quantized for p in parts),
        "quant_type": "nf4",
        "blocksize": NF4_BLOCKSIZE,
        "double_quant": bool(options.double_quant),
        "compute_dtype": options.compute_dtype,
        "all_linears": bool(options.all_linears),
        "layout": options.layout,
    }
    meta = {"format": "pt", **(metadata or {}), RECIPE_METADATA_KEY: json.dumps(recipe, sort_keys=True)}
    written = _Written(reports=[])
    tensors = _stream(bs, parts, by_part, compute_dtype, offsets, kept_reasons, progress, written)
    writer = ShardedSafetensorsOutput(outputs, folder, plan, metadata=meta, max_shard_bytes=options.max_shard_bytes)
    writer.write_all(tensors)
    paths, index_path = writer.paths, writer.index_path
    config_path = folder / "config.json"
    config = branch_config(bs, skip, options.double_quant, options.compute_dtype)
    outputs.write_text(config_path, json.dumps(config, indent=2) + "\n")
    writer.verify()
    if file_sha256 is not None:
        file_sha256.update(writer.sha256)
    return paths + ([index_path] if index_path else []) + [config_path], written.reports, recipe


def write_nf4_branch(
    bs: BranchSource, source: Source, options: ConvertOptions, outputs: OutputSet, progress: Progress
) -> BranchResult:
    """NF4 (bitsandbytes 4-bit) for one branch: a diffusers folder DIR/<branch>/, written streaming, then verified."""
    metadata = common_metadata(bs, source, options)
    digests: dict[str, str] = {}
    files, reports, recipe = write_nf4_folder(bs, Path(options.out) / bs.branch, outputs, options, metadata, progress, digests)
    return BranchResult(
        branch=bs.branch,
        files=files,
        tensors=reports,
        recipe=recipe,
        source_checksum=bs.checksum(),
        source_bytes=sum(bs.stored_nbytes(n) for n in bs.specs),
        file_sha256=digests,
    )
