"""ggml's float types: F32, F16 and BF16 (one weight per block)."""

from __future__ import annotations

from typing import ClassVar

import torch
from gguf import GGMLQuantizationType

from .base import GGMLType


class _FloatType(GGMLType):
    """A type whose block is one value stored as a torch float dtype (little-endian)."""

    block_size = 1
    torch_dtype: ClassVar[torch.dtype]

    @classmethod
    def quantize_blocks(cls, blocks, weights=None):
        return blocks.to(cls.torch_dtype).contiguous().view(torch.uint8).reshape(-1, cls.type_size)

    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.contiguous().view(cls.torch_dtype).to(torch.float32).reshape(-1, 1)


class F32(_FloatType):
    qtype = GGMLQuantizationType.F32
    type_size = 4
    torch_dtype = torch.float32


class F16(_FloatType):
    """IEEE half precision, round to nearest even (torch's cast is ggml's `GGML_FP32_TO_FP16`)."""

    qtype = GGMLQuantizationType.F16
    type_size = 2
    torch_dtype = torch.float16


class BF16(_FloatType):
    """bfloat16 with round-to-nearest-even, as ggml's `ggml_compute_fp32_to_bf16`."""

    qtype = GGMLQuantizationType.BF16
    type_size = 2
    torch_dtype = torch.bfloat16

    @classmethod
    def quantize_blocks(cls, blocks, weights=None):
        bits = blocks.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        # ggml forces quiet NaNs: keep the sign and set the quiet bit.
        half = torch.where(is_nan, (bits >> 16) | 64, rounded) & 0xFFFF
        return half.to(torch.int32).to(torch.int16).view(torch.uint8).reshape(-1, 2)
