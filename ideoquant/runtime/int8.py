"""W8A8 at run time: int8 weights per output channel, int8 activations per token.

The numerics here are the definition the converter quantizes against:

* weights: symmetric per output channel, scale = row absmax / 127, q = round(w / scale)
  (round half to even, as `torch.round` and the compressed-tensors compressor);
* activations: symmetric per token, computed at run time, scale = token absmax / 127;
* y = (q_x @ q_w^T in int32) * scale_x * scale_w^T + bias.

`Int8Linear` keeps the int8 weight as stored; the product runs through
`torch._int_mm` (int8 x int8 -> int32) where the backend accepts the shapes, else
through an exact chunked fallback. No bf16 copy of an int8 weight is ever made.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import IdeoquantError
from ..inventory import detect_layout, to_layout_names
from .common import QuantizedLinear, as_bytes, from_bytes

INT8_MAX = 127
# Smallest scale used for an all-zero row or token: keeps q = x / scale finite (q = 0).
MIN_SCALE = 1e-12
# Rows per vectorized chunk when quantizing large weights (bounds the float32 temporaries).
QUANT_CHUNK_ELEMENTS = 1 << 24
# K-slices of the exact fallback GEMM: partial sums of <= 1024 products of |q| <= 127
# stay below 2**24, so float32 accumulates them exactly.
FALLBACK_K_CHUNK = 1024


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (int8 [out, in], float32 scale [out, 1])."""
    out_features, in_features = weight.shape
    q = torch.empty((out_features, in_features), dtype=torch.int8, device=weight.device)
    scale = torch.empty((out_features, 1), dtype=torch.float32, device=weight.device)
    step = max(1, QUANT_CHUNK_ELEMENTS // max(1, in_features))
    for start in range(0, out_features, step):
        rows = weight[start : start + step].to(torch.float32)
        s = rows.abs().amax(dim=1, keepdim=True).clamp_min(MIN_SCALE) / INT8_MAX
        q[start : start + step] = torch.round(rows / s).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        scale[start : start + step] = s
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weight from int8 codes and per-row scales (for checks, not for inference)."""
    return q.to(torch.float32) * scale.to(torch.float32).reshape(-1, 1)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 per row of a 2-D activation: (int8 [M, K], float32 scale [M, 1])."""
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_SCALE) / INT8_MAX
    q = torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def _int_mm_fallback(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ w^T without `_int_mm`: float32 over K-slices small enough to be exact."""
    out = torch.zeros((a.shape[0], w.shape[0]), dtype=torch.int32, device=a.device)
    for k0 in range(0, a.shape[1], FALLBACK_K_CHUNK):
        k1 = k0 + FALLBACK_K_CHUNK
        part = a[:, k0:k1].to(torch.float32) @ w[:, k0:k1].to(torch.float32).t()
        out += part.to(torch.int32)
    return out


def _cuda_int_mm_ok(k: int, n: int) -> bool:
    # cuBLASLt int8 GEMM in torch needs K and N multiples of 8 (M > 16 is met by padding).
    return k % 8 == 0 and n % 8 == 0


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int32 product a @ w^T of int8 a [M, K] and int8 w [N, K]."""
    m, k = a.shape
    n = w.shape[0]
    if a.is_cuda:
        if not _cuda_int_mm_ok(k, n):
            return _int_mm_fallback(a, w)
        pad = max(0, 17 - m)
        pad += -(m + pad) % 8
        if pad:
            # M <= 16 is refused on CUDA: zero rows are free to add and dropped after.
            a = torch.cat([a, a.new_zeros((pad, k))])
        try:
            return torch._int_mm(a, w.t())[:m]
        except RuntimeError:
            return _int_mm_fallback(a[:m], w)
    try:
        return torch._int_mm(a, w.t())
    except RuntimeError:
        return _int_mm_fallback(a, w)


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

def _weight_files(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise IdeoquantError(f"{folder}: no .safetensors files")
    return files


def read_int8_config(folder: Path) -> dict:
    """The branch config.json, checked to be a compressed-tensors int-quantized checkpoint."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError:
        raise IdeoquantError(f"{folder}: no config.json") from None
    except ValueError:
        raise IdeoquantError(f"{path}: not valid JSON") from None
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "int-quantized":
        raise IdeoquantError(f"{folder}: not a compressed-tensors int-quantized checkpoint")
    return config


def load_int8_transformer(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
) -> nn.Module:
    """An `Ideogram4Transformer2DModel` with Int8Linear modules, loaded tensor by tensor from a converted folder."""
    from safetensors import safe_open

    from .common import assign_tensor, build_meta_transformer, materialize_rotary, meta_leftovers, set_module

    folder = Path(folder)
    config = read_int8_config(folder)
    device = torch.device(device)
    handles = {}
    where: dict[str, Path] = {}
    for path in _weight_files(folder):
        handles[path] = safe_open(str(path), framework="pt", device="cpu")
        for name in handles[path].keys():
            where[name] = path
    layout = detect_layout(where)

    def read(name: str) -> torch.Tensor:
        return handles[where[name]].get_tensor(name)

    def split_rows(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        # A fused tensor goes to its diffusers names as equal row slices (q, k, v).
        if layout == "diffusers":
            return [(name, tensor)]
        names = to_layout_names(name, "diffusers")
        return list(zip(names, tensor.chunk(len(names), dim=0)))

    model = build_meta_transformer(config)
    int8_modules = sorted(n[: -len(".weight_scale")] for n in where if n.endswith(".weight_scale"))
    consumed: set[str] = set()
    for module in int8_modules:
        weight_name, scale_name, bias_name = module + ".weight", module + ".weight_scale", module + ".bias"
        weight, scale = read(weight_name), read(scale_name)
        bias = read(bias_name) if bias_name in where else None
        consumed.update(n for n in (weight_name, scale_name, bias_name) if n in where)
        parts = len(split_rows(weight_name, weight))
        biases = [None] * parts if bias is None else [b.to(device, dtype) for _, b in split_rows(bias_name, bias)]
        for (dname, w_part), (_, s_part), b_part in zip(split_rows(weight_name, weight), split_rows(scale_name, scale), biases):
            linear = Int8Linear(w_part.contiguous().to(device), s_part.contiguous().to(device), b_part)
            try:
                set_module(model, dname[: -len(".weight")], linear)
            except AttributeError:
                raise IdeoquantError(f"{folder}: {module} is not a linear of this model") from None
    for name in where:
        if name in consumed:
            continue
        tensor = read(name)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        for dname, part in split_rows(name, tensor):
            try:
                assign_tensor(model, dname, part.contiguous().to(device))
            except AttributeError:
                raise IdeoquantError(f"{folder}: unexpected tensor {name}") from None
    materialize_rotary(model, device)
    missing = meta_leftovers(model)
    if missing:
        raise IdeoquantError(f"{folder}: tensors missing from the checkpoint: {', '.join(missing[:5])}")
    return model.eval()
