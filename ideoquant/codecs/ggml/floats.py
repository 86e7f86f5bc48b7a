"""ggml's float types: F32, F16 and BF16 (one weight per block)."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from .base import GGMLType, fp16_bytes, fp16_from_bytes


class F32(GGMLType):
    qtype = GGMLQuantizationType.F32
    block_size = 1
    type_size = 4

    @classmethod
    def quantize_blocks(cls, blocks, weights=None):
        return blocks.to(torch.float32).contiguous().view(torch.uint8).reshape(-1, 4)

    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.contiguous().view(torch.float32).reshape(-1, 1)


class F16(GGMLType):
    qtype = GGMLQuantizationType.F16
    block_size = 1
    type_size = 2

    @classmethod
    def quantize_blocks(cls, blocks, weights=None):
        return fp16_bytes(blocks.reshape(-1))

    @classmethod
    def dequantize_blocks(cls, blocks):
        return fp16_from_bytes(blocks)


class BF16(GGMLType):
    """bfloat16 with round-to-nearest-even, as ggml's `ggml_compute_fp32_to_bf16`."""

    qtype = GGMLQuantizationType.BF16
    block_size = 1
    type_size = 2

    @classmethod
    def quantize_blocks(cls, blocks, weights=None):
        bits = blocks.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        # ggml forces quiet NaNs: keep the sign and set the quiet bit.
        half = torch.where(is_nan, (bits >> 16) | 64, rounded) & 0xFFFF
        return half.to(torch.int32).to(torch.int16).view(torch.uint8).reshape(-1, 2)

    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.contiguous().view(torch.bfloat16).to(torch.float32).reshape(-1, 1)

