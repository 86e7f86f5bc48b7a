"""Shared runtime mechanics: an empty diffusers model on the meta device, module surgery,
the quantized-linear base class, inventory checks and the velocity-forward inputs.

Every loader follows the same steps: collect the stored tensors under canonical (fused)
names with their logical shapes, check them against the inventory, build the model on
the meta device, replace each nn.Linear with a module that keeps the stored bytes, and
assign the remaining (small) tensors directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IdeoquantError
from ..inventory import (
    BRANCH_ALIASES,
    BRANCHES,
    CONFIG_KEYS,
    IDENTIFYING_TENSOR,
    Layout,
    ModelDims,
    TensorSpec,
    detect_layout,
    expected_tensors,
    layout_modules,
    to_layout_names,
)

# Weights dequantized at once by one forward: bounds the float32 temporary of a big linear
# (llm_cond_proj at full size is 245 M weights) to 64 MB; the output is built in row chunks.
CHUNK_WEIGHTS = 1 << 24


# --- the empty model ---------------------------------------------------------------------

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


# --- byte storage ------------------------------------------------------------------------

def read_bytes(fh: BinaryIO, offset: int, nbytes: int, origin: str) -> torch.Tensor:
    """`nbytes` bytes of an open file at `offset` as a new uint8 tensor.

    Plain reads into the tensor's memory: one copy, and no page-fault storm over a memory
    map of a file of many GB.
    """
    out = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        fh.seek(offset)
        got = fh.readinto(memoryview(out.numpy()))
        if got != nbytes:
            raise IdeoquantError(f"{origin}: truncated file ({got} of {nbytes} bytes at offset {offset})")
    return out



def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes (uint8, flat), so that `model.to(dtype)` cannot recast it."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `as_bytes` (flat)."""
    return b.view(dtype)


# --- quantized linears -------------------------------------------------------------------

class QuantizedLinear(nn.Module):
    """Stand-in for nn.Linear whose weight stays in its stored form (uint8/int8 buffers).

    Subclasses decode rows to float32; the forward casts them to the activation dtype and
    multiplies in row chunks of at most `chunk_weights` weights, so no full-precision copy
    of the weight outlives the call.
    """

    chunk_weights: int = CHUNK_WEIGHTS

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise IdeoquantError(f"bias of shape {list(bias.shape)} for a linear with {self.out_features} outputs")
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the weight in float32, [stop - start, in_features]."""
        raise NotImplementedError

    def weight_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of the weight in `dtype` (subclasses skip the float32 step where exact)."""
        return self.dequantize_rows(start, stop).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight in `dtype` (for inspection and reference models)."""
        return self.weight_rows(0, self.out_features, dtype)

    @property
    def stored_bytes(self) -> int:
        """Bytes the stored weight takes (buffers of this module)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        step = max(1, self.chunk_weights // max(1, self.in_features))
        if step >= self.out_features:
            return F.linear(x, self.weight_rows(0, self.out_features, dtype), bias)
        parts = []
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            b = bias[start:stop] if bias is not None else None
            parts.append(F.linear(x, self.weight_rows(start, stop, dtype), b))
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class DenseLinear(QuantizedLinear):
    """A linear the file keeps in a float type (a skipped module): stored dtype kept, cast per forward."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        out_f, in_f = weight.shape
        super().__init__(in_f, out_f, bias)
        self.stored_dtype = weight.dtype
        self.register_buffer("qweight", as_bytes(weight).reshape(out_f, -1))

    def weight_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        w = self.qweight[start:stop].view(self.stored_dtype)
        return w if w.dtype == dtype else w.to(dtype)

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.weight_rows(start, stop, torch.float32)


# --- inventory -----------------------------------------------------------------------------

def detect_prefix(names: Iterable[str]) -> str:
    """A name prefix some exporters add (`model.diffusion_model.`), found on the identifying tensor."""
    for name in names:
        if name.endswith(IDENTIFYING_TENSOR):
            return name[: -len(IDENTIFYING_TENSOR)]
    return ""


def layout_of(names: Iterable[str], origin: str) -> Layout:
    """`fused` or `diffusers`, as IdeoquantError when the names mix both."""
    try:
        return detect_layout(names)
    except ValueError as e:
        raise IdeoquantError(f"{origin}: {e}") from None


def infer_dims(shape_of: Mapping[str, tuple[int, ...]], layout: Layout, origin: str, config: dict | None = None) -> ModelDims:
    """Model widths from the stored (logical) shapes, cross-checked with config.json when given."""
    if IDENTIFYING_TENSOR not in shape_of:
        raise IdeoquantError(f"{origin}: not an Ideogram 4 checkpoint (no {IDENTIFYING_TENSOR})")
    layers = set()
    for n in shape_of:
        if n.startswith("layers."):
            head = n.split(".", 2)[1]
            if head.isdigit():
                layers.add(int(head))
    if not layers:
        raise IdeoquantError(f"{origin}: no transformer blocks (layers.N.*) found")

    def shape(canonical: str) -> tuple[int, ...]:
        parts = to_layout_names(canonical, layout)
        if any(p not in shape_of for p in parts):
            raise IdeoquantError(f"{origin}: missing tensor {parts[0]}")
        return tuple(shape_of[parts[0]])

    in_proj = shape("input_proj.weight")
    if len(in_proj) != 2:
        raise IdeoquantError(f"{origin}: input_proj.weight has shape {list(in_proj)}, expected 2 dims")
    dims = ModelDims(
        in_channels=in_proj[1],
        hidden=in_proj[0],
        head_dim=shape("layers.0.attention.norm_q.weight")[0],
        intermediate=shape("layers.0.feed_forward.w1.weight")[0],
        adaln_dim=shape("adaln_proj.weight")[0],
        llm_features=shape("llm_cond_norm.weight")[0],
        num_layers=max(layers) + 1,
    )
    if dims.head_dim == 0 or dims.hidden % dims.head_dim:
        raise IdeoquantError(f"{origin}: hidden width {dims.hidden} is not a multiple of head width {dims.head_dim}")
    if config:
        for key, attr in CONFIG_KEYS.items():
            if key in config and int(config[key]) != getattr(dims, attr):
                raise IdeoquantError(f"{origin}: config.json {key}={config[key]} but tensors say {getattr(dims, attr)}")
        heads = config.get("num_attention_heads")
        if heads is not None and int(heads) != dims.num_heads:
            raise IdeoquantError(f"{origin}: config.json num_attention_heads={heads} but tensors say {dims.num_heads}")
    return dims


def check_inventory(shape_of: Mapping[str, tuple[int, ...]], layout: Layout, dims: ModelDims, origin: str) -> list[str]:
    """Raise on any missing or misshaped tensor; return the stored names that are not part of the model."""
    used: set[str] = set()
    for spec in expected_tensors(dims):
        parts = to_layout_names(spec.name, layout)
        for p in parts:
            if p not in shape_of:
                raise IdeoquantError(f"{origin}: missing tensor {p}")
            used.add(p)
        shapes = [tuple(shape_of[p]) for p in parts]
        shape = shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes),) + shapes[0][1:]
        if len(parts) > 1 and len({s[1:] for s in shapes}) != 1:
            shape = ()
        if shape != spec.shape:
            raise IdeoquantError(f"{origin}: tensor {parts[0]} has shape {list(shapes[0])}, expected {list(spec.shape)}")
    return [n for n in shape_of if n not in used]


def model_config(dims: ModelDims, config: dict | None) -> dict:
    """The constructor arguments: widths from the tensors, rotary settings from config.json if any."""
    out = dims.to_config()
    for key in ("rope_theta", "mrope_section", "norm_eps"):
        if config and key in config:
            out[key] = config[key]
    return out


@dataclass
class LinearSlot:
    """One nn.Linear of the model under its canonical name, where its modules go in diffusers."""

    spec: TensorSpec
    bias_name: str | None
    module_paths: list[str]


def linear_slots(dims: ModelDims) -> list[LinearSlot]:
    """Every linear weight of a branch with its bias name and diffusers module path(s)."""
    names = {s.name for s in expected_tensors(dims)}
    slots = []
    for spec in expected_tensors(dims):
        if spec.kind != "linear":
            continue
        bias = spec.module + ".bias"
        slots.append(LinearSlot(spec, bias if bias in names else None, layout_modules(spec.module, "diffusers")))
    return slots


def small_specs(dims: ModelDims) -> list[TensorSpec]:
    """Tensors that are not linear weights or linear biases: norms and the image-indicator embedding."""
    return [s for s in expected_tensors(dims) if s.kind in ("norm", "embedding")]


def split_rows(total_rows: int, parts: int) -> list[tuple[int, int]]:
    """Equal row ranges [start, stop) of a fused weight (q, k, v)."""
    rows = total_rows // parts
    return [(i * rows, (i + 1) * rows) for i in range(parts)]


def install_linears(
    model: nn.Module,
    dims: ModelDims,
    make: Callable[[LinearSlot, int, tuple[int, int]], nn.Module],
) -> None:
    """Replace every nn.Linear: `make(slot, part, rows)` returns the module for one diffusers path."""
    for slot in linear_slots(dims):
        ranges = split_rows(slot.spec.shape[0], len(slot.module_paths))
        for part, (path, rows) in enumerate(zip(slot.module_paths, ranges)):
            set_module(model, path, make(slot, part, rows))


def assign_small(model: nn.Module, name: str, value: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> None:
    """Assign a norm or embedding weight in the compute dtype (canonical and diffusers names agree)."""
    assign_tensor(model, name, value.to(device=device, dtype=dtype))


# --- branch names --------------------------------------------------------------------------

def normalize_branch(branch: str | None) -> str | None:
    """`transformer` / `unconditional_transformer` from a branch name or cond/uncond alias."""
    if branch is None:
        return None
    if branch in BRANCHES:
        return branch
    alias = BRANCH_ALIASES.get(branch)
    if alias and len(alias) == 1:
        return alias[0]
    raise IdeoquantError(f"branch must be one of {', '.join(BRANCHES)} (or cond/uncond), not {branch!r}")


# --- velocity-forward inputs ---------------------------------------------------------------

def velocity_inputs(
    model_config: Mapping,
    text_lengths: list[int] | tuple[int, ...] = (5, 3),
    grid: tuple[int, int] = (4, 4),
    max_text_tokens: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    unconditional: bool = False,
) -> dict[str, torch.Tensor]:
    """Inputs of one denoising call, packed as the pipeline packs them: `[left-pad][text][image]`.

    With `unconditional`, only the image region with zero text features (as the pipeline
    feeds the unconditional transformer).
    """
    from diffusers import Ideogram4Pipeline

    gen = torch.Generator().manual_seed(seed)
    batch = len(text_lengths)
    gh, gw = grid
    n_img = gh * gw
    in_ch = int(model_config["in_channels"])
    llm = int(model_config["llm_features_dim"])
    position_ids, segment_ids, indicator = Ideogram4Pipeline._prepare_ids(list(text_lengths), gh, gw, max_text_tokens, torch.device("cpu"))
    latents = torch.randn(batch, n_img, in_ch, generator=gen)
    text = torch.randn(batch, max_text_tokens, llm, generator=gen)
    pad = torch.arange(max_text_tokens)[None, :] < (max_text_tokens - torch.tensor(text_lengths))[:, None]
    text[pad] = 0.0
    timestep = torch.rand(batch, generator=gen) * 0.9 + 0.05
    if unconditional:
        inputs = {
            "hidden_states": latents,
            "encoder_hidden_states": torch.zeros(batch, n_img, llm),
            "position_ids": position_ids[:, max_text_tokens:],
            "segment_ids": segment_ids[:, max_text_tokens:],
            "indicator": indicator[:, max_text_tokens:],
        }
    else:
        inputs = {
            "hidden_states": torch.cat([torch.zeros(batch, max_text_tokens, in_ch), latents], dim=1),
            "encoder_hidden_states": torch.cat([text, torch.zeros(batch, n_img, llm)], dim=1),
            "position_ids": position_ids,
            "segment_ids": segment_ids,
            "indicator": indicator,
        }
    inputs["timestep"] = timestep
    out = {}
    for k, v in inputs.items():
        v = v.to(device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


__all__ = [
    "CHUNK_WEIGHTS",
    "DenseLinear",
    "LinearSlot",
    "QuantizedLinear",
    "assign_small",
    "assign_tensor",
    "build_meta_transformer",
    "check_inventory",
    "detect_prefix",
    "finalize_model",
    "infer_dims",
    "install_linears",
    "layout_of",
    "linear_slots",
    "materialize_rotary",
    "meta_leftovers",
    "model_config",
    "normalize_branch",
    "read_bytes",
    "resident_bytes",
    "set_module",
    "small_specs",
    "velocity_inputs",
]
