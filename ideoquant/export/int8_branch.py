"""INT8 W8A8 output: a diffusers branch folder in the compressed-tensors `int-quantized` format.

Per quantized linear: `<m>.weight` int8 [out, in] and `<m>.weight_scale` float32 [out, 1]
(symmetric per output channel); activations are quantized per token at run time. The
linears left in higher precision are listed in `quantization_config.ignore` and stored in
bf16; norm weights carrying a SmoothQuant fold are float32 so the fold stays exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibrate.statistics import (
    CalibrationStatistics,
    load_statistics,
    residual_gains,
)
from ..codecs.int8 import dequantize_weight
from ..errors import IdeoquantError
from ..io.safetensors_writer import (
    DTYPE_NAMES,
    PlannedTensor,
    ShardedSafetensorsOutput,
    save_safetensors,
)
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
from ..recipes.int8_policy import parse_protect_budget
from .error_meter import ErrorMeter, require_finite
from .options import (
    BranchResult,
    ConvertOptions,
    Progress,
    TensorReport,
    common_metadata,
)
from .smoothing import Int8Recipe, Int8Settings, factors_path, plan_int8


RECIPE_METADATA_KEY = "ideoquant.int8.recipe"


def quantization_config(ignore: list[str]) -> dict:
    """The compressed-tensors `quantization_config` for W8A8 int8 (channel weights, dynamic token activations)."""
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
                },
                "input_activations": {
                    "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
                },
                "output_activations": None,
                "format": "int-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def branch_config(bs: BranchSource, recipe: Int8Recipe, layout: str) -> dict:
    """The branch config.json: model arguments plus the quantization_config."""
    import diffusers

    config = dict(bs.config or bs.dims.to_config())
    config.pop("quantization_config", None)
    config.setdefault("_class_name", "Ideogram4Transformer2DModel")
    config.setdefault("_diffusers_version", diffusers.__version__)
    ignore = [name for m in recipe.kept for name in layout_modules(m, layout)]
    config["quantization_config"] = quantization_config(ignore)
    return config


def _out_dtype(spec: TensorSpec, quantized: set[str], folded_norms: set[str]) -> torch.dtype:
    if spec.kind == "linear" and spec.module in quantized:
        return torch.int8
    if spec.name in folded_norms:
        return torch.float32
    return torch.bfloat16


def output_plan(dims: ModelDims, recipe: Int8Recipe, layout: str) -> list[PlannedTensor]:
    """Every output tensor, in canonical order, with its dtype and shape."""
    quantized, folded = set(recipe.quantized), set(recipe.folded_norms())
    plan = []
    for spec in expected_tensors(dims):
        names = to_layout_names(spec.name, layout)
        rows = spec.shape[0] // len(names)
        dtype = _out_dtype(spec, quantized, folded)
        for n in names:
            plan.append(PlannedTensor(n, dtype, (rows,) + tuple(spec.shape[1:])))
            if dtype == torch.int8:
                plan.append(PlannedTensor(n[: -len(".weight")] + ".weight_scale", torch.float32, (rows, 1)))
    return plan


def _relative_error(name: str, stored_as: str, approx: torch.Tensor, exact: torch.Tensor) -> float:
    """The relative error of a stored tensor, decoded, against its source; Inf/NaN refused."""
    return ErrorMeter(name, stored_as).add(approx.to(torch.float32), exact).relative()


@dataclass
class _Written:
    reports: list[TensorReport] = field(default_factory=list)


def _stream(
    bs: BranchSource, recipe: Int8Recipe, plan: list[PlannedTensor], layout: str, progress: Progress | None, written: _Written
):
    """(name, tensor) in plan order: smoothed, quantized or cast; reports on the way."""
    dtypes = {p.name: p.dtype for p in plan}
    folded = set(recipe.folded_norms())
    for spec in expected_tensors(bs.dims):
        if progress is not None:
            progress.start(spec.name)
        tensor = recipe.smooth_tensor(spec.name, bs.read_float32(spec.name))
        names = to_layout_names(spec.name, layout)
        codes = None
        if dtypes[names[0]] == torch.int8:
            # Rows are rounded independently (per-channel scales), so a fused weight is rounded
            # whole and its codes split like the weight.
            q_all, scale_all = recipe.quantize_linear(spec.module, tensor)
            codes = list(zip(q_all.chunk(len(names), dim=0), scale_all.chunk(len(names), dim=0)))
        for i, (name, part) in enumerate(zip(names, tensor.chunk(len(names), dim=0))):
            part = part.contiguous()
            if dtypes[name] == torch.int8:
                q, scale = (c.contiguous() for c in codes[i])
                err = _relative_error(name, "int8 with a float32 scale", dequantize_weight(q, scale), part)
                scale_name = name[: -len(".weight")] + ".weight_scale"
                written.reports.append(TensorReport(name, tuple(q.shape), "int8", q.numel(), err, "W8A8, per-channel int8"))
                written.reports.append(
                    TensorReport(scale_name, tuple(scale.shape), "F32", scale.numel() * 4, None, "per-channel scale")
                )
                yield name, q
                yield scale_name, scale
                continue
            out = part.to(dtypes[name])
            kind = DTYPE_NAMES[out.dtype]
            if spec.kind == "linear":
                note, err = "kept: " + recipe.kept.get(spec.module, ""), _relative_error(name, kind, out, part)
            else:
                note = "SmoothQuant fold target (float32 keeps the fold exact)" if spec.name in folded else ""
                err = None
                require_finite(name, kind, out, part)
            written.reports.append(TensorReport(name, tuple(out.shape), kind, out.numel() * out.element_size(), err, note))
            yield name, out
        if progress is not None:
            progress.advance(bs.stored_nbytes(spec.name))


def write_int8_folder(
    bs: BranchSource,
    recipe: Int8Recipe,
    folder: Path,
    outputs: OutputSet,
    layout: str = "diffusers",
    metadata: dict[str, str] | None = None,
    max_shard_bytes: int = 10 * 2**30,
    progress: Progress | None = None,
    file_sha256: dict[str, str] | None = None,
) -> tuple[list[Path], list[TensorReport]]:
    """Write one branch folder (config.json + safetensors) for a recipe, then verify it;
    `file_sha256`, given, receives the sha256 of each weight file as written."""
    check_layout(layout)
    folder = Path(folder)
    plan = output_plan(bs.dims, recipe, layout)
    ensure_free_space(folder, sum(p.nbytes for p in plan))
    meta = {"format": "pt", **(metadata or {}), RECIPE_METADATA_KEY: json.dumps(recipe.metadata(), sort_keys=True)}
    writer = ShardedSafetensorsOutput(outputs, folder, plan, metadata=meta, max_shard_bytes=max_shard_bytes)
    written = _Written()
    writer.write_all(_stream(bs, recipe, plan, layout, progress, written))
    config_path = folder / "config.json"
    outputs.write_text(config_path, json.dumps(branch_config(bs, recipe, layout), indent=2) + "\n")
    writer.verify()
    if file_sha256 is not None:
        file_sha256.update(writer.sha256)
    return writer.files + [config_path], written.reports


def write_factors(recipe: Int8Recipe, out: Path, branch: str, outputs: OutputSet) -> Path:
    """The branch's SmoothQuant factors s, one float32 vector per smoothed input group, with
    where each 1/s was folded: what `verify --source` needs to rebuild the smoothed weights."""
    path = factors_path(out, branch)
    folds = {
        g.name: {"linears": list(g.linears), "fold": g.fold.tensor, "rows": list(g.fold.rows) if g.fold.rows else None}
        for g in recipe.groups
        if g.name in recipe.factors
    }
    metadata = {"format": "pt", "ideoquant.branch": branch, "ideoquant.smoothquant.folds": json.dumps(folds, sort_keys=True)}
    tensors = {name: s.to(torch.float32).contiguous() for name, s in recipe.factors.items()}
    for name, s in tensors.items():
        require_finite(f"SmoothQuant factor {name}", "F32", s)
    save_safetensors(outputs, path, tensors, metadata)
    return path


def calibration_summary(stats: CalibrationStatistics, path: Path, bs: BranchSource) -> dict:
    """What the model card says about the calibration behind a branch."""
    meta = stats.metadata
    recorded = meta.get("checksums", {}).get(bs.branch)
    runs = [
        {k: r.get(k) for k in ("mode", "steps", "resolution", "seed", "world_size")}
        | {"prompts": len(r["prompts"]) if r.get("prompts") else 0}
        for r in meta.get("runs", [])
    ]
    return {
        "file": Path(path).name,
        "source_checksum_match": recorded == bs.checksum(),
        "inputs": len(meta.get("inputs", [])),
        "max_samples": meta.get("max_samples"),
        "runs": runs,
    }


def load_branch_statistics(path: Path, bs: BranchSource) -> CalibrationStatistics:
    """The statistics of one branch, checked against the branch's shapes and weights."""
    stats = load_statistics(path, branches=[bs.branch])
    if bs.branch not in stats.metadata.get("branches", []):
        raise IdeoquantError(f"{path} has no statistics for {bs.branch} (calibrate with --branches both)")
    widths = {s.module: s.shape[1] for s in expected_tensors(bs.dims) if s.kind == "linear"}
    for module, st in stats.branch(bs.branch).items():
        if module not in widths or widths[module] != st.in_features:
            raise IdeoquantError(f"{path}: statistics of {bs.branch}/{module} do not fit this model")
    recorded = stats.metadata.get("checksums", {}).get(bs.branch)
    if recorded != bs.checksum():
        # Same shapes, other weights: the measured errors and the factors would belong to another model.
        raise IdeoquantError(
            f"{path}: the {bs.branch} statistics were recorded on another source "
            f"({stats.metadata.get('source', '?')}, checksum {str(recorded)[:12]}, not {bs.checksum()[:12]}); "
            "calibrate this source"
        )
    return stats


def write_int8_branch(
    bs: BranchSource, source: Source, options: ConvertOptions, outputs: OutputSet, progress: Progress
) -> BranchResult:
    """Calibrated W8A8 int8 for one branch: plan from the statistics, write, verify."""
    if options.calibration is None:
        raise IdeoquantError("--format int8 needs --calibration STATS (write one with `ideoquant calibrate`)")
    check_layout(options.layout)
    if options.alpha is not None and not 0.0 <= options.alpha <= 1.0:
        raise IdeoquantError(f"--alpha must lie in [0, 1], not {options.alpha}")
    stats = load_branch_statistics(Path(options.calibration), bs)
    settings = Int8Settings(
        alpha=options.alpha,
        rounding=options.rounding,
        protect_budget=parse_protect_budget(options.protect_budget),
        protect=options.protect,
        protect_patterns=tuple(options.protect_patterns),
    )
    gains = residual_gains(stats.energies.get(bs.branch, {}))
    recipe = plan_int8(bs.dims, bs.read_float32, stats.branch(bs.branch), settings, gains)
    summary = calibration_summary(stats, Path(options.calibration), bs)
    metadata = {**common_metadata(bs, source, options), "ideoquant.int8.calibration": json.dumps(summary, sort_keys=True)}
    digests: dict[str, str] = {}
    files, reports = write_int8_folder(
        bs, recipe, Path(options.out) / bs.branch, outputs, options.layout, metadata, options.max_shard_bytes, progress,
        digests,
    )
    if recipe.factors:
        files.append(write_factors(recipe, Path(options.out), bs.branch, outputs))
    return BranchResult(
        branch=bs.branch,
        files=files,
        tensors=reports,
        recipe={**recipe.metadata(), "calibration": summary},
        source_checksum=bs.checksum(),
        source_bytes=sum(bs.stored_nbytes(n) for n in bs.specs),
        file_sha256=digests,
    )
