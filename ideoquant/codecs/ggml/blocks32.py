"""ggml's 32-weight block types: Q8_0 and Q4_0.

Encoders byte-identical to ggml (`quantize_row_<type>_ref`, and for Q4_0 the `_impl` path
with an importance matrix); decoders bit-equal to gguf-py's.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from .base import (
    DEFAULT_CHUNK_WEIGHTS,
    GGMLType,
    fp16_bytes,
    fp16_from_bytes,
    round_half_away_inplace,
)
from .scale_search import (
    INNER_CHUNK_WEIGHTS,
    VEC_COLS,
    chunk_ranges,
    col_align,
    cpu32,
    exact_div,
    exact_sqrt,
    gapped33,
    make_qx,
    round_up,
    sum_rows,
    ungap33,
)

_F32 = torch.float32


class Q8_0(GGMLType):
    """34 bytes per 32 weights: fp16 d = absmax/127, then 32 int8 codes round(x/d)."""

    qtype = GGMLQuantizationType.Q8_0
    block_size = 32
    type_size = 34

    @classmethod
    def quantize_blocks(cls, blocks, weights=None):
        # Block max |x| as max(|max|, |min|): two plain reductions beat abs() + amax.
        # The abs also makes an all-zero block give +0, as fabsf does in ggml.
        d = torch.maximum(blocks.amax(dim=1, keepdim=True).abs_(), blocks.amin(dim=1, keepdim=True).abs_()) / 127
        inv_d = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        out = torch.empty((blocks.shape[0], cls.type_size), dtype=torch.uint8)
        out[:, :2] = fp16_bytes(d.reshape(-1))
        # Casting to int8 truncates toward zero, which completes roundf.
        out[:, 2:].view(torch.int8).copy_(round_half_away_inplace(blocks * inv_d))
        return out

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = fp16_from_bytes(blocks[:, :2])
        return blocks[:, 2:].view(torch.int8).to(torch.float32).mul_(d)


# --------------------------------------------------------------------------------------------
# Q4_0
# --------------------------------------------------------------------------------------------


def _pack_q4_0(d: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """d [n] float32, L [n, 32] integer levels 0..15 -> uint8 [n, 18]."""
    Lb = L.to(torch.uint8)
    qs = Lb[:, :16] | (Lb[:, 16:] << 4)
    return torch.cat([fp16_bytes(d), qs], dim=1)


def _encode_q4_0_ref(blocks: torch.Tensor) -> torch.Tensor:
    amax, arg = blocks.abs().max(dim=1)
    mx = blocks.gather(1, arg.unsqueeze(1)).squeeze(1)
    mx = torch.where(amax > 0, mx, torch.zeros_like(mx))  # ggml keeps max = 0.0f unless |v| > 0
    d = mx / -8
    idv = torch.where(d != 0, exact_div(1.0, d), torch.zeros_like(d))
    x0 = blocks * idv.unsqueeze(1)
    L = torch.clamp(torch.trunc(x0 + 8.5), max=15.0)  # MIN(15, (int8_t)(x0 + 8.5f))
    return _pack_q4_0(d, L)


def _encode_q4_0_impl(X34: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """X34: [34, B] gapped blocks; qw: [34, B] importance; sigma2: [B] -> uint8 [B, 18]."""
    X = X34[1:]
    Xs = X * X
    Xs.add_(sigma2)
    W = qw[1:] * exact_sqrt(Xs)
    d, L = make_qx(X, W, 8, gapped=True)
    return _pack_q4_0(d, ungap33(L).permute(1, 0))




class Q4_0(GGMLType):
    """18 bytes per 32 weights: fp16 d, 32 4-bit levels (x = d * (q - 8))."""

    qtype = GGMLQuantizationType.Q4_0
    block_size = 32
    type_size = 18
    uses_imatrix = True

    @classmethod
    def quantize_blocks(cls, blocks, weights=None):
        """Without weights: quantize_row_q4_0_ref. With weights [n, 32]: each block is treated
        as a row of its own (ggml's sigma2 is a per-row quantity; see quantize_rows)."""
        blocks = cpu32(blocks).reshape(-1, 32)
        if weights is None:
            return _encode_q4_0_ref(blocks)
        return cls._impl_rows(blocks, cpu32(weights).reshape(-1, 32))

    @classmethod
    def quantize_rows(cls, rows, imatrix=None):
        m, k = rows.shape
        if not cls.can_encode(k):
            raise ValueError(f"{cls.__name__}: row length {k} is not a multiple of {cls.block_size}")
        rows = cpu32(rows)
        if imatrix is None:
            return _encode_q4_0_ref(rows.reshape(-1, 32)).reshape(m, -1)
        qw = cpu32(imatrix).reshape(1, k).expand(m, k)
        return cls._impl_rows(rows, qw)

    @classmethod
    def _impl_rows(cls, rows: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
        """quantize_row_q4_0_impl on each row of rows [m, k] with importance qw [m, k]."""
        m, k = rows.shape
        nb = k // 32
        out = torch.empty((m, nb * 18), dtype=torch.uint8)
        big = col_align()
        rows_step = max(big, round_up(max(1, DEFAULT_CHUNK_WEIGHTS // 4 // k), big))
        for a, b in chunk_ranges(m, rows_step):
            mr = b - a
            mp = round_up(mr, VEC_COLS if mr < big else big)
            x = rows[a:b]
            w = qw[a:b]
            if mp != mr:
                x = torch.cat([x, x.new_zeros(mp - mr, k)])
                w = torch.cat([w, w.new_zeros(mp - mr, k)])
            # [34, nb, mp]: position, block in row, row.
            X34 = gapped33(x.reshape(mp, nb, 32).permute(2, 1, 0), 34)
            # sigma2 = sum_x2 / n_per_row, sum_x2 accumulated over the whole row in order.
            sq = X34 * X34
            s = torch.zeros(mp, dtype=_F32)
            for j in range(nb):
                sq[0, j] = s
                sum_rows(sq[0:17, j], sq[17, j])
                s = sum_rows(sq[17:34, j])
            sigma2 = s / float(k)
            W34 = gapped33(w.reshape(mp, nb, 32).permute(2, 1, 0), 34)
            res = torch.empty((nb, mp, 18), dtype=torch.uint8)
            bstep = max(1, INNER_CHUNK_WEIGHTS // 32 // mp)
            for j0, j1 in chunk_ranges(nb, bstep):
                Xc = X34[:, j0:j1].reshape(34, -1)
                Wc = W34[:, j0:j1].reshape(34, -1)
                s2 = sigma2.repeat(j1 - j0)
                res[j0:j1] = _encode_q4_0_impl(Xc, Wc, s2).view(j1 - j0, mp, 18)
            out[a:b] = res.permute(1, 0, 2).reshape(mp, nb * 18)[:mr]
        return out

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        d = fp16_from_bytes(blocks[:, :2])
        qs = blocks[:, 2:].reshape(n, 1, 16)
        q = torch.cat([qs & 0xF, qs >> 4], dim=1).reshape(n, 32).to(torch.int8) - 8
        return d * q.to(_F32)
