"""The source transformer for calibration forwards, built from the FP8 checkpoint as stored."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import IdeoquantError
from ..io.source import BranchSource
from ..model.fp8_linear import FP8Linear
from ..model.inventory import (
    ModelDims,
    expected_tensors,
    to_canonical_name,
    to_layout_names,
)
from .statistics import statistics_key


def _transformer_config(bs: BranchSource) -> dict:
    config = bs.dims.to_config()
    for key in ("rope_theta", "mrope_section", "norm_eps"):
        if bs.config and key in bs.config:
            config[key] = bs.config[key]
    return config


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


def transformer_from_tensors(
    config: dict | ModelDims,
    read: Callable[[str], torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A diffusers Ideogram 4 transformer filled from canonical tensors (`read(name)` -> float)."""
    from ..model.build import assign_tensor, build_meta_transformer, materialize_rotary

    model = build_meta_transformer(config)
    dims = _dims_of(model)
    for spec in expected_tensors(dims):
        tensor = read(spec.name).to(device=device, dtype=dtype)
        names = to_layout_names(spec.name, "diffusers")
        for name, part in zip(names, tensor.chunk(len(names), dim=0)):
            assign_tensor(model, name, part.contiguous())
    materialize_rotary(model, device)
    return model.eval()


def _dims_of(model: nn.Module) -> ModelDims:
    c = model.config
    return ModelDims(
        in_channels=c.in_channels, hidden=c.attention_head_dim * c.num_attention_heads, head_dim=c.attention_head_dim,
        intermediate=c.intermediate_size, adaln_dim=c.adaln_dim, llm_features=c.llm_features_dim, num_layers=c.num_layers,
    )


def load_source_transformer(
    bs: BranchSource, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, keep_fp8: bool = True
) -> nn.Module:
    """The branch as a diffusers model, read tensor by tensor; FP8 linears stay FP8 (FP8Linear) when asked."""
    from ..model.build import (
        assign_tensor,
        build_meta_transformer,
        materialize_rotary,
        meta_leftovers,
        set_module,
    )

    model = build_meta_transformer(_transformer_config(bs))
    for spec in expected_tensors(bs.dims):
        names = to_layout_names(spec.name, "diffusers")
        fp8 = _read_fp8(bs, spec.name) if keep_fp8 and spec.kind == "linear" else None
        if fp8 is not None:
            weight, scale = fp8
            for i, name in enumerate(names):
                rows = slice(i * weight.shape[0] // len(names), (i + 1) * weight.shape[0] // len(names))
                module = FP8Linear(weight[rows].contiguous().to(device), scale[rows].contiguous().to(device))
                set_module(model, name[: -len(".weight")], module)
            continue
        tensor = bs.read_float32(spec.name).to(device=device, dtype=dtype)
        for name, part in zip(names, tensor.chunk(len(names), dim=0)):
            assign_tensor(model, name, part.contiguous())
    materialize_rotary(model, device)
    missing = meta_leftovers(model)
    if missing:
        raise IdeoquantError(f"{bs.branch}: transformer tensors left unloaded: {', '.join(missing[:5])}")
    return model.eval()


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
