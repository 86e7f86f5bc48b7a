"""Shared runtime mechanics: an empty diffusers model on the meta device, module surgery,
the quantized-linear base class, inventory checks and the velocity-forward inputs.

Every loader follows the same steps: collect the stored tensors under canonical (fused)
names with their logical shapes, check them against the inventory, build the model on
the meta device, replace each nn.Linear with a module that keeps the stored bytes, and
assign the remaining (small) tensors directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IdeoquantError
from ..model.build import assign_tensor, set_module
from ..model.inventory import ModelDims, TensorSpec, expected_tensors, layout_modules

# Weights dequantized at once by one forward: bounds the float32 temporary of a big linear
# (llm_cond_proj at full size is 245 M weights) to 64 MB; the output is built in row chunks.
CHUNK_WEIGHTS = 1 << 24


# --- the empty model ---------------------------------------------------------------------


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


# --- velocity-forward inputs ---------------------------------------------------------------
