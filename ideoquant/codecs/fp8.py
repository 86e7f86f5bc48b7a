"""FP8 (float8_e4m3fn) weights with per-row scales, as the published checkpoint stores them.

`fp8_to_float32` is `w.float() * scale` bit for bit. It runs in one C++ pass where the
native kernel is available and agrees with the torch code on every code (`native`), else
in torch through fp16 bit moves.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

import torch

from .native import build_native_library, failure_reason, fused_requested

log = logging.getLogger(__name__)


def fp8_has_nan(w: torch.Tensor) -> bool:
    """Whether float8_e4m3fn weights hold a NaN code (0x7F or 0xFF: the largest int8 value
    and the largest uint8 value, so two byte-wide max reductions find them)."""
    return w.numel() > 0 and (int(w.view(torch.int8).amax()) == 0x7F or int(w.view(torch.uint8).amax()) == 0xFF)


def fp8_to_float32(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`w.float() * scale` for float8_e4m3fn weights w [rows, cols] (or [n]) and a scale that
    is one value or one per row ([rows, 1]), bit for bit. (NaN codes become finite: check
    `fp8_has_nan` first; a product beyond float32's range is Inf, as in `w.float() * scale`.)"""
    kernel = compiled_fp8_decoder()
    if kernel is not None:
        decoded = _decode_native(kernel, w, scale)
        if decoded is not None:
            return decoded
    return fp8_to_float32_eager(w, scale)


def fp8_to_float32_eager(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`fp8_to_float32` in torch, through fp16 bit moves (torch's own fp8 cast is several
    times slower). An e4m3 byte, sign-extended and shifted left by 7 with bit 14 cleared, is
    an fp16 of the same value times 2^-8, subnormals included; the 2^8 goes into the scale,
    which is exact unless the scale is within 2^8 of float32's largest value: then the 2^8
    goes into the values instead (as exact), so a product float32 can hold never overflows
    on the way."""
    half = (w.view(torch.int8).to(torch.int16) << 7).bitwise_and_(-16512).view(torch.float16)
    scale = scale.to(torch.float32)
    if scale.numel() and float(scale.abs().amax()) >= _SCALE_LIMIT:
        return half.to(torch.float32).mul_(256.0).mul_(scale)
    return half.to(torch.float32).mul_(scale * 256.0)


# Scales from here up would overflow when multiplied by 2^8.
_SCALE_LIMIT = torch.finfo(torch.float32).max / 256.0

FP8_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* The value of a float8_e4m3fn byte in float32, exactly: exponent bias 7 (float32's 127 is
   120 more), three mantissa bits; exponent 0 is subnormal, m * 2^-9. The NaN codes come out
   as 480 (the caller checks for them first). Selected by masks, not branches, so that the
   loop over a row vectorizes. */
static inline float e4m3_value(uint32_t b) {
    const uint32_t sign = (b & 0x80u) << 24, e = (b >> 3) & 0xFu, m = b & 7u;
    const float sub = (float)(int32_t)m * 0.001953125f;
    uint32_t sub_bits;
    memcpy(&sub_bits, &sub, 4);
    const uint32_t normal = -(uint32_t)(e != 0);
    const uint32_t bits = sign | ((((e + 120u) << 23) | (m << 20)) & normal) | (sub_bits & ~normal);
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

extern "C" void fp8_rows_to_float32(const uint8_t* w, int64_t rows, int64_t cols, const float* scale,
                                    int64_t scale_step, float* out, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float s = scale[r * scale_step];
        const uint8_t* __restrict src = w + r * cols;
        float* __restrict dst = out + r * cols;
        for (int64_t c = 0; c < cols; ++c) dst[c] = e4m3_value(src[c]) * s;
    }
}
"""


def _decode_native(kernel: Callable[..., None], w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """The C++ decode of `fp8_to_float32`, or None for shapes it does not take."""
    rows = w.reshape(-1, w.shape[-1]) if w.dim() > 1 else w.reshape(1, -1)
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        step = 0
    elif w.dim() == 2 and scale.shape == (w.shape[0], 1):
        step = 1
    else:
        return None
    rows = rows.contiguous()
    scale = scale.reshape(-1).contiguous()
    out = torch.empty(w.shape, dtype=torch.float32)
    kernel(rows.data_ptr(), rows.shape[0], rows.shape[1], scale.data_ptr(), step, out.data_ptr(), max(1, torch.get_num_threads()))
    return out


def _check_codes() -> tuple[torch.Tensor, torch.Tensor]:
    """Every non-NaN e4m3 code in each row, and per-row scales at the edges of float32 (huge
    ones whose products overflow, subnormal ones, ones within 2^8 of the largest value)."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]
    scales = torch.tensor([1.0, 3.5e-3, -0.75, 1e36, 2e36, 1e38, 3.4e38, 1e-40, 1.4e-45, 0.0, -0.0], dtype=torch.float32)
    w = codes.repeat(scales.numel(), 1).view(torch.float8_e4m3fn)
    return w, scales.reshape(-1, 1)


@functools.cache
def compiled_fp8_decoder() -> Callable[..., None] | None:
    """The C++ FP8 decoder, once it has given torch's bits on every code and edge scales; else None."""
    if not fused_requested():
        return None
    try:
        lib = build_native_library("fp8_decode", FP8_SOURCE)
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.fp8_rows_to_float32.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64]
        lib.fp8_rows_to_float32.restype = None
        kernel = lib.fp8_rows_to_float32
        w, scales = _check_codes()
        want = w.to(torch.float32) * scales
        per_row = _decode_native(kernel, w, scales)
        one = _decode_native(kernel, w, scales[6])
        if (torch.equal(per_row.view(torch.int32), want.view(torch.int32))
                and torch.equal(one.view(torch.int32), (w.to(torch.float32) * scales[6]).view(torch.int32))):
            return kernel
        reason = "its results differ from torch's on this machine"
    except Exception as exc:  # noqa: BLE001 - no compiler, say: use the torch code
        reason = failure_reason(exc)
    log.warning("compiled FP8 decoder not used (%s); decoding in torch", reason)
    return None
