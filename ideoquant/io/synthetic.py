"""Synthetic Ideogram-4-shaped checkpoints, for tests, the demo and benchmarks.

Written in the published layout: a pipeline folder with both branches, FP8 linears with
a float32 `weight_scale` per row (or bf16), bf16 biases and norms. The weights imitate
what matters to quantization in a trained model: uneven row scales, heavy tails with
rare large weights, and a few outlier channels in the norms that feed the linears (which
make activation outliers, the case SmoothQuant exists for).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch

from ..model.inventory import (
    BRANCHES,
    Layout,
    ModelDims,
    TensorSpec,
    expected_tensors,
    to_layout_names,
)
from .safetensors_writer import PlannedTensor, ShardedSafetensorsOutput
from .staging import OutputSet, ensure_free_space

FP8_MAX = 448.0
TINY = ModelDims(in_channels=128, hidden=256, head_dim=64, intermediate=768, adaln_dim=256, llm_features=512, num_layers=2)
FULL = ModelDims()
SIZES = {"tiny": TINY, "full": FULL}
CHUNK_WEIGHTS = 1 << 24
ROW_GROUP = 64


def synth_dims(size: Literal["tiny", "full"], layers: int | None) -> ModelDims:
    """The dims of a synthetic model of a given size and block count."""
    base = SIZES[size]
    n = layers if layers is not None else base.num_layers
    return ModelDims(**{**base.as_dict(), "num_layers": n})


def _generator(seed: int, name: str) -> torch.Generator:
    # One stream per tensor: a tensor's values do not depend on which others are written.
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _outlier_channels(gen: torch.Generator, width: int, count: int) -> torch.Tensor:
    return torch.randperm(width, generator=gen)[: max(1, count)]


@dataclass(frozen=True)
class OutlierPattern:
    """Where activation outliers come from: a few norm channels `norm_gain` times larger (one
    channel in `norm_every`), and weight input columns `weight_gain` times larger (one in
    `weight_every`). The defaults are the project's checkpoints."""

    norm_gain: float = 12.0
    norm_every: int = 128
    weight_gain: float = 3.0
    weight_every: int = 256


DEFAULT_OUTLIERS = OutlierPattern()


def linear_weight_rows(
    spec: TensorSpec, seed: int, start: int, stop: int, outliers: OutlierPattern = DEFAULT_OUTLIERS
) -> torch.Tensor:
    """Rows [start, stop) of a synthetic linear weight, float32 (deterministic per seed and name)."""
    out_f, in_f = spec.shape
    gen = _generator(seed, spec.name)
    # Per-tensor structure first (same draws whatever the chunk), then the chunk's rows.
    row_scale = torch.exp(0.35 * torch.randn(out_f, generator=gen))
    col_scale = torch.ones(in_f)
    col_scale[_outlier_channels(gen, in_f, in_f // outliers.weight_every)] = outliers.weight_gain
    # Rows come in groups with their own streams, so any row range reads the same values.
    groups = []
    for g in range(start // ROW_GROUP, (stop - 1) // ROW_GROUP + 1):
        gen_g = _generator(seed, f"{spec.name}@{g}")
        rows = torch.randn((ROW_GROUP, in_f), generator=gen_g)
        # Heavy tail: about one weight in a thousand is 4-8x larger.
        spikes = torch.rand((ROW_GROUP, in_f), generator=gen_g) < 1e-3
        groups.append(torch.where(spikes, rows * (4 + 4 * torch.rand(rows.shape, generator=gen_g)), rows))
    first = start // ROW_GROUP * ROW_GROUP
    w = torch.cat(groups)[start - first : stop - first]
    std = 1.0 / math.sqrt(in_f)
    if spec.rows_per_image == "one_row" and "adaln_modulation" in spec.name:
        std *= 0.25  # modulation starts near identity, as in a trained adaLN
    return w * (row_scale[start:stop, None] * col_scale[None, :] * std)


def small_tensor(spec: TensorSpec, seed: int, outliers: OutlierPattern = DEFAULT_OUTLIERS) -> torch.Tensor:
    """A synthetic bias, norm weight or embedding, float32."""
    gen = _generator(seed, spec.name)
    n = spec.shape[0]
    if spec.kind == "norm":
        w = 1.0 + 0.1 * torch.randn(n, generator=gen)
        if spec.name.endswith(("attention_norm1.weight", "ffn_norm1.weight", "llm_cond_norm.weight")):
            # A few channels far larger than the rest: activation outliers for the next linear.
            w[_outlier_channels(gen, n, n // outliers.norm_every)] *= outliers.norm_gain
        return w
    if spec.kind == "bias":
        return 0.02 * torch.randn(n, generator=gen)
    return 0.5 * torch.randn(spec.shape, generator=gen)


def to_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 as published: scale = row absmax / 448, weight = w / scale in e4m3."""
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale.to(torch.float32)


def _planned(spec: TensorSpec, layout: Layout, dtype: str) -> list[PlannedTensor]:
    names = to_layout_names(spec.name, layout)
    rows = spec.shape[0] // len(names)
    out = []
    for n in names:
        shape = (rows,) + spec.shape[1:]
        if spec.kind == "linear":
            out.append(PlannedTensor(n, torch.float8_e4m3fn if dtype == "fp8" else torch.bfloat16, shape))
            if dtype == "fp8":
                out.append(PlannedTensor(n[: -len(".weight")] + ".weight_scale", torch.float32, (rows,)))
        else:
            out.append(PlannedTensor(n, torch.bfloat16, shape))
    return out


def _tensors(
    dims: ModelDims, seed: int, layout: Layout, dtype: str, outliers: OutlierPattern
) -> Iterator[tuple[str, torch.Tensor]]:
    for spec in expected_tensors(dims):
        names = to_layout_names(spec.name, layout)
        if spec.kind != "linear":
            yield names[0], small_tensor(spec, seed, outliers).to(torch.bfloat16)
            continue
        rows = spec.shape[0] // len(names)
        step = max(1, CHUNK_WEIGHTS // spec.shape[1])
        for part, n in enumerate(names):
            lo, hi = part * rows, (part + 1) * rows
            if dtype == "bf16":
                yield n, torch.cat(
                    [linear_weight_rows(spec, seed, s, min(s + step, hi), outliers).to(torch.bfloat16)
                     for s in range(lo, hi, step)]
                )
                continue
            pieces = [to_fp8_rows(linear_weight_rows(spec, seed, s, min(s + step, hi), outliers)) for s in range(lo, hi, step)]
            yield n, torch.cat([p[0] for p in pieces])
            yield n[: -len(".weight")] + ".weight_scale", torch.cat([p[1] for p in pieces])


def write_synthetic_pipeline(
    out: Path,
    size: Literal["tiny", "full"] = "tiny",
    layers: int | None = None,
    dtype: Literal["fp8", "bf16"] = "fp8",
    layout: Layout = "fused",
    seed: int = 0,
    overwrite: bool = False,
    dims: ModelDims | None = None,
    outliers: OutlierPattern = DEFAULT_OUTLIERS,
) -> ModelDims:
    """Write an Ideogram-4-shaped pipeline folder (both branches, configs, model_index.json).

    `dims` (other widths) replaces `size` and `layers`; `outliers` changes the outlier pattern."""
    out = Path(out)
    dims = dims or synth_dims(size, layers)
    outputs = OutputSet(overwrite=overwrite)
    plan = [p for spec in expected_tensors(dims) for p in _planned(spec, layout, dtype)]
    ensure_free_space(out, 2 * sum(p.nbytes for p in plan))
    try:
        for branch_index, branch in enumerate(BRANCHES):
            folder = out / branch
            meta = {"format": "pt", "ideoquant.synthetic": "true", "ideoquant.seed": str(seed)}
            writer = ShardedSafetensorsOutput(outputs, folder, plan, metadata=meta)
            # The two branches are separate-weight copies: different seeds.
            writer.write_all(_tensors(dims, seed * 2 + branch_index, layout, dtype, outliers))
            config = {**dims.to_config(), "_diffusers_version": "0.42.1"}
            outputs.write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
        index = {
            "_class_name": "Ideogram4Pipeline",
            "_diffusers_version": "0.42.1",
            "transformer": ["diffusers", "Ideogram4Transformer2DModel"],
            "unconditional_transformer": ["diffusers", "Ideogram4Transformer2DModel"],
        }
        outputs.write_text(out / "model_index.json", json.dumps(index, indent=2) + "\n")
    except BaseException:
        outputs.discard()
        raise
    return dims
