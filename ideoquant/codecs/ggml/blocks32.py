"""ggml's 32-weight block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and IQ4_NL.

Encoders byte-identical to ggml (`quantize_row_<type>_ref` without an importance matrix, the
`_impl` path with one; IQ4_NL has one search for both); decoders bit-equal to gguf-py's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar

import torch
from gguf import GGMLQuantizationType

from .base import (
    DEFAULT_CHUNK_WEIGHTS,
    GGMLType,
    fp16_bytes,
    fp16_from_bytes,
    round_half_away_inplace,
    store_fp16,
)
from . import fused_kernel, iq4
from . import ref32_kernel
from .iq4 import KVALUES_IQ4NL, iq4_block_scales, iq4_index
from .scale_search import (
    GROUP_MAX_EPS,
    INNER_CHUNK_WEIGHTS,
    VEC_COLS,
    _adversarial_blocks,
    chunk_ranges,
    col_align,
    cpu32,
    exact_div,
    exact_sqrt,
    fused_search_available,
    gapped33,
    make_qkx_all,
    make_qx,
    matching_kernel,
    qx_numerators,
    round_up,
    sum33,
    sum_rows,
    ungap33,
)

_F32 = torch.float32


def _encode_q8_0_ref(blocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_0_ref in eager torch: blocks [n, 32] -> uint8 [n, 34]."""
    # Block max |x| as max(|max|, |min|): two plain reductions beat abs() + amax.
    # The abs also makes an all-zero block give +0, as fabsf does in ggml.
    d = torch.maximum(blocks.amax(dim=1, keepdim=True).abs_(), blocks.amin(dim=1, keepdim=True).abs_()) / 127
    inv_d = torch.where(d == 0, torch.zeros_like(d), exact_div(1.0, d))
    out = torch.empty((blocks.shape[0], 34), dtype=torch.uint8)
    store_fp16(out[:, :2], d.reshape(-1))
    # Casting to int8 truncates toward zero, which completes roundf.
    out[:, 2:].view(torch.int8).copy_(round_half_away_inplace(blocks * inv_d))
    return out


class Q8_0(GGMLType):
    """34 bytes per 32 weights: fp16 d = absmax/127, then 32 int8 codes round(x/d)."""

    qtype = GGMLQuantizationType.Q8_0
    block_size = 32
    type_size = 34

    @classmethod
    def prepare(cls, imatrix=False):
        ref32_kernel.compiled_encoder("Q8_0", _encode_q8_0_ref)

    @classmethod
    def quantize_blocks(cls, blocks, weights=None):
        return ref32_kernel.encode_blocks("Q8_0", cpu32(blocks).reshape(-1, 32), _encode_q8_0_ref)

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


class Q4_0(GGMLType):
    """18 bytes per 32 weights: fp16 d, 32 4-bit levels (x = d * (q - 8))."""

    qtype = GGMLQuantizationType.Q4_0
    block_size = 32
    type_size = 18
    uses_imatrix = True

    @classmethod
    def prepare(cls, imatrix=False):
        if imatrix:
            fused_qx_rows()
        else:
            ref32_kernel.compiled_encoder("Q4_0", _encode_q4_0_ref)

    @classmethod
    def quantize_blocks(cls, blocks, weights=None):
        """Without weights: quantize_row_q4_0_ref. With weights [n, 32]: each block is treated
        as a row of its own (ggml's sigma2 is a per-row quantity; see quantize_rows)."""
        blocks = cpu32(blocks).reshape(-1, 32)
        if weights is None:
            return ref32_kernel.encode_blocks("Q4_0", blocks, _encode_q4_0_ref)
        return cls._impl_rows(blocks, cpu32(weights).reshape(-1, 32))

    @classmethod
    def quantize_rows(cls, rows, imatrix=None):
        m, k = rows.shape
        if not cls.can_encode(k):
            raise ValueError(f"{cls.__name__}: row length {k} is not a multiple of {cls.block_size}")
        rows = cpu32(rows)
        if imatrix is None:
            return ref32_kernel.encode_blocks("Q4_0", rows.reshape(-1, 32), _encode_q4_0_ref).reshape(m, -1)
        qw = cpu32(imatrix).reshape(1, k).expand(m, k)
        return cls._impl_rows(rows, qw)

    @classmethod
    def _impl_rows(cls, rows: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
        """quantize_row_q4_0_impl on each row of rows [m, k] with importance qw [m, k]."""
        # _pack_q4_0's bytes, a word at a time
        return qx_impl_rows(rows, qw, 8, lambda d, L: torch.cat([fp16_bytes(d), _nibbles(L)], dim=1), cls.type_size)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = fp16_from_bytes(blocks[:, :2])
        return _unpack_nibbles(blocks[:, 2:]).to(_F32).sub_(8.0).mul_(d)  # in place: no page faults


# --------------------------------------------------------------------------------------------
# Shared by Q4_1, Q5_0, Q5_1 and IQ4_NL: row sums, chunked block encoding, packing.
# --------------------------------------------------------------------------------------------


def row_sum_squares(rows: torch.Tensor) -> torch.Tensor:
    """`sum_x2 += x[j]*x[j]` over each row of rows [m, k] (k a multiple of 16), in ggml's order."""
    m, k = rows.shape
    big = col_align()
    mp = round_up(m, VEC_COLS if m < big else big)
    # buf[r + 1] = x[r]^2 (position-major). Step j sums [s, x[j]^2 .. x[j+15]^2] in order, the
    # running sum s written over row j, whose square the previous step has already added.
    buf = torch.zeros((k + 1, mp), dtype=_F32)
    buf[1:, :m] = rows.t()
    buf[1:].mul_(buf[1:])
    s = buf[0]
    for j in range(0, k, 16):
        buf[j] = s
        s = sum_rows(buf[j : j + 17])
    return s[:m]


def _row_importance_weights_eager(rows: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    sigma2 = row_sum_squares(rows) / float(rows.shape[1])
    return qw * exact_sqrt((rows * rows).add_(sigma2.unsqueeze(1)))


@functools.cache
def fused_row_weights() -> Callable[..., torch.Tensor] | None:
    """The C++ `row_importance_weights`, once it has matched the array code bit for bit on
    probe rows here (one importance vector for all rows, and one per row); else None."""
    kernel = fused_kernel.compiled_row_weights()
    if kernel is None:
        return None
    run = functools.partial(fused_kernel.row_weights_cpp, kernel)
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(37, 4608, generator=gen) * torch.exp(torch.randn(37, 1, generator=gen) * 3)
    x[3] = 0.0
    x[5, ::7] = 1e18
    qw = torch.rand(1, 4608, generator=gen) + 0.1
    probes = [[x, qw.expand(37, 4608)], [x[:, :256], torch.rand(37, 256, generator=gen)]]
    return matching_kernel("row importance weights", run, run, _row_importance_weights_eager, probes)


def row_importance_weights(rows: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """ggml's `qw[j]*sqrtf(sigma2 + x[j]*x[j])`, sigma2 = sum_x2/n_per_row, for each row of
    rows [m, k] with importance qw [m, k] (C++ where available and exact here)."""
    run = fused_row_weights()
    return run(rows, qw) if run is not None else _row_importance_weights_eager(rows, qw)


def _qx_row_levels_eager(rows: torch.Tensor, qw: torch.Tensor, nmax: int,
                         fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`qx_row_levels` by the array code (its own C++ pieces where available, unless not `fused`)."""
    w = row_importance_weights(rows, qw) if fused else _row_importance_weights_eager(rows, qw)
    d, L = make_qx(_pos_major(rows.reshape(-1, 32)), _pos_major(w.reshape(-1, 32)), nmax, gapped=True, fused=fused)
    return d, ungap33(L).t().to(torch.uint8)


@functools.cache
def fused_qx_rows() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """The C++ make_qx_quants on rows with their importance weights made on the fly, once it
    has matched the array code bit for bit on probe rows here (Q4_0's and Q5_0's nmax, one
    importance vector for all rows and one per row); else None."""
    kernel = fused_kernel.compiled_qx_rows()
    if kernel is None:
        return None

    def run(rows, qw, nmax):
        return fused_kernel.qx_rows_cpp(kernel, rows, qw, qx_numerators(nmax), nmax, GROUP_MAX_EPS)

    def flat(pair):
        return torch.cat([pair[0].unsqueeze(1), pair[1].to(_F32)], dim=1)

    def eager(rows, qw, nmax):
        return flat(_qx_row_levels_eager(rows, qw, nmax, fused=False))

    x, w = _adversarial_blocks(4101, seed=23)
    rows, per_row = x[:4096].reshape(8, 16384), w[:4096].reshape(8, 16384)
    one = torch.rand(1, 16384, generator=torch.Generator().manual_seed(5)).add_(0.05).expand(8, 16384)
    probes = [[rows, one, 8], [rows, per_row, 16], [x, w, 16], [rows[:, :544], per_row[:, :544], 8]]
    return matching_kernel("make_qx_quants on importance-weighted rows", lambda *p: flat(run(*p)), run, eager, probes)


def qx_row_levels(rows: torch.Tensor, qw: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(32, nmax, x, L, 1, w) on every block of rows [m, k], w the _impl weights
    qw*sqrt(sigma2 + x^2): (scale [m*k/32], levels + nmax uint8 [m*k/32, 32], 0 for all-zero
    blocks). C++ where available and exact here."""
    run = fused_qx_rows()
    return run(rows, qw, nmax) if run is not None else _qx_row_levels_eager(rows, qw, nmax)


def qx_impl_rows(rows: torch.Tensor, qw: torch.Tensor, nmax: int, pack, type_size: int) -> torch.Tensor:
    """quantize_row_<type>_impl of the make_qx_quants types (Q4_0, Q5_0) on each row of rows
    [m, k] with importance qw [m, k]; pack(scale, levels) -> uint8 [blocks, type_size]."""
    m, k = rows.shape
    out = torch.empty((m, k // 32 * type_size), dtype=torch.uint8)
    for a, b in chunk_ranges(m, max(1, DEFAULT_CHUNK_WEIGHTS // 4 // k)):
        out[a:b] = pack(*qx_row_levels(rows[a:b], qw[a:b], nmax)).view(b - a, -1)
    return out


def _pos_major(blocks: torch.Tensor) -> torch.Tensor:
    """[B, 32] -> [33, B] gapped position-major (`gapped33`)."""
    return gapped33(blocks.t().contiguous())


def _encode_block_chunks(blocks: torch.Tensor, weights: torch.Tensor | None, encode, type_size: int) -> torch.Tensor:
    """encode(x [B, 32], w [B, 32] | None) -> uint8 [B, type_size] over inner chunks of a few
    hundred thousand weights, each padded to whole vector groups of columns (the sums of the
    array code stay on torch's fast path)."""
    n = blocks.shape[0]
    out = torch.empty((n, type_size), dtype=torch.uint8)
    threads = max(1, torch.get_num_threads())
    big = col_align()
    step = max(big, INNER_CHUNK_WEIGHTS * threads // 32 // big * big)
    for a, b in chunk_ranges(n, step):
        nb = b - a
        npad = round_up(nb, VEC_COLS if nb < big else big)
        x = blocks[a:b]
        w = None if weights is None else weights[a:b]
        if npad != nb:
            x = torch.cat([x, x.new_zeros(npad - nb, 32)])
            if w is not None:
                w = torch.cat([w, w.new_zeros(npad - nb, 32)])
        out[a:b] = encode(x, w)[:nb]
    return out


def _nibbles(L: torch.Tensor) -> torch.Tensor:
    """Levels [n, 32] (uint8, low 4 bits used) -> qs [n, 16]: L[j] | L[j+16] << 4.

    Four levels at a time in int32 words: masking and shifting within each byte."""
    v = L.contiguous().view(torch.int32)  # [n, 8]: word i holds levels 4i..4i+3
    qs = (v[:, :4] & 0x0F0F0F0F) | ((v[:, 4:] & 0x0F0F0F0F) << 4)
    return qs.contiguous().view(torch.uint8)


def _fifth_bits(L: torch.Tensor) -> torch.Tensor:
    """Levels [n, 32] uint8 -> qh [n, 4]: bit j of the little-endian uint32 is bit 4 of L[j].

    Eight levels at a time in int64 words: bit 4 of each byte moved to bit 0, then one
    multiplication gathers the eight bits into the top byte (no carries: each byte is 0 or 1)."""
    v = L.contiguous().view(torch.int64)  # [n, 4]: word g holds levels 8g..8g+7
    bits = (v >> 4) & 0x0101010101010101
    return ((bits * 0x0102040810204080) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """qs [n, 16] -> levels [n, 32] uint8, four bytes at a time in int32 words."""
    v = qs.contiguous().view(torch.int32)  # [n, 4]
    return torch.cat([v & 0x0F0F0F0F, (v >> 4) & 0x0F0F0F0F], dim=1).view(torch.uint8)


def _unpack_fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """qh [n, 4] -> bit 4 of each level [n, 32] uint8 (0 or 16)."""
    n = qh.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device).view(1, 1, 8)
    return (((qh.reshape(n, 4, 1) >> shifts) & 1) << 4).reshape(n, 32)


def _first_zero_of(blocks: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """m [n] with each zero replaced by the block's first +0.0 or -0.0 (in place)."""
    zero = (m == 0).nonzero().squeeze(1)
    if zero.numel():
        sub = blocks[zero]
        first = (sub == 0).to(torch.uint8).argmax(dim=1, keepdim=True)
        m[zero] = sub.gather(1, first).squeeze(1)
    return m


def _min_max_ref(blocks: torch.Tensor, nmax: int) -> torch.Tensor:
    """quantize_row_q4_1_ref / q5_1_ref levels and (d, min): returns (L uint8 [n, 32], d, mn)."""
    # ggml's strict `v < min` / `v > max` scans keep the first of +0.0 and -0.0 (amin and
    # amax may return either), which sets the sign of a zero min and of d.
    mn = _first_zero_of(blocks, blocks.amin(dim=1))
    mx = _first_zero_of(blocks, blocks.amax(dim=1))
    d = (mx - mn) / nmax
    idv = torch.where(d != 0, exact_div(1.0, d), torch.zeros_like(d))
    x0 = (blocks - mn.unsqueeze(1)).mul_(idv.unsqueeze(1))
    L = x0.add_(0.5).trunc_().clamp_(max=float(nmax))  # MIN(nmax, (int8_t)(x0 + 0.5f))
    return L.to(torch.uint8), d, mn


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """ggml's `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` from amax = max = 0: the
    first element of largest magnitude of each block [n, 32], +0.0 for all-zero blocks.

    From the block max and min (two fast reductions); only blocks where +a and -a tie look
    up which comes first."""
    hi = blocks.amax(dim=1)
    lo = blocks.amin(dim=1)
    mx = torch.where(-lo > hi, lo, hi)
    tie = (-lo == hi) & (hi > 0)
    if bool(tie.any()):
        idx = tie.nonzero().squeeze(1)
        sub = blocks[idx]
        arg = sub.abs().max(dim=1).indices  # first maximal index
        mx[idx] = sub.gather(1, arg.unsqueeze(1)).squeeze(1)
    return torch.where(torch.maximum(hi, -lo) > 0, mx, torch.zeros_like(mx))


def _q5_0_ref(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_q5_0_ref: d = max / -16 with max the element of largest |x|; L uint8 [n, 32]."""
    d = _signed_absmax(blocks) / -16
    idv = torch.where(d != 0, exact_div(1.0, d), torch.zeros_like(d))
    x0 = blocks * idv.unsqueeze(1)
    L = x0.add_(16.5).trunc_().clamp_(max=31.0)  # MIN(31, (int8_t)(x0 + 16.5f))
    return L.to(torch.uint8), d


def _qkx3_search(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx3_quants(32, nmax, x, w, L, &the_min, Laux, -0.9f, 0.05f, 36, false) per block.

    Returns (scale [B], the_min [B], L uint8 [B, 32])."""
    X = _pos_major(x)
    W = _pos_major(w)
    sum_w = sum33(W.clone())
    sum_x = sum33(W * X)
    scale, the_min, levels = make_qkx_all(X, W, x.amin(1), x.amax(1), sum_w, sum_x, nmax, -0.9, 0.05, 36, True)
    return scale, the_min, ungap33(levels()).t().to(torch.uint8)


class _RowSigmaBlock32(GGMLType):
    """Q4_1, Q5_0, Q5_1: `_ref` encoders without an importance matrix; with one, the `_impl`
    search on weights qw[j] * sqrt(sigma2 + x[j]^2), sigma2 the mean square of the whole row."""

    block_size = 32
    uses_imatrix = True
    # Whether the search is make_qkx3_quants (runs through the compiled K-quant kernel).
    fused_search: ClassVar[bool] = False

    @classmethod
    def _encode_ref(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def _encode_search(cls, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def prepare(cls, imatrix=False):
        if not imatrix:
            ref32_kernel.compiled_encoder(cls.__name__, cls._eager_ref_chunks)
            return
        fused_row_weights()
        if cls.fused_search:
            fused_search_available()

    @classmethod
    def quantize_blocks(cls, blocks, weights=None):
        """Without weights: the `_ref` encoder. With weights [n, 32]: each block is a row of its own."""
        blocks = cpu32(blocks).reshape(-1, 32)
        if weights is None:
            return cls._ref_chunks(blocks)
        return cls._impl_rows(blocks, cpu32(weights).reshape(-1, 32))

    @classmethod
    def quantize_rows(cls, rows, imatrix=None):
        m, k = rows.shape
        if not cls.can_encode(k):
            raise ValueError(f"{cls.__name__}: row length {k} is not a multiple of {cls.block_size}")
        rows = cpu32(rows)
        if imatrix is None:
            return cls._ref_chunks(rows.reshape(-1, 32)).reshape(m, -1)
        return cls._impl_rows(rows, cpu32(imatrix).reshape(1, k).expand(m, k))

    @classmethod
    def _ref_chunks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """The `_ref` encoder on blocks [n, 32]: C++ where available and exact here."""
        return ref32_kernel.encode_blocks(cls.__name__, blocks, cls._eager_ref_chunks)

    @classmethod
    def _eager_ref_chunks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        out = torch.empty((n, cls.type_size), dtype=torch.uint8)
        for a, b in chunk_ranges(n, max(1, DEFAULT_CHUNK_WEIGHTS // 4 // 32)):
            out[a:b] = cls._encode_ref(blocks[a:b])
        return out

    @classmethod
    def _impl_rows(cls, rows: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
        """quantize_row_<type>_impl on each row of rows [m, k] with importance qw [m, k]."""
        m, k = rows.shape
        out = torch.empty((m, cls.row_bytes(k)), dtype=torch.uint8)
        for a, b in chunk_ranges(m, max(1, DEFAULT_CHUNK_WEIGHTS // 4 // k)):
            x = rows[a:b]
            w = row_importance_weights(x, qw[a:b])
            enc = _encode_block_chunks(x.reshape(-1, 32), w.reshape(-1, 32), cls._encode_search, cls.type_size)
            out[a:b] = enc.view(b - a, -1)
        return out


class Q4_1(_RowSigmaBlock32):
    """20 bytes per 32 weights: fp16 d, fp16 m, 32 4-bit levels (x = d * q + m)."""

    qtype = GGMLQuantizationType.Q4_1
    type_size = 20
    fused_search = True

    @classmethod
    def _encode_ref(cls, blocks):
        L, d, mn = _min_max_ref(blocks, 15)
        return torch.cat([fp16_bytes(d), fp16_bytes(mn), _nibbles(L)], dim=1)

    @classmethod
    def _encode_search(cls, x, w):
        scale, the_min, L = _qkx3_search(x, w, 15)
        return torch.cat([fp16_bytes(scale), fp16_bytes(-the_min), _nibbles(L)], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = fp16_from_bytes(blocks[:, 0:2])
        m = fp16_from_bytes(blocks[:, 2:4])
        return _unpack_nibbles(blocks[:, 4:20]).to(_F32).mul_(d).add_(m)


class Q5_0(_RowSigmaBlock32):
    """22 bytes per 32 weights: fp16 d, 32 fifth bits, 32 low nibbles (x = d * (q - 16))."""

    qtype = GGMLQuantizationType.Q5_0
    type_size = 22

    @classmethod
    def _encode_ref(cls, blocks):
        L, d = _q5_0_ref(blocks)
        return torch.cat([fp16_bytes(d), _fifth_bits(L), _nibbles(L)], dim=1)

    @classmethod
    def prepare(cls, imatrix=False):
        if imatrix:
            fused_qx_rows()
        else:
            super().prepare(imatrix)

    @classmethod
    def _impl_rows(cls, rows, qw):
        return qx_impl_rows(rows, qw, 16, lambda d, L: torch.cat([fp16_bytes(d), _fifth_bits(L), _nibbles(L)], dim=1),
                            cls.type_size)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = fp16_from_bytes(blocks[:, 0:2])
        q = _unpack_nibbles(blocks[:, 6:22]) | _unpack_fifth_bits(blocks[:, 2:6])
        return q.to(_F32).sub_(16.0).mul_(d)


class Q5_1(_RowSigmaBlock32):
    """24 bytes per 32 weights: fp16 d, fp16 m, 32 fifth bits, 32 low nibbles (x = d * q + m)."""

    qtype = GGMLQuantizationType.Q5_1
    type_size = 24
    fused_search = True

    @classmethod
    def _encode_ref(cls, blocks):
        L, d, mn = _min_max_ref(blocks, 31)
        return torch.cat([fp16_bytes(d), fp16_bytes(mn), _fifth_bits(L), _nibbles(L)], dim=1)

    @classmethod
    def _encode_search(cls, x, w):
        scale, the_min, L = _qkx3_search(x, w, 31)
        return torch.cat([fp16_bytes(scale), fp16_bytes(-the_min), _fifth_bits(L), _nibbles(L)], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = fp16_from_bytes(blocks[:, 0:2])
        m = fp16_from_bytes(blocks[:, 2:4])
        q = _unpack_nibbles(blocks[:, 8:24]) | _unpack_fifth_bits(blocks[:, 4:8])
        return q.to(_F32).mul_(d).add_(m)


# --------------------------------------------------------------------------------------------
# IQ4_NL
# --------------------------------------------------------------------------------------------


def _encode_iq4_nl(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """quantize_row_iq4_nl_impl(32, 32, ..., ntry=7) per block: x, qw [B, 32] -> uint8 [B, 18]."""
    X = _pos_major(x)
    if qw is None:
        W = X * X  # ggml's weight without an importance matrix
    else:
        # sigma2 = 2*sum(x^2)/32 over the block, then w = qw*sqrt(sigma2 + x^2).
        sigma2 = sum33(X * X) * 0.0625
        W = _pos_major(qw) * exact_sqrt((X * X).add_(sigma2))
    scale, _ = iq4_block_scales(X, W)
    idv = torch.where(scale != 0, exact_div(1.0, scale), torch.zeros_like(scale))
    L = iq4_index(x * idv.unsqueeze(1)).to(torch.uint8)
    return torch.cat([fp16_bytes(scale), _nibbles(L)], dim=1)


class IQ4_NL(GGMLType):
    """18 bytes per 32 weights: fp16 d, 32 4-bit indices into kvalues_iq4nl (x = d * kvalues[q])."""

    qtype = GGMLQuantizationType.IQ4_NL
    block_size = 32
    type_size = 18
    uses_imatrix = True

    @classmethod
    def prepare(cls, imatrix=False):
        iq4.compiled_search_available()

    @classmethod
    def quantize_blocks(cls, blocks, weights=None):
        blocks = cpu32(blocks).reshape(-1, 32)
        weights = None if weights is None else cpu32(weights).reshape(-1, 32)
        return _encode_block_chunks(blocks, weights, _encode_iq4_nl, cls.type_size)

    @classmethod
    def quantize_rows(cls, rows, imatrix=None):
        m, k = rows.shape
        if not cls.can_encode(k):
            raise ValueError(f"{cls.__name__}: row length {k} is not a multiple of {cls.block_size}")
        rows = cpu32(rows)
        out = torch.empty((m, cls.row_bytes(k)), dtype=torch.uint8)
        qw_row = None if imatrix is None else cpu32(imatrix).reshape(1, k)
        for a, b in chunk_ranges(m, max(1, DEFAULT_CHUNK_WEIGHTS // 4 // k)):
            qw = None if qw_row is None else qw_row.expand(b - a, k).reshape(-1, 32)
            out[a:b] = cls.quantize_blocks(rows[a:b], qw).view(b - a, -1)
        return out

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = fp16_from_bytes(blocks[:, 0:2])
        values = torch.tensor(KVALUES_IQ4NL, dtype=_F32, device=blocks.device)
        return values[_unpack_nibbles(blocks[:, 2:18]).to(torch.int64)].mul_(d)
