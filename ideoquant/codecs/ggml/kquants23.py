"""ggml's 2- and 3-bit K-quants: Q2_K and Q3_K super-blocks of 256 weights in 16 sub-blocks of 16.

Encoders byte-identical to ggml's `quantize_row_q2_K_ref` / `quantize_row_q3_K_ref` (no
importance matrix) and `quantize_row_q2_K_impl` / `quantize_row_q3_K_impl` (with one);
decoders bit-equal to gguf-py's. Blocks are processed position-major as in `scale_search`:
[16 positions, 16*nsb columns], column = (sub-block, super-block), so that every sequential
sum over a sub-block is a chain of 16 row additions across all sub-blocks at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import fused_kernel
from .base import fp16_from_bytes, store_fp16
from .kquants import _KQuant, _superblocks_pos_major
from .scale_search import (
    GROUP_MAX_EPS,
    QK_K,
    exact_div,
    exact_sqrt,
    fp16_round,
    make_qkx_numerators,
    make_qp,
    make_qx,
    matching_kernel,
    nearest_int_bits,
    short_block_probe,
    sum_rows,
)

_F32 = torch.float32
_SUB = 16  # weights per sub-block
_NSUB = QK_K // _SUB


def _nearest_clamped(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """MAX(lo, MIN(hi, nearest_int(v))) as float32, bit-exact for any float32 v."""
    return nearest_int_bits(v).clamp_(lo, hi).to(_F32)


def superblock_sum_sq(x: torch.Tensor) -> torch.Tensor:
    """sum of x[j]*x[j] over the 256 weights of each super-block, in ggml's order: [nsb]."""
    nsb = x.shape[0]
    sq = x.t().contiguous()
    sq.mul_(sq)
    buf = torch.empty((17, nsb), dtype=_F32)
    s = torch.zeros(nsb, dtype=_F32)
    for c in range(QK_K // 16):
        buf[0] = s
        buf[1:] = sq[16 * c : 16 * c + 16]
        s = sum_rows(buf)
    return s


def importance_weights(X: torch.Tensor, QW: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """ggml's `qw[l] * sqrtf(sigma2 + x[l]*x[l])`: X, QW [rows, nsub, nsb], sigma2 [nsb]."""
    t = X * X
    t.add_(sigma2)
    return QW * exact_sqrt(t)


def _weights_and_sums(X3: torch.Tensor, QW: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    """Array code of `weights_and_sums`: W [16, 16*nsb] and sum(W) per sub-block, concatenated."""
    sigma2 = (factor * superblock_sum_sq(x)) / QK_K  # factor 1: exactly sum / 256
    W = importance_weights(X3, QW, sigma2).view(_SUB, -1)
    return torch.cat([W.reshape(-1), sum_rows(W)])


@functools.cache
def fused_k16_weights() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """The C++ importance weights of Q2_K/Q3_K (`fused_kernel.k16_weights_cpp`), once they have
    matched the array code bit for bit on probe super-blocks here; else None."""
    kernel = fused_kernel.compiled_k16_weights()
    if kernel is None:
        return None

    def run(X3, QW, x, factor):
        return fused_kernel.k16_weights_cpp(kernel, X3, QW, factor)

    def both(X3, QW, x, factor):
        return torch.cat([t.reshape(-1) for t in run(X3, QW, x, factor)])

    probes = []
    for nsb, factor in ((37, 2.0), (64, 1.0)):  # a partial vector of super-blocks, and whole ones
        x, w = short_block_probe(_SUB, _NSUB * nsb, seed=nsb)
        x, w = x.T.reshape(nsb, QK_K), w.T.reshape(nsb, QK_K)
        probes.append([_superblocks_pos_major(x, _SUB, _SUB), _superblocks_pos_major(w, _SUB, _SUB), x, factor])
    return run if matching_kernel("Q2_K/Q3_K importance weights", both, run, _weights_and_sums, probes) else None


def weights_and_sums(X3: torch.Tensor, QW: torch.Tensor, x: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's importance weights of Q2_K (factor 1) and Q3_K (factor 2): sigma2 =
    factor*sum(x^2)/256 per super-block, W = qw*sqrtf(sigma2 + x^2) [16, 16*nsb] for X3, QW
    [16, 16, nsb] position-major (x: the same super-blocks [nsb, 256]), and sum(W) per sub-block."""
    run = fused_k16_weights()
    if run is not None:
        return run(X3, QW, x, factor)
    both = _weights_and_sums(X3, QW, x, factor)
    n = X3.numel()
    return both[:n].view(_SUB, -1), both[n:]


# --------------------------------------------------------------------------------------------
# make_qkx2_quants / make_qkx3_quants on 16-element sub-blocks (Q2_K: nmax = 3).
# --------------------------------------------------------------------------------------------


@functools.cache
def fused_qkx16() -> Callable[..., None] | None:
    """The C++ make_qkx on 16-element blocks, once it has matched the array code bit for bit
    on probe blocks here for Q2_K's two searches; else None (with a one-line warning)."""
    kernel = fused_kernel.compiled_qkx16()
    if kernel is None:
        return None
    x, w = short_block_probe(_SUB, 4101, seed=13)
    x[:, 1::4] = -x[:, 1::4]  # negative and mixed-sign blocks too
    searches = ((3, -0.5, 0.1, 15, False, True), (3, -0.9, 0.05, 36, True, False))

    def run(fused):
        outs = []
        for nmax, rmin, rdelta, nstep, qkx3, mad in searches:
            for W in (None, w):
                scale, the_min, L = make_qkx16(x, W, nmax, rmin, rdelta, nstep, qkx3, mad, fused=fused)
                # + 0.0: the sign of a zero min is torch.amin's choice in the array code (the
                # kernel keeps ggml's first zero); it never reaches the stored bytes.
                outs += [scale, the_min + 0.0, L]
        return torch.cat([t.reshape(-1) for t in outs])

    return matching_kernel("make_qkx on 16-weight blocks", lambda: run(kernel), kernel, lambda: run(False), [[]])


def make_qkx16(
    X: torch.Tensor, W: torch.Tensor | None, nmax: int, rmin: float, rdelta: float, nstep: int, qkx3: bool,
    use_mad: bool, fused: bool | Callable[..., None] = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants (qkx3=False) or make_qkx3_quants with weights, n = 16.

    X, W: [16, B] position-major sub-blocks and their weights (None: |x|). Returns (scale [B],
    the_min [B] = -min, L [16, B] float levels). The candidates depend on each other through
    the running min, so they run one after the other, each vectorized over all sub-blocks;
    the whole search runs through the C++ kernel (`fused_kernel.qkx16_fit_cpp`) where it is
    available and has matched this code here (`fused_qkx16`); `fused`: True, False (never), or
    the kernel itself."""
    kernel = fused if callable(fused) else (fused_qkx16() if fused else None)
    if kernel is not None:
        out = fused_kernel.qkx16_fit_cpp(kernel, X, W, make_qkx_numerators(nmax, rmin, rdelta, nstep), nmax, qkx3, use_mad)
        return out[0], out[1], out[2:]
    if W is None:
        W = X.abs()
    fnmax = float(nmax)
    xmin = X.amin(0)
    xmax = X.amax(0)
    sum_w = sum_rows(W)
    sum_x = sum_rows(W * X)
    mn0 = torch.where(xmin > 0, torch.zeros_like(xmin), xmin)
    early = (xmax <= mn0) if qkx3 else (xmax == mn0)

    def levels(isc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        v = X - m
        v.mul_(isc)
        return _nearest_clamped(v, 0, nmax)

    def error(s: torch.Tensor, m: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        d = L * s
        d.add_(m)
        d.sub_(X)
        if use_mad:
            d.abs_()
        else:
            d.mul_(d)
        d.mul_(W)
        return sum_rows(d)

    iscale = exact_div(fnmax, xmax - mn0)
    scale = exact_div(1.0, iscale)
    mn = mn0.clone()
    L = levels(iscale, mn)
    best = error(scale, mn, L)
    rmin32, rdelta32, nmax32 = np.float32(rmin), np.float32(rdelta), np.float32(nmax)
    for i in range(nstep + 1):
        c = torch.tensor(float((rmin32 + rdelta32 * np.float32(i)) + nmax32), dtype=_F32)
        isc = torch.div(c, xmax - mn)
        La = levels(isc, mn)
        wl = W * La
        sum_l = sum_rows(wl)
        sum_xl = sum_rows(wl * X)
        sum_l2 = sum_rows(wl.mul_(La))
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        if bool(pos.any()):
            this_min = this_min.masked_fill(pos, 0.0)
            this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, La)
        acc = (D > 0) & (cur < best)
        L = torch.where(acc, La, L)
        best = torch.where(acc, cur, best)
        scale = torch.where(acc, this_scale, scale)
        mn = torch.where(acc, this_min, mn)
    zero = torch.zeros_like(scale)
    scale = torch.where(early, zero, scale)
    the_min = torch.where(early, -mn0, -mn)
    L = L.masked_fill(early.unsqueeze(0), 0.0)
    return scale, the_min, L


# --------------------------------------------------------------------------------------------
# make_q3_quants (do_rmse = true): Q3_K's symmetric search with coordinate refinement.
# --------------------------------------------------------------------------------------------


def _q3_consts(nmax: int) -> torch.Tensor:
    """The constants of `fused_kernel.q3_search_cpp` for this nmax."""
    return torch.tensor([-nmax, nmax - 1, 1.0, GROUP_MAX_EPS, 0.0], dtype=_F32)


@functools.cache
def fused_q3_step() -> Callable[..., torch.Tensor] | None:
    """The C++ make_q3_quants for 16-element sub-blocks (`fused_kernel.q3_search_cpp`), once it
    has matched the array code bit for bit on probe blocks here; else None."""
    kernel = fused_kernel.compiled_q3()
    if kernel is None:
        return None
    step = functools.partial(fused_kernel.q3_search_cpp, kernel)

    def eager(x, consts):
        scale, L = make_q3(x, int(-consts[0]), fused=False)
        return torch.cat([scale.unsqueeze(0), L])

    x, _ = short_block_probe(_SUB, 4101, seed=11)  # a count that leaves a partial vector
    x[:, 1::4] = -x[:, 1::4]  # negative and mixed-sign blocks too
    # Uniform blocks: about one in 1500 still changes in the fifth refinement pass.
    uniform = torch.rand((_SUB, 24000), generator=torch.Generator().manual_seed(11)) * 2 - 1
    return matching_kernel("q3_quants", step, step, eager, [[x, _q3_consts(4)], [uniform, _q3_consts(4)]])


def make_q3(X: torch.Tensor, nmax: int, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants(16, nmax, x, L, do_rmse=true) on X [16, B].

    Returns (scale [B], L [16, B] float levels + nmax; 0 for all-zero sub-blocks). Runs
    through the C++ kernel (`fused_kernel.q3_search_cpp`) where it is available and exact."""
    step = fused_q3_step() if fused else None
    if step is not None:
        out = step(X, _q3_consts(nmax))
        return out[0], out[1:]
    n, B = X.shape
    amax, arg = X.abs().max(dim=0)  # first maximal |x| (ggml: `if (ax > amax)`)
    mx = X.gather(0, arg.unsqueeze(0)).squeeze(0)
    zero_blk = amax < GROUP_MAX_EPS
    mx = torch.where(zero_blk, torch.ones_like(mx), mx)
    iscale = exact_div(-float(nmax), mx)
    Lf = _nearest_clamped(iscale * X, -nmax, nmax - 1)
    w = X * X
    wx = w * X
    sumlx = sum_rows(wx * Lf)
    suml2 = sum_rows(w * Lf * Lf)
    # Coordinate refinement: each element in turn, the sums updated as it goes. A pass runs
    # only on the sub-blocks the previous pass changed (ggml stops a block after a pass
    # without a change): gathered, refined, scattered back.
    idx = (~zero_blk).nonzero().squeeze(1)
    for _ in range(5):
        if idx.numel() == 0:
            break
        Xs, ws, wxs, Ls = X[:, idx], w[:, idx], wx[:, idx], Lf[:, idx]
        slx_s, sl2_s = sumlx[idx], suml2[idx]
        changed = torch.zeros(idx.numel(), dtype=torch.bool)
        for i in range(n):
            Li, wi, wxi = Ls[i], ws[i], wxs[i]
            slx = slx_s - wxi * Li
            ok = slx > 0
            sl2 = sl2_s - wi * Li * Li
            new_l = _nearest_clamped(Xs[i] * sl2 / slx, -nmax, nmax - 1)
            ok &= new_l != Li
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            ok &= (sl2 > 0) & (slx * slx * sl2_s > slx_s * slx_s * sl2)
            if bool(ok.any()):
                Ls[i] = torch.where(ok, new_l, Li)
                slx_s = torch.where(ok, slx, slx_s)
                sl2_s = torch.where(ok, sl2, sl2_s)
                changed |= ok
        Lf[:, idx] = Ls
        sumlx = sumlx.index_copy(0, idx, slx_s)
        suml2 = suml2.index_copy(0, idx, sl2_s)
        idx = idx[changed]
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale.masked_fill_(zero_blk, 0.0)
    L = Lf.add_(float(nmax)).masked_fill_(zero_blk.unsqueeze(0), 0.0)
    return scale, L


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def _superblock_levels(L: torch.Tensor, nsb: int) -> torch.Tensor:
    """[16 pos, 16*nsb] position-major levels -> uint8 [256, nsb] in weight order."""
    return L.view(_SUB, _NSUB, nsb).permute(1, 0, 2).reshape(QK_K, nsb).to(torch.uint8)


def _pack_2bit(L256: torch.Tensor) -> torch.Tensor:
    """qs of Q2_K/Q3_K: byte 32*h + l holds weights 128*h + 32*s + l (s = 0..3) at bits 2s."""
    nsb = L256.shape[1]
    q = L256.view(2, 4, 32, nsb)
    qs = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)  # [2, 32, nsb]
    return qs.reshape(64, nsb).permute(1, 0)


def _requantize(X: torch.Tensor, keep: torch.Tensor, dj: torch.Tensor, offset: torch.Tensor | float, lo: int, hi: int):
    """nearest_int((x + offset)/dj) clamped, where dj != 0; elsewhere the search's levels `keep`."""
    v = X + offset if not isinstance(offset, float) else X.clone()
    v.div_(dj)
    skip = dj == 0
    if bool(skip.any()):
        v.masked_fill_(skip.unsqueeze(0), 0.0)
        return torch.where(skip.unsqueeze(0), keep, _nearest_clamped(v, lo, hi))
    return _nearest_clamped(v, lo, hi)


def _final_levels_packed_eager(q3: bool, X: torch.Tensor, keep: torch.Tensor, dj: torch.Tensor,
                               dmj: torch.Tensor | None, out: torch.Tensor, qs_at: int) -> None:
    """`fused_kernel.k16_pack_cpp` in torch: the levels from the fixed scales (the search's
    `keep` where a scale is 0), then qs (and Q3_K's hmask) written into out."""
    nsb = out.shape[0]
    if q3:
        L = _requantize(X, keep - 4.0, dj, 0.0, -4, 3).add_(4.0)
    else:
        L = _requantize(X, keep, dj, dmj, 0, 3)
    L256 = _superblock_levels(L, nsb)  # Q3_K's levels 0..7: bit 2 goes to hmask, bits 0-1 to qs
    if q3:
        hbits = (L256 >> 2).view(8, 32, nsb)  # [bit, byte, nsb]
        L256 &= 3
        hmask = torch.zeros((32, nsb), dtype=torch.uint8)
        for b in range(8):
            hmask |= hbits[b] << b
        out[:, 0:32] = hmask.permute(1, 0)
    out[:, qs_at : qs_at + 64] = _pack_2bit(L256)


@functools.cache
def fused_k16_pack() -> Callable[..., None] | None:
    """The C++ final levels and packing of Q2_K/Q3_K (`fused_kernel.k16_pack_cpp`), once they
    have written the array code's bytes here on probe super-blocks (scales of zero, either
    sign, and tiny enough to saturate the levels included); else None."""
    kernel = fused_kernel.compiled_k16_pack()
    if kernel is None:
        return None
    run = functools.partial(fused_kernel.k16_pack_cpp, kernel)
    gen = torch.Generator().manual_seed(29)
    nsb = 37
    X = torch.randn(_SUB, _NSUB * nsb, generator=gen)
    dj = torch.randn(_NSUB * nsb, generator=gen) * 0.5
    dj[::7] = 0.0
    dj[3::11] = 1e-30
    dmj = torch.rand(_NSUB * nsb, generator=gen)
    probes = []
    for q3, keep, at, size in ((False, torch.randint(0, 4, X.shape, generator=gen), 16, 84),
                               (True, torch.randint(0, 8, X.shape, generator=gen), 32, 110)):
        probes.append((q3, X, keep.to(_F32), dj, None if q3 else dmj, size, at))

    def packed(fn, q3, X, keep, dj, dmj, size, at):
        out = torch.zeros((nsb, size), dtype=torch.uint8)
        fn(q3, X, keep, dj, dmj, out, at)
        return out.to(_F32)  # (bytes as exact floats: matching_kernel compares 32-bit patterns)

    return matching_kernel("Q2_K/Q3_K level packing", lambda *p: packed(run, *p), kernel,
                           lambda *p: packed(_final_levels_packed_eager, *p), probes)


def _final_levels_packed(q3: bool, X: torch.Tensor, keep: torch.Tensor, dj: torch.Tensor,
                         dmj: torch.Tensor | None, out: torch.Tensor, qs_at: int) -> None:
    """Q2_K's or Q3_K's final levels packed into out (see `_final_levels_packed_eager`): C++
    where available and exact here."""
    kernel = fused_k16_pack()
    if kernel is None:
        _final_levels_packed_eager(q3, X, keep, dj, dmj, out, qs_at)
    else:
        fused_kernel.k16_pack_cpp(kernel, q3, X, keep, dj, dmj, out, qs_at)


# --------------------------------------------------------------------------------------------
# Q2_K
# --------------------------------------------------------------------------------------------


def _encode_q2_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    nsb = x.shape[0]
    X3 = _superblocks_pos_major(x, _SUB, _SUB)  # [16 pos, 16 sub, nsb]
    X = X3.view(_SUB, -1)
    if qw is None:
        scales, mins, L = make_qkx16(X, None, 3, -0.5, 0.1, 15, qkx3=False, use_mad=True)
        scales, mins = scales.view(_NSUB, nsb), mins.view(_NSUB, nsb)
        zero = torch.zeros(nsb, dtype=_F32)
        max_scale = torch.clamp(scales.amax(0), min=0.0)
        max_min = torch.clamp(mins.amax(0), min=0.0)
        has_s, has_m = max_scale > 0, max_min > 0
        inv_s = torch.where(has_s, exact_div(15.0, max_scale), zero)
        inv_m = torch.where(has_m, exact_div(15.0, max_min), zero)
        ls = torch.where(has_s, nearest_int_bits(inv_s * scales), 0) & 0xFF
        lm = torch.where(has_m, nearest_int_bits(inv_m * mins), 0)
        sc = (ls | (lm << 4)) & 0xFF  # [16, nsb]
        d = torch.where(has_s, max_scale / 15.0, zero)
        dmin = torch.where(has_m, max_min / 15.0, zero)
    else:
        W, sw = weights_and_sums(X3, _superblocks_pos_major(qw, _SUB, _SUB), x, 1.0)
        sw = sw.view(_NSUB, nsb)
        scales, mins, L = make_qkx16(X, W, 3, -0.9, 0.05, 36, qkx3=True, use_mad=False)
        dd, ll = make_qp(torch.cat([scales.view(_NSUB, nsb), mins.view(_NSUB, nsb)], dim=1), torch.cat([sw, sw], dim=1), 15)
        d, dmin = dd[:nsb], dd[nsb:]
        ls, lm = ll[:, :nsb], ll[:, nsb:]
        sc = (ls | (lm << 4)) & 0xFF
    dj = (fp16_round(d).unsqueeze(0) * (sc & 0xF).to(_F32)).view(-1)
    dmj = (fp16_round(dmin).unsqueeze(0) * (sc >> 4).to(_F32)).view(-1)
    out = torch.empty((nsb, 84), dtype=torch.uint8)
    out[:, 0:16] = sc.to(torch.uint8).permute(1, 0)
    _final_levels_packed(False, X, L, dj, dmj, out, 16)
    store_fp16(out[:, 80:82], d)
    store_fp16(out[:, 82:84], dmin)
    return out


# --------------------------------------------------------------------------------------------
# Q3_K
# --------------------------------------------------------------------------------------------


def _pack_scales_q3(l: torch.Tensor) -> torch.Tensor:
    """ggml's 12-byte packing of 16 6-bit scales; l: int32 [16, nsb] -> uint8 [nsb, 12]."""
    lo = l & 0xF
    hi = l >> 4
    q = torch.empty((12,) + tuple(l.shape[1:]), dtype=torch.int32)
    q[0:8] = lo[0:8] | (lo[8:16] << 4)
    q[8:12] = hi[0:4] | (hi[4:8] << 2) | (hi[8:12] << 4) | (hi[12:16] << 6)
    return q.to(torch.uint8).permute(1, 0)


def _encode_q3_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    nsb = x.shape[0]
    X3 = _superblocks_pos_major(x, _SUB, _SUB)  # [16 pos, 16 sub, nsb]
    X = X3.view(_SUB, -1)
    if qw is None:
        scales, L = make_q3(X, 4)
        S = scales.view(_NSUB, nsb)
        _, arg = S.abs().max(dim=0)
        max_scale = S.gather(0, arg.unsqueeze(0)).squeeze(0)
        has = max_scale != 0
        iscale = exact_div(-32.0, torch.where(has, max_scale, torch.ones_like(max_scale)))
        li = nearest_int_bits(iscale * S)
        li = ((li + 128) & 0xFF) - 128  # int8_t l = nearest_int(...)
        ls = torch.where(has, li.clamp_(-32, 31) + 32, 0)
        d = torch.where(has, exact_div(1.0, iscale), torch.zeros_like(max_scale))
    else:
        W, sw = weights_and_sums(X3, _superblocks_pos_major(qw, _SUB, _SUB), x, 2.0)
        sw = sw.view(_NSUB, nsb)
        scales, L = make_qx(X, W, 4, gapped=False)
        d, Ls = make_qx(scales.view(_NSUB, nsb), sw, 32, gapped=False)
        ls = Ls.to(torch.int32)
    dj = (fp16_round(d).unsqueeze(0) * (ls - 32).to(_F32)).view(-1)
    out = torch.empty((nsb, 110), dtype=torch.uint8)
    _final_levels_packed(True, X, L, dj, None, out, 32)  # the search's levels carry the +4 already
    out[:, 96:108] = _pack_scales_q3(ls)
    store_fp16(out[:, 108:110], d)
    return out


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------


class Q2_K(_KQuant):
    """84 bytes per 256 weights: 16 (4-bit scale, 4-bit min) bytes, 256 2-bit levels, fp16 d, dmin."""

    qtype = GGMLQuantizationType.Q2_K
    type_size = 84

    @classmethod
    def _encode(cls, x, qw):
        return _encode_q2_k(x, qw)

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        scales = blocks[:, 0:16]
        d = fp16_from_bytes(blocks[:, 80:82])
        dmin = fp16_from_bytes(blocks[:, 82:84])
        dl = (d * (scales & 0xF).to(_F32)).reshape(n, 16, 1)
        ml = (dmin * (scales >> 4).to(_F32)).reshape(n, 16, 1)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
        q = ((blocks[:, 16:80].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 16, 16).to(_F32)
        return q.mul_(dl).sub_(ml).reshape(n, QK_K)  # in place: no new pages per step


class Q3_K(_KQuant):
    """110 bytes per 256 weights: high-bit mask, 256 2-bit low levels, 16 6-bit scales, fp16 d."""

    qtype = GGMLQuantizationType.Q3_K
    type_size = 110

    @classmethod
    def _encode(cls, x, qw):
        return _encode_q3_k(x, qw)

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        dev = blocks.device
        hmask, qs, packed = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108]
        d = fp16_from_bytes(blocks[:, 108:110])
        lo = (packed[:, 0:8].reshape(n, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8, device=dev).view(1, 2, 1))
        hi = packed[:, 8:12].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=dev).view(1, 4, 1)
        sc = (lo.reshape(n, 16) & 0xF) | ((hi.reshape(n, 16) & 3) << 4)
        dl = (d * (sc.to(torch.int8) - 32).to(_F32)).reshape(n, 16, 1)
        shifts2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=dev).view(1, 1, 4, 1)
        ql = (qs.reshape(n, 2, 1, 32) >> shifts2).reshape(n, 16, 16) & 3
        shifts1 = torch.arange(8, dtype=torch.uint8, device=dev).view(1, 1, 8, 1)
        qh = ((hmask.reshape(n, 1, 1, 32) >> shifts1).reshape(n, 16, 16) & 1) ^ 1
        q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(_F32)
        return q.mul_(dl).reshape(n, QK_K)
