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
    goes into the scale, which is exact unless the scale is within 2^8 of float32's largest
    value: then the 2^8 goes into the values instead (as exact), so a product float32 can
    hold never overflows on the way. (NaN codes become finite: check `fp8_has_nan` first;
    a product beyond float32's range is Inf, as in `w.float() * scale`.)"""
    half = (w.view(torch.int8).to(torch.int16) << 7).bitwise_and_(-16512).view(torch.float16)
    scale = scale.to(torch.float32)
    if scale.numel() and float(scale.abs().amax()) >= _SCALE_LIMIT:
        return half.to(torch.float32).mul_(256.0).mul_(scale)
    return half.to(torch.float32).mul_(scale * 256.0)


# Scales from here up would overflow when multiplied by 2^8.
_SCALE_LIMIT = torch.finfo(torch.float32).max / 256.0
