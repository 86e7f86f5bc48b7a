"""Building a transformer on the meta device and assigning tensors into it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import IdeoquantError
from .inventory import ModelDims, TensorSpec, expected_tensors, to_layout_names


def build_meta_transformer(config: dict | ModelDims) -> nn.Module:
    """An `Ideogram4Transformer2DModel` whose parameters live on the meta device (no memory)."""
    from diffusers import Ideogram4Transformer2DModel

    if isinstance(config, ModelDims):
        config = config.to_config()
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}
    with torch.device("meta"):
        return Ideogram4Transformer2DModel(**config)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted path (e.g. `layers.3.attention.to_q`)."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def assign_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put a real tensor in place of a meta parameter or buffer (`name` is a state-dict key)."""
    module_path, _, attr = name.rpartition(".")
    module = root.get_submodule(module_path) if module_path else root
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter) or attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def materialize_rotary(model: nn.Module, device: torch.device | str) -> None:
    """Recompute the non-persistent rotary `inv_freq` buffer the checkpoint does not store."""
    rope = model.rotary_emb
    head_dim = rope.head_dim
    base = model.config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    rope._buffers["inv_freq"] = inv_freq


def meta_leftovers(model: nn.Module) -> list[str]:
    """Names of parameters or buffers still on the meta device (a load that missed something)."""
    names = [n for n, p in model.named_parameters() if p.is_meta]
    names += [n for n, b in model.named_buffers() if b.is_meta]
    return names


def finalize_model(model: nn.Module, device: torch.device | str, origin: str) -> nn.Module:
    """Recompute rotary frequencies, refuse a model with meta leftovers, switch to inference mode."""
    materialize_rotary(model, device)
    left = meta_leftovers(model)
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise IdeoquantError(f"{origin}: no stored value for {', '.join(left[:3])}{more}")
    model.eval()
    model.requires_grad_(False)
    return model


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (shared storage counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def transformer_from_tensors(
    config: dict | ModelDims,
    read: Callable[[str], torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    linear_parts: Callable[[TensorSpec], list[nn.Module] | None] | None = None,
    origin: str = "transformer",
) -> nn.Module:
    """A diffusers Ideogram 4 transformer filled from canonical tensors (`read(name)` -> float).

    `linear_parts(spec)` may supply the module(s) of a linear instead of its dense weight
    (one per diffusers module: q, k, v for qkv), e.g. FP8 linears kept as stored.
    """
    model = build_meta_transformer(config)
    dims = ModelDims.from_config(model.config)
    for spec in expected_tensors(dims):
        names = to_layout_names(spec.name, "diffusers")
        modules = linear_parts(spec) if linear_parts is not None and spec.kind == "linear" else None
        if modules is not None:
            for name, module in zip(names, modules, strict=True):
                set_module(model, name[: -len(".weight")], module)
            continue
        tensor = read(spec.name).to(device=device, dtype=dtype)
        for name, part in zip(names, tensor.chunk(len(names), dim=0)):
            assign_tensor(model, name, part.contiguous())
    return finalize_model(model, device, origin)
