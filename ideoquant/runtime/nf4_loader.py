"""Run an NF4 (bitsandbytes layout) branch folder in PyTorch, on CPU or CUDA, without bitsandbytes.

Packed 4-bit codes stay resident as uint8 and are decoded per forward with
`ideoquant.formats.nf4.dequantize_nf4`. A double-quantized absmax stays compressed too
(8-bit codes plus the nested scales) and is expanded per forward, so resident bytes match
the file. Float scales are held as raw bytes so that `model.to(dtype)` cannot round them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from ..codecs.nf4 import (
    NF4_BLOCKSIZE,
    NestedAbsmax,
    dequantize_nested_absmax,
    dequantize_nf4,
    parse_nf4_serialized,
)
from ..errors import IdeoquantError
from ..io.tensor_folder import TensorFolder, read_config
from ..model.build import build_meta_transformer, finalize_model
from ..model.inventory import (
    check_inventory,
    infer_dims,
    layout_of,
    model_config,
    to_layout_names,
)
from .linear import (
    DenseLinear,
    LinearSlot,
    QuantizedLinear,
    as_bytes,
    assign_small,
    from_bytes,
    install_linears,
    small_specs,
)

log = logging.getLogger("ideoquant")

QUANT_STATE = "quant_state.bitsandbytes__nf4"
# Keys bitsandbytes stores next to a packed `<m>.weight`; not model tensors themselves.
COMPANION_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", "." + QUANT_STATE, ".quant_state.bitsandbytes__fp4")


class NF4Linear(QuantizedLinear):
    """A linear whose weight is NF4 codes (two per byte) with one absmax per 64 weights.

    The module may hold a row range of a larger stored tensor (q, k or v of a fused qkv):
    it keeps the whole 64-blocks covering its rows and `skip`, the weights before its
    first row in the first block.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor | NestedAbsmax,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        skip: int = 0,
        covered: int | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        self.skip = int(skip)
        self.covered = int(covered if covered is not None else in_features * out_features)
        if self.skip + in_features * out_features > self.covered:
            raise IdeoquantError("NF4 row range runs past its stored blocks")
        blocks = -(-self.covered // NF4_BLOCKSIZE)
        packed = packed.reshape(-1)
        if packed.dtype != torch.uint8 or packed.numel() != (self.covered + 1) // 2:
            raise IdeoquantError(f"NF4 data holds {packed.numel()} {packed.dtype} values, {self.covered} weights need {(self.covered + 1) // 2} bytes")
        self.register_buffer("qweight", packed)
        if isinstance(absmax, NestedAbsmax):
            if absmax.codes.numel() != blocks:
                raise IdeoquantError(f"NF4 nested absmax holds {absmax.codes.numel()} codes, {blocks} blocks need one each")
            self.register_buffer("absmax_codes", absmax.codes.reshape(-1).to(torch.uint8))
            self.register_buffer("nested_absmax", as_bytes(absmax.nested_absmax.to(torch.float32)))
            self.register_buffer("nested_quant_map", as_bytes(absmax.nested_quant_map.to(torch.float32)))
            self.nested_offset = float(absmax.offset)
            self.nested_blocksize = int(absmax.blocksize)
            self.register_buffer("absmax", None)
        else:
            if absmax.numel() != blocks:
                raise IdeoquantError(f"NF4 absmax holds {absmax.numel()} scales, {blocks} blocks need one each")
            self.register_buffer("absmax", as_bytes(absmax.to(torch.float32)))
            self.nested_offset = None

    @property
    def double_quant(self) -> bool:
        """Whether the absmax is kept double-quantized."""
        return self.nested_offset is not None

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every stored block."""
        if not self.double_quant:
            return from_bytes(self.absmax, torch.float32)
        nested = NestedAbsmax(
            codes=self.absmax_codes,
            nested_absmax=from_bytes(self.nested_absmax, torch.float32),
            nested_quant_map=from_bytes(self.nested_quant_map, torch.float32),
            offset=self.nested_offset,
            blocksize=self.nested_blocksize,
        )
        return dequantize_nested_absmax(nested)

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        first = self.skip + start * self.in_features
        last = self.skip + stop * self.in_features
        b0, b1 = first // NF4_BLOCKSIZE, -(-last // NF4_BLOCKSIZE)
        n = min(b1 * NF4_BLOCKSIZE, self.covered) - b0 * NF4_BLOCKSIZE
        # Blocks hold an even number of codes, so a block boundary is a byte boundary.
        packed = self.qweight[b0 * NF4_BLOCKSIZE // 2 : b0 * NF4_BLOCKSIZE // 2 + (n + 1) // 2]
        flat = dequantize_nf4(packed, self.block_absmax()[b0:b1], (n,), torch.float32)
        offset = first - b0 * NF4_BLOCKSIZE
        return flat[offset : offset + (stop - start) * self.in_features].view(stop - start, self.in_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nf4, double_quant={self.double_quant}"


def nf4_row_range(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested: NestedAbsmax | None,
    in_features: int,
    rows: tuple[int, int],
    total: int,
) -> tuple[torch.Tensor, torch.Tensor | NestedAbsmax, int, int]:
    """The stored blocks covering rows [start, stop) of an NF4 tensor of `total` weights.

    Returns (packed bytes, absmax or nested absmax, skip, covered). A nested absmax is
    sliced when the first block starts a nested block of 256, else expanded for the slice.
    """
    first, last = rows[0] * in_features, rows[1] * in_features
    b0, b1 = first // NF4_BLOCKSIZE, -(-last // NF4_BLOCKSIZE)
    covered = min(b1 * NF4_BLOCKSIZE, total) - b0 * NF4_BLOCKSIZE
    byte0 = b0 * NF4_BLOCKSIZE // 2
    part = packed.reshape(-1)[byte0 : byte0 + (covered + 1) // 2]
    scales: torch.Tensor | NestedAbsmax
    if nested is not None and b0 % nested.blocksize == 0:
        scales = NestedAbsmax(
            codes=nested.codes.reshape(-1)[b0:b1],
            nested_absmax=nested.nested_absmax.reshape(-1)[b0 // nested.blocksize : -(-b1 // nested.blocksize)],
            nested_quant_map=nested.nested_quant_map,
            offset=nested.offset,
            blocksize=nested.blocksize,
        )
    else:
        scales = absmax.reshape(-1)[b0:b1]
    return part, scales, first - b0 * NF4_BLOCKSIZE, covered


# --- reading a folder -------------------------------------------------------------------------

def _quant_shape(tensors: Mapping[str, torch.Tensor], weight_name: str) -> tuple[int, ...]:
    """The logical shape recorded in an NF4 weight's quant state."""
    raw = tensors[f"{weight_name}.{QUANT_STATE}"]
    try:
        meta = json.loads(bytes(raw.to(torch.uint8).numpy()).decode("utf-8"))
        return tuple(int(s) for s in meta["shape"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        raise IdeoquantError(f"{weight_name}: unreadable NF4 quant state") from None


def _nested_state(tensors: Mapping[str, torch.Tensor], weight_name: str) -> NestedAbsmax | None:
    """The double-quantized absmax of an NF4 weight as stored, or None when absmax is plain float32."""
    if f"{weight_name}.nested_absmax" not in tensors:
        return None
    meta = json.loads(bytes(tensors[f"{weight_name}.{QUANT_STATE}"].to(torch.uint8).numpy()).decode("utf-8"))
    return NestedAbsmax(
        codes=tensors[f"{weight_name}.absmax"].reshape(-1),
        nested_absmax=tensors[f"{weight_name}.nested_absmax"].reshape(-1).to(torch.float32),
        nested_quant_map=tensors[f"{weight_name}.nested_quant_map"].reshape(-1).to(torch.float32),
        offset=float(meta["nested_offset"]),
        blocksize=int(meta["nested_blocksize"]),
    )


def check_nf4_config(config: dict, origin: str) -> None:
    """Refuse a bitsandbytes config that is not 4-bit NF4."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "bitsandbytes":
        raise IdeoquantError(f"{origin}: quantization_config.quant_method is {qc.get('quant_method')!r}, not 'bitsandbytes'")
    if not qc.get("load_in_4bit", False):
        raise IdeoquantError(f"{origin}: bitsandbytes 8-bit checkpoints are not supported (load_in_4bit is false)")
    if qc.get("bnb_4bit_quant_type", "nf4") != "nf4":
        raise IdeoquantError(f"{origin}: bnb_4bit_quant_type is {qc.get('bnb_4bit_quant_type')!r}, only 'nf4' is supported")


def load_nf4_transformer(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> torch.nn.Module:
    """An `Ideogram4Transformer2DModel` from an NF4 branch folder; packed weights stay packed."""
    folder = Path(folder)
    device = torch.device(device)
    origin = str(folder)
    config = read_config(folder, required=True)
    check_nf4_config(config, origin)
    stored = TensorFolder.open(folder)
    tensors = stored.tensors()

    quantized = {n[: -len("." + QUANT_STATE)] for n in tensors if n.endswith("." + QUANT_STATE)}
    fp4 = [n for n in tensors if n.endswith(".quant_state.bitsandbytes__fp4")]
    if fp4:
        raise IdeoquantError(f"{origin}: {fp4[0]} is FP4, only NF4 is supported")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in tensors:
        if name.endswith(COMPANION_SUFFIXES):
            continue
        shapes[name] = _quant_shape(tensors, name) if name in quantized else stored[name].shape
    layout = layout_of(shapes, origin)
    dims = infer_dims(shapes, layout, origin, config)
    for name in check_inventory(shapes, layout, dims, origin):
        log.warning("%s: unknown extra tensor %s (ignored)", origin, name)

    model = build_meta_transformer(model_config(dims, config))

    def dense(name: str) -> torch.Tensor:
        t = tensors[name]
        if not t.is_floating_point():
            raise IdeoquantError(f"{origin}: tensor {name} has dtype {t.dtype}, expected a float type")
        return t

    cache: dict[str, tuple] = {}

    def stored_weight(name: str) -> tuple:
        """(packed, float32 absmax, nested or None, numel) of an NF4 weight, or (dense tensor,)."""
        if name in cache:
            return cache[name]
        cache.clear()
        if name in quantized:
            try:
                nf4 = parse_nf4_serialized(tensors, name[: -len(".weight")])
            except IdeoquantError as e:
                raise IdeoquantError(f"{origin}: {e}") from None
            nested = _nested_state(tensors, name)
            entry = (nf4.packed.to(device), nf4.absmax.to(device), _to_device(nested, device), math.prod(nf4.shape))
        else:
            entry = (dense(name).to(device),)
        cache[name] = entry
        return entry

    def make(slot: LinearSlot, part: int, rows: tuple[int, int]) -> QuantizedLinear:
        names = to_layout_names(slot.spec.name, layout)
        in_f = slot.spec.shape[1]
        bias = dense(slot.bias_name).to(device=device, dtype=dtype) if slot.bias_name else None
        if len(names) == len(slot.module_paths):
            name, local = names[part], (0, rows[1] - rows[0])
        else:
            name, local = names[0], rows
        entry = stored_weight(name)
        try:
            if len(entry) == 1:
                return DenseLinear(entry[0][local[0] : local[1]], bias)
            packed, absmax, nested, total = entry
            data, scales, skip, covered = nf4_row_range(packed, absmax, nested, in_f, local, total)
            return NF4Linear(data, scales, in_f, local[1] - local[0], bias, skip=skip, covered=covered)
        except IdeoquantError as e:
            raise IdeoquantError(f"{origin}: tensor {name}: {e}") from None

    install_linears(model, dims, make)
    cache.clear()
    for spec in small_specs(dims):
        assign_small(model, spec.name, dense(spec.name), device, dtype)
    model = finalize_model(model, device, origin)
    model.ideoquant_source = {"format": "nf4", "path": str(folder)}
    return model


def _to_device(nested: NestedAbsmax | None, device: torch.device) -> NestedAbsmax | None:
    if nested is None:
        return None
    return NestedAbsmax(
        codes=nested.codes.to(device),
        nested_absmax=nested.nested_absmax.to(device),
        nested_quant_map=nested.nested_quant_map.to(device),
        offset=nested.offset,
        blocksize=nested.blocksize,
    )


__all__ = ["NF4Linear", "check_nf4_config", "load_nf4_transformer", "nf4_row_range"]
