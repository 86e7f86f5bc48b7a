"""The source transformer for calibration forwards, built from the FP8 checkpoint as stored."""

from __future__ import annotations

import torch
from torch import nn

from ..io.source import BranchSource
from ..model.build import transformer_from_tensors
from ..model.fp8_linear import FP8Linear
from ..model.inventory import (
    TensorSpec,
    model_config,
    to_canonical_name,
    to_layout_names,
)
from .statistics import statistics_key


def _read_fp8(bs: BranchSource, canonical: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A linear's stored FP8 weight and per-row float32 scale, or None if it is not FP8."""
    names = to_layout_names(canonical, bs.layout)
    if any(bs.stored[n].dtype != torch.float8_e4m3fn for n in names):
        return None
    weights, scales = [], []
    for n in names:
        w, s = bs.read_stored(n)
        s = s.reshape(-1)
        weights.append(w.view(torch.uint8))
        scales.append(s.expand(w.shape[0]) if s.numel() == 1 else s)
    return torch.cat(weights).view(torch.float8_e4m3fn), torch.cat(scales)


def load_source_transformer(
    bs: BranchSource, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, keep_fp8: bool = True
) -> nn.Module:
    """The branch as a diffusers model, read tensor by tensor; FP8 linears stay FP8 (FP8Linear) when asked."""

    def fp8_parts(spec: TensorSpec) -> list[nn.Module] | None:
        fp8 = _read_fp8(bs, spec.name) if keep_fp8 else None
        if fp8 is None:
            return None
        weight, scale = fp8
        parts = len(to_layout_names(spec.name, "diffusers"))
        rows = weight.shape[0] // parts
        return [
            FP8Linear(weight[i * rows : (i + 1) * rows].contiguous().to(device), scale[i * rows : (i + 1) * rows].contiguous().to(device))
            for i in range(parts)
        ]

    return transformer_from_tensors(
        model_config(bs.dims, bs.config), bs.read_float32, device, dtype, linear_parts=fp8_parts, origin=bs.branch
    )


def recorded_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical statistics key -> the diffusers module whose input is recorded (one per shared input)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not hasattr(module, "in_features") or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if not name or "rotary" in name:
            continue
        canonical, part = to_canonical_name(name + ".weight")
        if part not in (None, 0):
            continue  # to_k / to_v: same input as to_q
        key = statistics_key(canonical[: -len(".weight")])
        if key == canonical[: -len(".weight")]:
            found[key] = module
    return found
