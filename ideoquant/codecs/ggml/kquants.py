"""ggml's K-quants: Q4_K, Q5_K and Q6_K super-blocks of 256 weights.

Encoders byte-identical to ggml's `quantize_row_<type>_ref` (no importance matrix) and
`_impl` (with one); decoders bit-equal to gguf-py's. The float32 rules that make them exact
and the position-major layout they work in are described in `scale_search`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType

from . import fused_kernel
from .base import GGMLType, fp16_bytes, fp16_from_bytes
from .scale_search import (
    GROUP_MAX_EPS,
    INNER_CHUNK_WEIGHTS,
    NEAREST_INT_LIMIT,
    QK_K,
    VEC_COLS,
    chunk_ranges,
    col_align,
    cpu32,
    exact_div,
    exact_sqrt,
    fp16_round,
    fused_search_available,
    gapped33,
    _adversarial_blocks,
    _QkxResult,
    make_qkx,
    make_qkx_all,
    make_qkx_numerators,
    matching_kernel,
    short_block_probe,
    make_qp,
    make_qx,
    nearest_int_bits,
    qkx_levels,
    round_up,
    sum33,
    sum_rows,
    ungap33,
)

_F32 = torch.float32

# --------------------------------------------------------------------------------------------
# Q4_K / Q5_K shared pieces: 6-bit scale packing and position-major super-block layout.
# --------------------------------------------------------------------------------------------


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """ggml's 12-byte packing of 8 (scale, min) pairs; ls, lm: int32 [8, nsb] (uint8 values).

    Returns int32 [12, nsb] byte values."""
    q = torch.zeros((12,) + tuple(ls.shape[1:]), dtype=torch.int32)
    q[0:4] = ls[0:4]
    q[4:8] = lm[0:4]
    q[8:12] = (ls[4:8] & 0xF) | ((lm[4:8] & 0xF) << 4)
    q[0:4] |= (ls[4:8] >> 4) << 6
    q[4:8] |= (lm[4:8] >> 4) << 6
    return q & 0xFF


def _unpack_scales_k4(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7; q: int [12, n] -> (sc, m) int [8, n]."""
    sc = torch.cat([q[0:4] & 63, (q[8:12] & 0xF) | ((q[0:4] >> 6) << 4)], dim=0)
    m = torch.cat([q[4:8] & 63, (q[8:12] >> 4) | ((q[4:8] >> 6) << 4)], dim=0)
    return sc, m


@functools.cache
def fused_pos_major() -> Callable | None:
    """The C++ copy of `_superblocks_pos_major`, once it gives the array code's tensors here."""
    lib = fused_kernel.search_library()
    if lib is None:
        return None
    run = functools.partial(fused_kernel.pos_major_cpp, lib.pos_major)
    x = torch.randn(37, QK_K, generator=torch.Generator().manual_seed(23))
    probes = [[x, sub, rows] for sub, rows in ((32, 34), (32, 33), (16, 16))]
    return matching_kernel("super-block layout", run, run, _superblocks_pos_major_eager, probes)


class _LayoutCache:
    """The position-major layout of the last importance-weight chunk, kept with the chunk
    itself: consecutive chunks of one tensor pass the very same weights tensor. A hit needs
    that object, unchanged (torch's version counter) and its layout unchanged."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.source: torch.Tensor | None = None
        self.layout: torch.Tensor | None = None

    def get(self, qw: torch.Tensor, sub: int, rows: int) -> torch.Tensor:
        key = (sub, rows, qw._version)
        layout = self.layout
        if self.source is qw and self.key == key + (None if layout is None else layout._version,):
            return layout
        layout = _superblocks_pos_major(qw, sub, rows)
        self.source, self.layout, self.key = qw, layout, key + (layout._version,)
        return layout


_IMPORTANCE_LAYOUT = _LayoutCache()


def importance_layout(qw: torch.Tensor, sub: int, rows: int) -> torch.Tensor:
    """`_superblocks_pos_major` of an importance-weight chunk, reused while the same chunk
    tensor comes back (see `_LayoutCache`). Callers must not write into the result."""
    return _IMPORTANCE_LAYOUT.get(qw, sub, rows)


def _superblocks_pos_major(x: torch.Tensor, sub: int, rows: int) -> torch.Tensor:
    """x [nsb, 256] -> [rows, 256//sub, nsb] position-major; for sub == 32 gapped (rows 33/34)."""
    run = fused_pos_major()
    return run(x, sub, rows) if run is not None else _superblocks_pos_major_eager(x, sub, rows)


def _superblocks_pos_major_eager(x: torch.Tensor, sub: int, rows: int) -> torch.Tensor:
    """`_superblocks_pos_major` in array code."""
    nsb = x.shape[0]
    # A plain 2-D transpose first, then whole rows move: several times faster than copying
    # the 3-D permuted view, whose innermost dimension jumps 256 floats at a time.
    t = x.t().contiguous().view(QK_K // sub, sub, nsb).permute(1, 0, 2)  # [sub, nsub, nsb]
    if sub == 16:
        return t.contiguous()
    return gapped33(t, rows)


def _imatrix_weights(X34: torch.Tensor, qw34: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weights of quantize_row_q4_K/q5_K_impl in array code: X34, qw34 [34, 8, nsb] gapped
    with a leading slot row -> (W [33, 8*nsb] = qw*sqrt(sigma2 + x^2), sum(W), sum(W*x)), with
    sigma2 = 2*sum_x2/QK_K over the whole super-block, all sums sequential."""
    nsb = X34.shape[2]
    B = 8 * nsb
    X = X34[1:].view(33, B)
    sq = X34 * X34  # [34, 8, nsb]
    s = torch.zeros(nsb, dtype=_F32)
    for j in range(8):
        sq[0, j] = s
        sum_rows(sq[0:17, j], sq[17, j])
        s = sum_rows(sq[17:34, j])
    sigma2 = (2 * s) / QK_K
    Xs = X * X
    Xs.add_(sigma2.repeat(8))
    W = torch.mul(qw34[1:].view(33, B), exact_sqrt(Xs), out=fused_kernel.padded_rows(33, (B,)))
    W[16] = 0.0
    return W, sum33(W.clone()), sum33(W * X)


@functools.cache
def fused_imatrix_weights() -> Callable | None:
    """`_imatrix_weights` through the C++ kernel (`fused_kernel.imatrix_weights_cpp`) once it
    has matched the array code bit for bit on probe super-blocks here; else None."""
    kernel = fused_kernel.compiled_imatrix_weights()
    if kernel is None:
        return None

    def run(X34, qw34):
        return fused_kernel.imatrix_weights_cpp(kernel, X34[1:], qw34[1:])

    def both(X34, qw34):
        return torch.cat([t.reshape(-1) for t in run(X34, qw34)])

    def eager(X34, qw34):
        return torch.cat([t.reshape(-1) for t in _imatrix_weights(X34, qw34)])

    probes = []
    for nsb in (37, 64):  # a partial vector of super-blocks, and whole ones
        x, w = short_block_probe(32, 8 * nsb, seed=nsb)
        x = x.T.reshape(nsb, QK_K)
        w = w.T.reshape(nsb, QK_K)
        probes.append([_superblocks_pos_major(x, 32, 34), _superblocks_pos_major(w, 32, 34)])
    return run if matching_kernel("K-quant importance weights", both, run, eager, probes) else None


def imatrix_weights(X34: torch.Tensor, qw34: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_imatrix_weights`, through the compiled kernel where it is available and exact here."""
    run = fused_imatrix_weights()
    return run(X34, qw34) if run is not None else _imatrix_weights(X34, qw34)


def _ref_weights(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weights of Q4_K/Q5_K's _ref encoders for X [33, B] gapped blocks: W = |x| +
    sqrt(sum(x^2)/32) per block, and sum(W), sum(W*x) in ggml's order. (`sum33` overwrites the
    scratch row of its argument, which holds no data.)"""
    av_x = exact_sqrt(sum33(X * X) / 32)
    W = torch.abs(X, out=fused_kernel.padded_rows(33, (X.shape[1],))).add_(av_x)
    return W, sum33(W), sum33(W * X)


def _fit_k32(X34: torch.Tensor, qw34: torch.Tensor | None, five_bit: bool):
    """Scale search of Q4_K/Q5_K in array code. X34: [34, 8, nsb] gapped with a leading slot row.

    Returns (scales [8, nsb], mins [8, nsb], levels (see make_qkx_all), sw [8, nsb] or None)."""
    nsb = X34.shape[2]
    B = 8 * nsb
    X = X34[1:].view(33, B)
    XT = X34[1:].view(33, 8, nsb)
    xmin = torch.minimum(XT[:16].amin(0), XT[17:].amin(0)).view(B)
    xmax = torch.maximum(XT[:16].amax(0), XT[17:].amax(0)).view(B)
    qkx3 = qw34 is not None
    nmax, rmin, rdelta, nstep = _k32_params(five_bit, qkx3)
    W, sum_w, sum_x = imatrix_weights(X34, qw34) if qkx3 else _ref_weights(X)
    scales, the_min, levels = make_qkx_all(X, W, xmin, xmax, sum_w, sum_x, nmax, rmin, rdelta, nstep, qkx3)
    return scales.view(8, nsb), the_min.view(8, nsb), levels, sum_w.view(8, nsb) if qkx3 else None


def _nearest_int_clamped(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """MAX(lo, MIN(hi, nearest_int(v))) as float, in place on v where that is exact."""
    lo_v, hi_v = torch.aminmax(v)
    if bool((hi_v <= NEAREST_INT_LIMIT) & (lo_v >= -NEAREST_INT_LIMIT)):  # also False for NaN
        return v.round_().clamp_(float(lo), float(hi))
    return nearest_int_bits(v).clamp_(lo, hi).to(_F32)


def _requant_k32(X: torch.Tensor, levels, d: torch.Tensor, dmin: torch.Tensor, sc, m, nmax: int):
    """Final levels of Q4_K/Q5_K from the stored fp16 d/dmin and 6-bit sc/m.

    Sub-blocks whose d*sc is 0 keep the levels of the scale search (ggml's `continue`)."""
    dj = (fp16_round(d).unsqueeze(0) * sc.to(_F32)).view(-1)  # [B]
    dmj = (fp16_round(dmin).unsqueeze(0) * m.to(_F32)).view(-1)
    v = X + dmj
    v.div_(dj)
    skip = dj == 0
    if bool(skip.any()):
        v.masked_fill_(skip.unsqueeze(0), 0.0)
        return torch.where(skip.unsqueeze(0), levels(), _nearest_int_clamped(v, 0, nmax))
    return _nearest_int_clamped(v, 0, nmax)


def _k32_params(five_bit: bool, qkx3: bool) -> tuple[int, float, float, int]:
    """nmax and make_qkx's (rmin, rdelta, nstep) of Q4_K/Q5_K: _ref, or _impl (qkx3)."""
    nmax = 31 if five_bit else 15
    if qkx3:
        return nmax, -0.9, 0.05, 36
    return (nmax, -0.5, 0.1, 15) if five_bit else (nmax, -1.0, 0.1, 20)


def _fit_k32_compiled(kernels, X34: torch.Tensor, qw34: torch.Tensor | None, five_bit: bool):
    """`_fit_k32` through the C++ fit (`fused_kernel.k32_fit_cpp`); the blocks it flags (NaN,
    or ranges where its fast rounding may differ from ggml) are redone by the exact path."""
    nsb = X34.shape[2]
    B = 8 * nsb
    X = X34[1:].view(33, B)
    qkx3 = qw34 is not None
    nmax, rmin, rdelta, nstep = _k32_params(five_bit, qkx3)
    cs = make_qkx_numerators(nmax, rmin, rdelta, nstep)
    W = sw = sum_x = None
    if qkx3:
        W, sw, sum_x = imatrix_weights(X34, qw34)
    fit = fused_kernel.k32_fit_cpp(kernels[0], X, W, sw, sum_x, cs, nmax, qkx3)
    scale, the_min, l_iscale, l_min = fit[0], fit[1], fit[2], fit[3]
    flagged = fit[4] != 0
    fix = None
    if bool(flagged.any()):
        idx = flagged.nonzero().flatten()
        Xs = X[:, idx].contiguous()
        data = ungap33(Xs)
        if qkx3:
            Ws, sws, sxs = W[:, idx].contiguous(), sw[idx], sum_x[idx]
        else:
            Ws, sws, sxs = _ref_weights(Xs)
        res2, _ = make_qkx(Xs, Ws, data.amin(0), data.amax(0), sws, sxs, nmax, rmin, rdelta, nstep, qkx3, exact=True)
        scale, the_min = scale.clone(), the_min.clone()
        scale[idx], the_min[idx] = res2.scale, res2.the_min
        fix = (idx, Xs, res2)
    res = _QkxResult(scale, the_min, l_iscale, l_min, None)

    def levels() -> torch.Tensor:
        L = qkx_levels(X, res, nmax, qkx3, exact=False)
        if fix is not None:
            L[:, fix[0]] = qkx_levels(fix[1], fix[2], nmax, qkx3, exact=True)
        return L

    return scale.view(8, nsb), the_min.view(8, nsb), levels, None if sw is None else sw.view(8, nsb)


def _scales_k32(scales, mins, sw, five_bit: bool):
    """The super-block scales of Q4_K/Q5_K: (d, dmin [nsb], ls, lm int32 [8, nsb])."""
    nsb = scales.shape[1]
    if sw is None:
        zero = torch.zeros(nsb, dtype=_F32)
        max_scale = scales.amax(0)
        max_scale = torch.where(max_scale > 0, max_scale, zero)
        max_min = mins.amax(0)
        max_min = torch.where(max_min > 0, max_min, zero)
        inv_scale = torch.where(max_scale > 0, exact_div(63.0, max_scale), zero)
        inv_min = torch.where(max_min > 0, exact_div(63.0, max_min), zero)
        ls = torch.clamp(nearest_int_bits(inv_scale * scales) & 0xFF, max=63)
        lm = torch.clamp(nearest_int_bits(inv_min * mins) & 0xFF, max=63)
        return max_scale / 63, max_min / 63, ls, lm
    # make_qp_quants on the scales and on the mins, both at once.
    dd, ll = make_qp(torch.cat([scales, mins], dim=1), torch.cat([sw, sw], dim=1), 63)
    ls, lm = ll[:, :nsb], ll[:, nsb:]
    if five_bit:
        ls = torch.clamp(ls, max=63)
        lm = torch.clamp(lm, max=63)
    return dd[:nsb], dd[nsb:], ls, lm


def _pack_k32(L: torch.Tensor, five_bit: bool) -> list[torch.Tensor]:
    """The quant bytes of Q4_K/Q5_K super-blocks from their levels L uint8 [nsb, 8, 32]:
    [qs] or [qh, qs], each [nsb, bytes]."""
    nsb = L.shape[0]
    if not five_bit:
        return [(L[:, 0::2] | (L[:, 1::2] << 4)).reshape(nsb, 128)]
    qs = (L[:, 0::2] & 0xF) | ((L[:, 1::2] & 0xF) << 4)
    hb = (L >> 4).to(torch.int32)
    qh = torch.zeros((nsb, 32), dtype=torch.int32)
    for j in range(8):
        qh |= hb[:, j] << j
    return [qh.to(torch.uint8), qs.reshape(nsb, 128)]


def _encode_k32(x: torch.Tensor, qw: torch.Tensor | None, five_bit: bool) -> torch.Tensor:
    """Q4_K (five_bit=False) or Q5_K super-blocks: x, qw [nsb, 256] -> uint8 [nsb, 144|176],
    the scale search and final levels through the C++ kernels where they are available and
    have matched the array code here (`fused_k32`)."""
    return _encode_k32_with(fused_k32(), x, qw, five_bit)


def _encode_k32_with(kernels, x: torch.Tensor, qw: torch.Tensor | None, five_bit: bool) -> torch.Tensor:
    """`_encode_k32` with the given C++ kernels (`fused_kernel.compiled_k32`), or None: array code."""
    nsb = x.shape[0]
    nmax = 31 if five_bit else 15
    X34 = _superblocks_pos_major(x, 32, 34)
    qw34 = None if qw is None else importance_layout(qw, 32, 34)
    if kernels is not None:
        scales, mins, levels, sw = _fit_k32_compiled(kernels, X34, qw34, five_bit)
    else:
        scales, mins, levels, sw = _fit_k32(X34, qw34, five_bit)
    d, dmin, ls, lm = _scales_k32(scales, mins, sw, five_bit)
    q = _pack_scales_k4(ls, lm)
    sc, m = _unpack_scales_k4(q)
    X = X34[1:].view(33, -1)
    if kernels is not None:
        dj = (fp16_round(d).unsqueeze(0) * sc.to(_F32)).view(-1)  # [B]
        dmj = (fp16_round(dmin).unsqueeze(0) * m.to(_F32)).view(-1)
        L = fused_kernel.k32_levels_cpp(kernels[1], X, dj, dmj, nmax)  # [nsb, 8, 32]
        skip = (dj == 0).nonzero().flatten()
        if skip.numel():  # ggml's `continue`: these sub-blocks keep the search's levels
            kept = ungap33(levels())[:, skip].to(torch.uint8)  # [32, n]
            L[skip % nsb, skip // nsb] = kept.T
    else:
        Lg = _requant_k32(X, levels, d, dmin, sc, m, nmax)
        L = ungap33(Lg).to(torch.uint8).view(32, 8, nsb).permute(2, 1, 0)
    head = [fp16_bytes(d), fp16_bytes(dmin), q.to(torch.uint8).permute(1, 0)]
    return torch.cat(head + _pack_k32(L, five_bit), dim=1)


@functools.cache
def fused_k32() -> tuple[Callable, Callable] | None:
    """The C++ fit and levels of Q4_K/Q5_K once Q4_K and Q5_K super-blocks encoded through
    them (without and with importance weights) match the array code byte for byte on probe
    blocks here; else None (with a one-line warning)."""
    kernels = fused_kernel.compiled_k32()
    if kernels is None:
        return None
    x, w = _adversarial_blocks(8 * 301, seed=5)  # a count that leaves partial vectors
    x, w = x.reshape(301, QK_K), w.reshape(301, QK_K)
    x[7, 13] = 3e38  # a range the fast rounding cannot vouch for: the exact path
    x[9] = 0.0  # an all-zero super-block
    x[11, 40:72] = 0.0  # a zero sub-block: its scale rounds to 0 (ggml's `continue`)
    cases = [(five, qw) for five in (False, True) for qw in (None, w)]

    def encode(with_kernels) -> torch.Tensor:
        return torch.cat([_encode_k32_with(with_kernels, x, qw, five).reshape(-1) for five, qw in cases]).to(torch.int32)

    return matching_kernel("Q4_K/Q5_K fit", lambda: encode(kernels), kernels, lambda: encode(None), [[]])


# --------------------------------------------------------------------------------------------
# Q6_K
# --------------------------------------------------------------------------------------------


def _encode_q6_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    nsb = x.shape[0]
    X3 = _superblocks_pos_major(x, 16, 16)  # [16, 16, nsb]
    X = X3.view(16, -1)
    if qw is None:
        W = X * X
    else:
        W = importance_layout(qw, 16, 16).view(16, -1)
    scales, L = make_qx(X, W, 32, gapped=False)
    scales = scales.view(16, nsb)
    amax, arg = scales.abs().max(dim=0)
    max_scale = scales.gather(0, arg.unsqueeze(0)).squeeze(0)
    zero_sb = amax < GROUP_MAX_EPS
    max_scale = torch.where(zero_sb, torch.ones_like(max_scale), max_scale)
    iscale = exact_div(-128.0, max_scale)
    d = exact_div(1.0, iscale)
    sc = torch.clamp(nearest_int_bits(iscale * scales), max=127)  # [16, nsb]
    dj = (fp16_round(d).unsqueeze(0) * sc.to(_F32)).view(-1)
    skip = dj == 0  # ggml: `if (!d) continue;` keeps make_qx_quants' levels
    v = X / dj
    if bool(skip.any()):
        v.masked_fill_(skip.unsqueeze(0), 0.0)
        L = torch.where(skip.unsqueeze(0), L, _nearest_int_clamped(v, -32, 31).add_(32.0))
    else:
        L = _nearest_int_clamped(v, -32, 31).add_(32.0)

    Lb = L.view(16, 16, nsb).permute(1, 0, 2).reshape(2, 4, 32, nsb).to(torch.uint8)  # [half, quarter, l, nsb]
    lo = Lb & 0xF
    ql = torch.cat([lo[:, 0] | (lo[:, 2] << 4), lo[:, 1] | (lo[:, 3] << 4)], dim=1)  # [2, 64, nsb]
    hi = Lb >> 4
    qh = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)  # [2, 32, nsb]
    out = torch.cat(
        [
            ql.reshape(128, nsb).permute(1, 0),
            qh.reshape(64, nsb).permute(1, 0),
            sc.to(torch.int8).view(torch.uint8).permute(1, 0),
            fp16_bytes(d),
        ],
        dim=1,
    )
    if bool(zero_sb.any()):  # ggml memsets an all-zero super-block
        out.masked_fill_(zero_sb.unsqueeze(1), 0)
    return out


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------


class _KQuant(GGMLType):
    """Super-block types of QK_K = 256 weights."""

    block_size = QK_K
    uses_imatrix = True

    @classmethod
    def _encode(cls, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    # Weights per inner chunk and thread (see INNER_CHUNK_WEIGHTS).
    inner_chunk_weights: int = INNER_CHUNK_WEIGHTS
    # Whether the scale search is make_qkx (its compiled kernel is built in `prepare`).
    fused_search: bool = False

    @classmethod
    def prepare(cls, imatrix=False):
        if cls.fused_search:
            fused_search_available()
            fused_k32()

    @classmethod
    def quantize_blocks(cls, blocks, weights=None):
        blocks = cpu32(blocks).reshape(-1, QK_K)
        if weights is None:
            return cls._encode_chunks(blocks, None)
        weights = cpu32(weights).reshape(-1, QK_K)
        return cls._encode_chunks(blocks, lambda a, b: weights[a:b])

    @classmethod
    def quantize_rows(cls, rows, imatrix=None):
        m, k = rows.shape
        if not cls.can_encode(k):
            raise ValueError(f"{cls.__name__}: row length {k} is not a multiple of {cls.block_size}")
        blocks = cpu32(rows).reshape(-1, QK_K)
        if imatrix is None:
            return cls._encode_chunks(blocks, None).reshape(m, -1)
        # Super-block i of the chunk uses imatrix[(i % per_row)*256 : ...+256]. Chunks of whole
        # rows all get the same weights: one tensor, made once, whose position-major layout the
        # encoders then reuse too (`importance_layout`).
        per_row = k // QK_K
        qw_rows = cpu32(imatrix).reshape(per_row, QK_K)
        last: dict[tuple[int, int], torch.Tensor] = {}

        def weights(a: int, b: int) -> torch.Tensor:
            key = (a % per_row, b - a)
            if key not in last:
                last.clear()
                last[key] = qw_rows[torch.arange(a, b) % per_row]
            return last[key]

        return cls._encode_chunks(blocks, weights, per_row).reshape(m, -1)

    @classmethod
    def _encode_chunks(cls, blocks: torch.Tensor, weights, row_superblocks: int = 1) -> torch.Tensor:
        """Encode [n, 256] super-blocks in inner chunks; weights(a, b) gives their importance.
        Chunks hold a multiple of `row_superblocks` super-blocks (whole rows) where that is
        at most twice the usual chunk."""
        n = blocks.shape[0]
        out = torch.empty((n, cls.type_size), dtype=torch.uint8)
        threads = max(1, torch.get_num_threads())
        big = col_align()
        step = max(big, cls.inner_chunk_weights * threads // QK_K // big * big)
        whole_rows = round_up(step, math.lcm(big, row_superblocks))
        if whole_rows <= 2 * step:
            step = whole_rows
        for a, b in chunk_ranges(n, step):
            nb = b - a
            # Pad to whole vector groups of columns so that the sums stay on torch's fast path.
            npad = round_up(nb, VEC_COLS if nb < big else big)
            x = blocks[a:b]
            qw = None if weights is None else weights(a, b)
            if npad != nb:
                x = torch.cat([x, x.new_zeros(npad - nb, QK_K)])
                if qw is not None:
                    qw = torch.cat([qw, qw.new_zeros(npad - nb, QK_K)])
            out[a:b] = cls._encode(x.contiguous(), None if qw is None else qw.contiguous())[:nb]
        return out


def _k4_scales_and_mins(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d*sc and dmin*m of each sub-block of Q4_K/Q5_K blocks [n, type_size]: float32 [n, 8, 1]."""
    d = fp16_from_bytes(blocks[:, 0:2])
    dmin = fp16_from_bytes(blocks[:, 2:4])
    sc, m = _unpack_scales_k4(blocks[:, 4:16].to(torch.int32).permute(1, 0))
    return (d * sc.permute(1, 0).to(_F32)).unsqueeze(-1), (dmin * m.permute(1, 0).to(_F32)).unsqueeze(-1)


class Q4_K(_KQuant):
    """144 bytes per 256 weights: fp16 d, dmin; 8 6-bit (scale, min); 256 4-bit levels."""

    qtype = GGMLQuantizationType.Q4_K
    type_size = 144
    fused_search = True

    @classmethod
    def _encode(cls, x, qw):
        return _encode_k32(x, qw, five_bit=False)

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        dl, ml = _k4_scales_and_mins(blocks)
        # Four levels at a time in int32 words; in place, so no new pages per step.
        v = blocks[:, 16:].contiguous().view(torch.int32).reshape(n, 4, 1, 8)
        q = torch.cat([v & 0x0F0F0F0F, (v >> 4) & 0x0F0F0F0F], dim=2).view(torch.uint8).reshape(n, 8, 32).to(_F32)
        return q.mul_(dl).sub_(ml).reshape(n, QK_K)


class Q5_K(_KQuant):
    """176 bytes per 256 weights: as Q4_K plus a fifth bit per weight in qh."""

    qtype = GGMLQuantizationType.Q5_K
    type_size = 176
    fused_search = True

    @classmethod
    def _encode(cls, x, qw):
        return _encode_k32(x, qw, five_bit=True)

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        dl, ml = _k4_scales_and_mins(blocks)
        qh = blocks[:, 16:48].reshape(n, 1, 32)
        qs = blocks[:, 48:].reshape(n, 4, 1, 32)
        lo = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, 8, 32)
        shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).view(1, 8, 1)
        hi = (qh >> shifts) & 1
        q = (lo | (hi << 4)).to(_F32)
        return q.mul_(dl).sub_(ml).reshape(n, QK_K)


class Q6_K(_KQuant):
    """210 bytes per 256 weights: 6-bit levels (ql, qh), 16 int8 scales, fp16 d."""

    qtype = GGMLQuantizationType.Q6_K
    type_size = 210

    @classmethod
    def _encode(cls, x, qw):
        return _encode_q6_k(x, qw)

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        ql = blocks[:, 0:128].reshape(n, 2, 1, 64)
        qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
        sc = blocks[:, 192:208].contiguous().view(torch.int8).to(_F32)
        d = fp16_from_bytes(blocks[:, 208:210])
        dl = (d * sc).reshape(n, 16, 1)
        lo = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(n, 2, 4, 32)
        shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
        hi = (qh >> shifts) & 3  # [n, 2, 4, 32]
        q = (lo | (hi << 4)).reshape(n, 16, 16).to(_F32).sub_(32.0)
        return q.mul_(dl).reshape(n, QK_K)

