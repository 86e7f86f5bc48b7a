"""W8A8 at run time: INT8 folders (compressed-tensors int-quantized) as `Int8Linear` modules.

The numerics are `codecs.int8`. `Int8Linear` keeps the int8 weight as stored; the product runs through
`torch._int_mm` (int8 x int8 -> int32) where the backend accepts the shapes, else
through an exact chunked fallback. No bf16 copy of an int8 weight is ever made.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..codecs.int8 import dequantize_weight, int8_matmul, quantize_per_token
from ..errors import IdeoquantError
from ..io.tensor_folder import TensorFolder, read_config
from ..model.build import (
    assign_tensor,
    build_meta_transformer,
    finalize_model,
    set_module,
)
from ..model.inventory import (
    check_inventory,
    infer_dims,
    layout_of,
    model_config,
    to_layout_names,
)
from .linear import QuantizedLinear, as_bytes, from_bytes


class Int8Linear(QuantizedLinear):
    """nn.Linear replacement: int8 weight [out, in], float32 scale [out, 1], dynamic per-token int8 inputs."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None):
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"Int8Linear needs a 2-D int8 weight, got {weight.dtype} {list(weight.shape)}")
        super().__init__(weight.shape[1], weight.shape[0], bias)
        if weight_scale.numel() != self.out_features:
            raise ValueError(f"Int8Linear needs one scale per row, got {weight_scale.numel()} for {self.out_features}")
        # Buffers, not parameters: diffusers takes a model's dtype from its first floating parameter.
        # The scales are kept as raw bytes so that `model.to(dtype)` cannot round them.
        self.register_buffer("weight", weight)
        self.register_buffer("scale_bytes", as_bytes(weight_scale.to(torch.float32)))

    @property
    def weight_scale(self) -> torch.Tensor:
        """float32 per-row scales [out, 1]."""
        return from_bytes(self.scale_bytes, torch.float32).reshape(-1, 1)

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        return dequantize_weight(self.weight[start:stop], self.weight_scale[start:stop])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, x_scale = quantize_per_token(x.reshape(-1, self.in_features))
        acc = int8_matmul(q, self.weight)
        y = acc.to(torch.float32) * x_scale * self.weight_scale.reshape(1, -1)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(x.dtype).reshape(*lead, self.out_features)


# --- loading a converted folder ------------------------------------------------------------

def read_int8_config(folder: Path) -> dict:
    """The branch config.json, checked to be a compressed-tensors int-quantized checkpoint."""
    config = read_config(Path(folder), required=True)
    qc = config.get("quantization_config")
    qc = qc if isinstance(qc, dict) else {}
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "int-quantized":
        raise IdeoquantError(f"{folder}: not a compressed-tensors int-quantized checkpoint")
    return config


def load_int8_transformer(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
) -> nn.Module:
    """An `Ideogram4Transformer2DModel` with Int8Linear modules, loaded tensor by tensor from a converted folder."""
    folder = Path(folder)
    origin = str(folder)
    config = read_int8_config(folder)
    device = torch.device(device)
    stored = TensorFolder.open(folder)
    # The checks every loader runs: one layout, all 458 tensors with their shapes, dims
    # from the tensors cross-checked with config.json.
    shapes = {n: s for n, s in stored.shapes().items() if not n.endswith(".weight_scale")}
    layout = layout_of(shapes, origin)
    dims = infer_dims(shapes, layout, origin, config)
    for name in check_inventory(shapes, layout, dims, origin):
        raise IdeoquantError(f"{origin}: unexpected tensor {name}")

    def split_rows(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        # A fused tensor goes to its diffusers names as equal row slices (q, k, v).
        if layout == "diffusers":
            return [(name, tensor)]
        names = to_layout_names(name, "diffusers")
        return list(zip(names, tensor.chunk(len(names), dim=0)))

    model = build_meta_transformer(model_config(dims, config))
    int8_modules = sorted(n[: -len(".weight_scale")] for n in stored if n.endswith(".weight_scale"))
    consumed: set[str] = set()
    for module in int8_modules:
        weight_name, scale_name, bias_name = module + ".weight", module + ".weight_scale", module + ".bias"
        if weight_name not in stored or stored[weight_name].dtype != torch.int8:
            raise IdeoquantError(f"{origin}: {scale_name} belongs to no int8 weight")
        weight, scale = stored.read(weight_name), stored.read(scale_name)
        if scale.numel() != weight.shape[0]:
            raise IdeoquantError(f"{origin}: {scale_name} has {scale.numel()} scales for {weight.shape[0]} rows")
        bias = stored.read(bias_name) if bias_name in stored else None
        consumed.update(n for n in (weight_name, scale_name, bias_name) if n in stored)
        parts = len(split_rows(weight_name, weight))
        biases = [None] * parts if bias is None else [b.to(device, dtype) for _, b in split_rows(bias_name, bias)]
        for (dname, w_part), (_, s_part), b_part in zip(split_rows(weight_name, weight), split_rows(scale_name, scale), biases):
            linear = Int8Linear(w_part.contiguous().to(device), s_part.contiguous().to(device), b_part)
            set_module(model, dname[: -len(".weight")], linear)
    for name in stored:
        if name in consumed:
            continue
        tensor = stored.read(name)
        if not tensor.is_floating_point():
            raise IdeoquantError(f"{origin}: tensor {name} has dtype {tensor.dtype}, expected a float type")
        for dname, part in split_rows(name, tensor.to(dtype)):
            assign_tensor(model, dname, part.contiguous().to(device))
    model = finalize_model(model, device, origin)
    model.ideoquant_source = {"format": "int8", "path": str(folder)}
    return model
