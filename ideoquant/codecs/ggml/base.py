"""The ggml tensor-type base class and the float32 helpers every encoder shares.

One small class per type, as in gguf-py's quants.py: each subclass declares its block
geometry and encodes float32 blocks to ggml block bytes and back. Encoders reproduce ggml's
own output byte for byte (float32 arithmetic throughout); decoders reproduce the `gguf`
package's numpy dequantizers bit for bit in float32. `registry.ggml_type` finds a type's class.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from gguf import GGMLQuantizationType

from . import error_kernel

# Rows per vectorized chunk: bounds the temporaries of an encoder to a few hundred MB.
DEFAULT_CHUNK_WEIGHTS = 1 << 24


class GGMLType:
    """One ggml tensor type: block geometry plus row encoder and decoder."""

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    # True for types whose encoder changes with an importance matrix (ggml's `_impl` path).
    uses_imatrix: ClassVar[bool] = False


    # --- per-block mechanics, overridden by each type -------------------------------
    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Encode float32 [n, block_size] blocks (optional importance [n, block_size]) to uint8 [n, type_size]."""
        raise NotImplementedError(f"{cls.__name__} has no encoder")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """Decode uint8 [n, type_size] blocks to float32 [n, block_size]."""
        raise NotImplementedError(f"{cls.__name__} has no decoder")

    @classmethod
    def prepare(cls, imatrix: bool = False) -> None:
        """One-time set-up of the encoder path a conversion will run, the importance-matrix one
        when `imatrix` (e.g. building or checking a kernel; the other path sets up lazily)."""

    # --- row level, shared -------------------------------------------------------------
    @classmethod
    def row_bytes(cls, row_length: int) -> int:
        """Bytes one row of `row_length` weights takes."""
        return row_length // cls.block_size * cls.type_size

    @classmethod
    def can_encode(cls, row_length: int) -> bool:
        """Whether rows of this length fit whole blocks."""
        return row_length % cls.block_size == 0

    @classmethod
    def quantize_rows(cls, rows: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """Encode float32 rows [m, k] to uint8 [m, row_bytes(k)]; `imatrix` is one weight per column [k]."""
        m, k = rows.shape
        if not cls.can_encode(k):
            raise ValueError(f"{cls.__name__}: row length {k} is not a multiple of {cls.block_size}")
        blocks = rows.reshape(-1, cls.block_size)
        weights = None
        if imatrix is not None and cls.uses_imatrix:
            weights = imatrix.to(torch.float32).reshape(1, -1, cls.block_size).expand(m, -1, -1)
            weights = weights.reshape(-1, cls.block_size)
        return cls.quantize_blocks(blocks, weights).reshape(m, -1)

    @classmethod
    def dequantize_rows(cls, data: torch.Tensor) -> torch.Tensor:
        """Decode uint8 [m, bytes] rows to float32 [m, k]."""
        m = data.shape[0]
        return cls.dequantize_blocks(data.reshape(-1, cls.type_size)).reshape(m, -1)

    @classmethod
    def error_sums(cls, data: torch.Tensor, rows: torch.Tensor) -> tuple[float, float] | None:
        """(sum of (decoded - rows)^2, sum of rows^2) in float64 for encoded rows data [m, bytes]
        of float32 rows [m, k], without decoding them into memory; None where the type has no
        kernel for it (the caller decodes and measures)."""
        sums = error_kernel.compiled_error_sums(cls.__name__, cls.dequantize_blocks)
        return None if sums is None else sums(rows.reshape(-1, cls.block_size), data.reshape(-1, cls.type_size))

    @classmethod
    def quantize_tensor(
        cls,
        weight: torch.Tensor,
        imatrix: torch.Tensor | None = None,
        chunk_weights: int = DEFAULT_CHUNK_WEIGHTS,
    ) -> torch.Tensor:
        """Encode a 2-D float tensor in row chunks of bounded size; returns uint8 [m, row_bytes]."""
        m, k = weight.shape
        out = torch.empty((m, cls.row_bytes(k)), dtype=torch.uint8)
        step = max(1, chunk_weights // max(k, 1))
        for start in range(0, m, step):
            rows = weight[start : start + step].to(torch.float32)
            out[start : start + step] = cls.quantize_rows(rows, imatrix)
        return out




# The float32 just below 0.5. Adding it (with the sign of x) and truncating is C `roundf`
# for every float32: halves still reach the next integer, and 0.49999997 no longer does.
_JUST_BELOW_HALF_BITS = 0x3EFFFFFF
_SIGN_BIT = -(2**31)


def _signed_just_below_half(x: torch.Tensor) -> torch.Tensor:
    # copysign(0.49999997, x) with integer bit operations (several times faster than copysign).
    return (x.view(torch.int32) & _SIGN_BIT).bitwise_or_(_JUST_BELOW_HALF_BITS).view(torch.float32)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C `roundf`: round to nearest, halves away from zero (exact in float32)."""
    return (x + _signed_just_below_half(x)).trunc_()


def round_half_away_inplace(x: torch.Tensor) -> torch.Tensor:
    """`round_half_away` without the final truncation, overwriting x: a cast to an integer
    type truncates toward zero and completes it."""
    return x.add_(_signed_just_below_half(x))


def fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 [n] -> the little-endian bytes of their fp16 rounding, uint8 [n, 2]."""
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def fp16_from_bytes(data: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 2] little-endian fp16 -> float32 [n, 1]."""
    halves = data.view(torch.float16) if _halves_in_place(data) else data.contiguous().view(torch.float16)
    return halves.to(torch.float32).reshape(-1, 1)


def store_fp16(dest: torch.Tensor, values: torch.Tensor) -> None:
    """Write float32 values [n] rounded to fp16 (to nearest even, as ggml's FP32_TO_FP16) into
    the byte columns dest uint8 [n, 2], e.g. the header of each block of an output buffer."""
    if _halves_in_place(dest):
        dest.view(torch.float16).copy_(values.reshape(-1, 1))
    else:
        dest.copy_(fp16_bytes(values))


def _halves_in_place(data: torch.Tensor) -> bool:
    # Two byte columns of block rows (an even offset and row stride) read or written as fp16
    # where they lie: copying the strided bytes costs more than the conversion itself.
    return data.stride(-1) == 1 and data.storage_offset() % 2 == 0 and all(st % 2 == 0 for st in data.stride()[:-1])
