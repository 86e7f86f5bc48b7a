"""FP8 (float8_e4m3fn) weights with per-row scales, as the published checkpoint stores them."""

from __future__ import annotations

import torch


def fp8_has_nan(w: torch.Tensor) -> bool:
    """Whether float8_e4m3fn weights hold a NaN code (0x7F or 0xFF: the largest int8 value
    and the largest uint8 value, so two byte-wide max reductions find them)."""
    return w.numel() > 0 and (int(w.view(torch.int8).amax()) == 0x7F or int(w.view(torch.uint8).amax()) == 0xFF)


def fp8_to_float32(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`w.float() * scale` for float8_e4m3fn, bit for bit, through fp16 bit moves (torch's own
    fp8 cast is several times slower). An e4m3 byte, sign-extended and shifted left by 7 with
    bit 14 cleared, is an fp16 of the same value times 2^-8, subnormals included; the 2^8
    goes into the scale, which is exact. (NaN codes become finite: check `fp8_has_nan` first.)"""
    half = (w.view(torch.int8).to(torch.int16) << 7).bitwise_and_(-16512).view(torch.float16)
    return half.to(torch.float32).mul_(scale * 256.0)
