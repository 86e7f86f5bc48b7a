"""Run a GGUF branch file in PyTorch: ggml block bytes stay resident, rows are decoded per forward.

The file is read with the `gguf` package's reader; every linear keeps its bytes in a
`GGUFLinear` ([out, row_bytes] uint8) and decodes them with the project's torch ggml
decoders (bit-exact with the `gguf` package's numpy dequantizers) on whatever device the
bytes live. A fused `attention.qkv` is split by byte rows into to_q/to_k/to_v, which is
exact for every ggml type because blocks never straddle rows.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from gguf import GGMLQuantizationType, GGUFReader

from ..codecs.ggml.base import GGMLType
from ..codecs.ggml.registry import ggml_type
from ..errors import IdeoquantError
from ..model.build import build_meta_transformer, finalize_model
from ..model.inventory import (
    BRANCHES,
    check_inventory,
    detect_prefix,
    infer_dims,
    layout_of,
    model_config,
    normalize_branch,
    to_layout_names,
)
from .linear import LinearSlot, QuantizedLinear, assign_small, install_linears, read_bytes, small_specs

log = logging.getLogger("ideoquant")

ARCHITECTURE = "ideogram4"
BRANCH_KEY = "ideoquant.branch"
# ggml float types whose bytes are the weight itself: a view replaces the float32 round trip.
_FLOAT_VIEWS = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


class GGUFLinear(QuantizedLinear):
    """A linear whose weight is ggml block bytes, uint8 [out_features, row_bytes]."""

    def __init__(self, qweight: torch.Tensor, qtype: GGMLQuantizationType, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__(in_features, qweight.shape[0], bias)
        self.qtype = GGMLQuantizationType(qtype)
        self.codec: type[GGMLType] = ggml_type(self.qtype)
        if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != self.codec.row_bytes(in_features):
            raise IdeoquantError(
                f"{self.qtype.name} rows of {in_features} weights need {self.codec.row_bytes(in_features)} bytes, "
                f"got {qweight.dtype} {list(qweight.shape)}"
            )
        self.register_buffer("qweight", qweight)

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.codec.dequantize_rows(self.qweight[start:stop])

    def weight_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        if _FLOAT_VIEWS.get(self.qtype) == dtype:
            return self.qweight[start:stop].view(dtype)
        return self.dequantize_rows(start, stop).to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype.name}"


# --- reading ---------------------------------------------------------------------------------

def _open(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError, TypeError) as e:
        # The reader raises bare ValueErrors, also for ggml type ids it does not know.
        raise IdeoquantError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _string_field(reader: GGUFReader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        value = field.contents()
    except Exception:  # a field of another type under a known key
        return None
    return value if isinstance(value, str) else None


def gguf_branch(path: str | Path, reader: GGUFReader | None = None) -> str:
    """The branch a GGUF file holds: its `ideoquant.branch` key, else `uncond` in the file name."""
    path = Path(path)
    reader = reader or _open(path)
    value = _string_field(reader, BRANCH_KEY)
    if value in BRANCHES:
        return value
    return "unconditional_transformer" if "uncond" in path.name.lower() else "transformer"


def _logical_shape(t) -> tuple[int, ...]:
    # ggml stores dims innermost first; torch order is the reverse.
    return tuple(int(d) for d in reversed(t.shape.tolist()))


class _TensorData:
    """Reads tensor data out of a GGUF file with plain reads (the reader only parses the header)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.path = path
        self.device = device
        self.fh = open(path, "rb")

    def rows(self, t, rows: int) -> torch.Tensor:
        """A tensor's data as uint8 [rows, bytes] on the target device."""
        data = read_bytes(self.fh, int(t.data_offset), int(t.n_bytes), str(self.path)).reshape(rows, -1)
        return data if self.device.type == "cpu" else data.to(self.device)

    def decoded(self, t, shape: tuple[int, ...]) -> torch.Tensor:
        """A small tensor decoded to float32 with its logical shape."""
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        return ggml_type(t.tensor_type).dequantize_rows(self.rows(t, rows)).reshape(shape)

    def close(self) -> None:
        self.fh.close()


def load_gguf_transformer(path: str | Path, branch: str | None = None, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """An `Ideogram4Transformer2DModel` from one GGUF branch file, linears kept as ggml blocks."""
    path = Path(path)
    device = torch.device(device)
    if not path.is_file():
        raise IdeoquantError(f"{path}: no such GGUF file")
    reader = _open(path)
    arch = _string_field(reader, "general.architecture")
    if arch is not None and arch != ARCHITECTURE:
        log.warning("%s: general.architecture is %r, not %r", path, arch, ARCHITECTURE)
    wanted = normalize_branch(branch)
    found = gguf_branch(path, reader)
    if wanted is not None and wanted != found:
        raise IdeoquantError(f"{path}: holds the {found} branch, not {wanted}")

    prefix = detect_prefix(t.name for t in reader.tensors)
    stored = {t.name[len(prefix) :]: t for t in reader.tensors if t.name.startswith(prefix)}
    origin = str(path)
    for name, t in stored.items():
        try:
            ggml_type(t.tensor_type)
        except ValueError:
            raise IdeoquantError(f"{origin}: tensor {name} has ggml type {t.tensor_type.name}, which this runtime cannot decode") from None
    shapes = {name: _logical_shape(t) for name, t in stored.items()}
    layout = layout_of(shapes, origin)
    dims = infer_dims(shapes, layout, origin)
    extra = check_inventory(shapes, layout, dims, origin)
    for name in extra:
        log.warning("%s: unknown extra tensor %s (ignored)", origin, name)

    model = build_meta_transformer(model_config(dims, None))

    reads = _TensorData(path, device)

    def vector(name: str) -> torch.Tensor:
        return reads.decoded(stored[name], shapes[name]).to(dtype)

    fused_rows: dict[str, torch.Tensor] = {}

    def make(slot: LinearSlot, part: int, rows: tuple[int, int]) -> GGUFLinear:
        names = to_layout_names(slot.spec.name, layout)
        in_f = slot.spec.shape[1]
        bias = vector(slot.bias_name) if slot.bias_name else None
        if len(names) == len(slot.module_paths):
            t = stored[names[part]]
            data = reads.rows(t, shapes[names[part]][0])
        else:
            # One fused tensor for several modules: read once, hand out byte-row views.
            t = stored[names[0]]
            if names[0] not in fused_rows:
                fused_rows.clear()
                fused_rows[names[0]] = reads.rows(t, slot.spec.shape[0])
            data = fused_rows[names[0]][rows[0] : rows[1]]
        try:
            return GGUFLinear(data, t.tensor_type, in_f, bias)
        except IdeoquantError as e:
            raise IdeoquantError(f"{origin}: tensor {t.name}: {e}") from None

    try:
        install_linears(model, dims, make)
        fused_rows.clear()
        for spec in small_specs(dims):
            assign_small(model, spec.name, reads.decoded(stored[spec.name], spec.shape), device, dtype)
    finally:
        reads.close()
    stored.clear()  # drop the reader's tensor views: the model holds what it needs
    del reader
    model = finalize_model(model, device, origin)
    model.ideoquant_source = {"format": "gguf", "path": str(path), "branch": found}
    return model


__all__ = ["GGUFLinear", "gguf_branch", "load_gguf_transformer"]
