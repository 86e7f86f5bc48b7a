"""The exact float32 machinery of ggml's quantizers: sequential sums and ggml's scale searches.

The encoders follow ggml's `ggml_quantize_chunk`: without an importance matrix they are the
`quantize_row_<type>_ref` functions (what llama-quantize writes without --imatrix), with one
they are the `quantize_row_<type>_impl` functions. Every quantity ggml computes in float is
computed here in float32 with the same operations in the same order, so the output is the
same to the byte:

* sums that ggml accumulates one element after the other stay sequential (`sum_rows`,
  `sum33`), never torch's pairwise/vectorized reduction order;
* `nearest_int` is round-half-to-even, or its bit-exact emulation where the argument can
  leave the range the 12582912 trick is meant for (`nearest_int_bits`);
* scalars such as `0.1f*is + nmax` are rounded to float32 step by step (numpy float32);
  `c / t` is a true division (Python's `c / tensor` multiplies by a reciprocal);
* sqrtf is correctly rounded (torch's vectorized float32 sqrt is not; `exact_sqrt`);
* d and dmin are rounded to fp16 and re-read wherever ggml re-reads them;
* the early-outs (all-equal, all-zero blocks), the `>` vs `>=` tests, the uint8 truncations
  and the requantization's "keep the search's levels when d*sc == 0" are reproduced.

Layout. Blocks are processed position-major: a tensor [positions, columns] whose columns are
(sub-)blocks, so that "element i of every block" is one contiguous row and a sequential sum
over positions is a chain of row additions across all blocks at once. Columns are ordered
(sub-block index within the super-block, super-block) so that one sub-block index is a
contiguous run of columns. Sums over 32 positions use a 33-row "gapped" layout whose row 16
is a scratch slot (see `sum33`); a 34-row buffer adds a leading slot for chained sums
(sigma2 over a whole super-block or row). Rows are encoded in inner chunks of a few hundred
thousand weights, so the temporaries stay small; the search loops run over candidate scales
and over positions in a block, never over blocks.

Speed. The candidate loop of make_qkx2/3_quants (Q4_K/Q5_K, and Q4_1/Q5_1 with an importance
matrix; 16 to 37 candidates per block) is most of the work; it runs whole through a compiled
C++ function (`fused_kernel.qkx_search_cpp`), which is checked against the eager loop here
once per process and replaced by it when it is not available or not exact. make_qp_quants,
make_qx_quants and Q3_K's make_q3_quants run whole through C++ functions too, checked the
same way (`matching_kernel`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from ..native import failure_reason
from . import fused_kernel

QK_K = 256
GROUP_MAX_EPS = float(np.float32(1e-15))
NEAREST_INT_LIMIT = 4194303.0  # |x| up to which ggml's nearest_int is round-half-even

# Weights per inner chunk of the encoders and per torch thread: large enough to amortise
# torch's per-op overhead, small enough for the temporaries of the scale search to stay in cache.
INNER_CHUNK_WEIGHTS = 1 << 17

_F32 = torch.float32


def cpu32(t: torch.Tensor) -> torch.Tensor:
    """Encoder input as CPU float32: the exactness arguments here are about torch's CPU kernels."""
    return t.to(device="cpu", dtype=_F32)


def fp16_round(t: torch.Tensor) -> torch.Tensor:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(t)): round to nearest-even fp16, back to float32."""
    return t.to(torch.float16).to(_F32)


def exact_div(c: float, t: torch.Tensor) -> torch.Tensor:
    """float32 `c / t` for a float32 scalar c (Python's `c / t` computes `t.reciprocal() * c`)."""
    return torch.div(torch.tensor(c, dtype=_F32), t)


def exact_sqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrtf (torch's vectorized float32 sqrt is not): via float64."""
    return torch.sqrt(t.to(torch.float64)).to(_F32)


def nearest_int_bits(v: torch.Tensor) -> torch.Tensor:
    """ggml's `nearest_int`, bit for bit for any float32 input: int32 tensor."""
    bits = (v + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def chunk_ranges(n: int, step: int):
    """(start, stop) of consecutive ranges of `step` over range(n)."""
    for start in range(0, n, step):
        yield start, min(n, start + step)


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# --------------------------------------------------------------------------------------------
# Sequential float32 sums over the leading dimension.
#
# ggml accumulates `s += p[i]` from s = 0 for i = 0..n-1. torch's CPU sum over an outer
# dimension whose remaining dims are contiguous (cascade_sum's multi_row_sum) adds the rows of
# each group of 16 one after the other into a fresh accumulator that starts at zero, and adds
# a 17th row last. Each thread's share of columns is handled that way when it is a multiple
# of (vector width x 4) columns, 64 at most; other column counts take a path with several
# partial accumulators. So for suitable shapes a torch.sum over <= 16 rows is ggml's order,
# and over 17 rows [s, p0..p15] it is s + p0 + ... + p15 in order (the 17th row is added by
# commutativity, which is exact). A 32-element sum is two torch.sum calls on a 33-row buffer
# whose row 16 receives the first partial sum (`sum33`). Whether this holds for the running
# torch is checked once, on adversarial data; for other shapes, or if the check fails, the
# sums are explicit row-by-row additions (same result, slower).
# --------------------------------------------------------------------------------------------

_GRAIN = 32768  # at::internal::GRAIN_SIZE: smaller reductions run on one thread
VEC_COLS = 64
_SEQ_OK: dict[int, bool] = {}
_FAST_SHAPES: dict[tuple, bool] = {}


def col_align() -> int:
    """Column multiple that keeps a large torch.sum on its sequential path on every thread."""
    return VEC_COLS * max(1, torch.get_num_threads())


def loop_sum(p: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    s = p[0].clone()
    for r in range(1, p.shape[0]):
        s.add_(p[r])
    if out is not None:
        out.copy_(s)
        return out
    return s


def _check_torch_sum_sequential() -> bool:
    align = col_align()
    gen = torch.Generator().manual_seed(1234)
    for cols in (VEC_COLS, align, 3 * align, 37 * align, 301 * align):
        for rows in (8, 16, 17):
            mag = torch.exp(torch.randn(rows, cols, generator=gen) * 6)
            p = (torch.randn(rows, cols, generator=gen) * mag).to(_F32)
            buf = torch.empty(rows + 1, cols)
            buf[:rows] = p
            if not _fast_shape(buf[:rows]):
                continue
            torch.sum(buf[:rows], 0, out=buf[rows])
            if not torch.equal(buf[rows], loop_sum(p)):
                return False
    return True


def _fast_shape(p: torch.Tensor) -> bool:
    """Whether torch.sum(p, 0) adds p's rows in order (see above)."""
    shape, strides = p.shape, p.stride()
    rows = shape[0]
    if rows > 17:
        return False
    cols = 1
    for size, stride in zip(reversed(shape[1:]), reversed(strides[1:])):
        if size != 1 and stride != cols:
            return False  # the trailing dims must form one contiguous run of columns
        cols *= size
    if cols % VEC_COLS:
        return False
    return rows * cols < _GRAIN or cols % col_align() == 0


def _seq_fast() -> bool:
    threads = torch.get_num_threads()
    ok = _SEQ_OK.get(threads)
    if ok is None:
        ok = _SEQ_OK[threads] = _check_torch_sum_sequential()
    return ok


def sum_rows(p: torch.Tensor, out: torch.Tensor | None = None, exact_loop: bool = False) -> torch.Tensor:
    """Sequential sum p[0] + p[1] + ... of up to 17 rows, over the leading dimension."""
    key = (p.shape, p.stride(), torch.get_num_threads())
    fast = _FAST_SHAPES.get(key)
    if fast is None:
        fast = _FAST_SHAPES[key] = _fast_shape(p) and _seq_fast()
    if exact_loop or not fast:
        return loop_sum(p, out)
    if out is None:
        return torch.sum(p, 0)
    return torch.sum(p, 0, out=out)


def sum33(p: torch.Tensor, out: torch.Tensor | None = None, exact_loop: bool = False) -> torch.Tensor:
    """Sequential sum of 32 rows stored gapped: rows 0..15, scratch row 16, rows 17..32.

    Overwrites row 16 of `p`."""
    sum_rows(p[0:16], p[16], exact_loop)
    return sum_rows(p[16:33], out, exact_loop)


def gapped33(pos_major: torch.Tensor, rows: int = 33) -> torch.Tensor:
    """[32, ...] -> [33, ...] with positions 0..15 in rows 0..15 and 16..31 in rows 17..32.

    Rows are padded (`fused_kernel.padded_rows`): the compiled kernel takes them without a
    copy, and sums over rows stay clear of cache-set conflicts."""
    out = fused_kernel.padded_rows(rows, tuple(pos_major.shape[1:]))
    off = rows - 33
    out[off : off + 16] = pos_major[:16]
    out[off + 17 : off + 33] = pos_major[16:]
    out[off + 16] = 0.0
    if off:
        out[:off] = 0.0
    return out


def ungap33(t: torch.Tensor) -> torch.Tensor:
    """Inverse of `gapped33` (rows 0..15 and 17..32 of a 33-row tensor)."""
    return torch.cat([t[:16], t[17:33]], dim=0)


# --------------------------------------------------------------------------------------------
# make_qkx2_quants / make_qkx3_quants: asymmetric (scale, min) search for 32-element blocks.
# --------------------------------------------------------------------------------------------


class _QkxResult:
    __slots__ = ("scale", "the_min", "l_iscale", "l_min", "early")

    def __init__(self, scale, the_min, l_iscale, l_min, early):
        self.scale = scale  # returned scale
        self.the_min = the_min  # *the_min (= -min)
        self.l_iscale = l_iscale  # L = clamp(nearest_int(l_iscale * (x - l_min)), 0, nmax)
        self.l_min = l_min
        self.early = early  # blocks that took the all-equal early-out (L = 0)


class _Gap33:
    """Views of a 33-row gapped buffer for `sum33`, made once (view creation costs a few us)."""

    __slots__ = ("lo", "slot", "hi", "fast")

    def __init__(self, buf: torch.Tensor):
        self.lo, self.slot, self.hi = buf[0:16], buf[16], buf[16:33]
        self.fast = _fast_shape(self.lo) and _fast_shape(self.hi) and _seq_fast()

    def sum(self, out: torch.Tensor, exact_loop: bool = False) -> torch.Tensor:
        if self.fast and not exact_loop:
            torch.sum(self.lo, 0, out=self.slot)
            return torch.sum(self.hi, 0, out=out)
        sum_rows(self.lo, self.slot, True)
        return sum_rows(self.hi, out, True)


def make_qkx_numerators(nmax: int, rmin: float, rdelta: float, nstep: int) -> list[float]:
    """The candidate numerators rmin + rdelta*is + nmax (is = 0..nstep) of make_qkx2/3_quants,
    in float32 as ggml computes them."""
    rmin32, rdelta32, nmax32 = np.float32(rmin), np.float32(rdelta), np.float32(nmax)
    return [float((rmin32 + rdelta32 * np.float32(i)) + nmax32) for i in range(nstep + 1)]


def make_qkx(
    X: torch.Tensor,
    W: torch.Tensor,
    xmin: torch.Tensor,
    xmax: torch.Tensor,
    sum_w: torch.Tensor,
    sum_x: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    qkx3: bool,
    exact: bool = False,
    fused: bool | Callable[..., torch.Tensor] = True,
) -> tuple[_QkxResult, torch.Tensor]:
    """ggml's make_qkx2_quants (qkx3=False) or make_qkx3_quants (qkx3=True), use_mad=false.

    X, W: [33, B] gapped position-major blocks and weights; xmin/xmax: [B] block min/max;
    sum_w = sum(w), sum_x = sum(w*x) in ggml's order. Returns the result and a [B] mask of
    blocks whose fast-path arithmetic may differ from ggml (nearest_int out of range, NaN);
    with exact=True those are computed exactly (slow, for a handful of blocks). `fused`: run
    the candidate loop through the compiled kernel where it is available (True), never
    (False), or through this function (with `fused_kernel.qkx_search_cpp`'s arguments).

    The candidate loop is sequential as in ggml (each candidate's iscale uses the min of the
    best fit so far); it runs vectorized over all blocks, keeping per block the state
    (best error, scale, and the (iscale, min) that produced the winning levels).
    """
    B = X.shape[1]
    fnmax = float(nmax)
    mn0 = torch.where(xmin > 0, torch.zeros_like(xmin), xmin)
    mx = xmax
    early = (mx <= mn0) if qkx3 else (mx == mn0)
    iscale0 = exact_div(fnmax, mx - mn0)

    T = torch.empty_like(X)  # levels of the candidate, then its weighted squared errors
    gT = _Gap33(T)

    def quant(isc, m, out):  # Laux = clamp(nearest_int(isc*(x - m)), 0, nmax)
        torch.sub(X, m, out=out)
        out.mul_(isc)
        if exact:
            if qkx3:  # v > 0 ? nearest_int(MIN(v, nmax)) : 0
                v = out.clone()
                out.copy_(torch.where(v > 0, torch.round(torch.clamp(v, max=fnmax)), torch.zeros_like(v)))
            else:
                out.copy_(nearest_int_bits(out).clamp_(0, nmax).to(_F32))
        else:
            out.round_().clamp_(0.0, fnmax)
        return out

    def error(s, m, L, out):  # sum of w * (s*L + m - x)^2, sequential; consumes L
        L.mul_(s)
        L.add_(m)
        L.sub_(X)
        L.mul_(L)
        L.mul_(W)
        return gT.sum(out, exact)

    # state rows: best error, scale, iscale and min of the winning levels, current min.
    state = torch.empty((5, B), dtype=_F32)
    best, mn = state[0], state[4]
    torch.div(torch.tensor(1.0, dtype=_F32), iscale0, out=state[1])
    state[2] = iscale0
    state[3] = mn0
    mn.copy_(mn0)
    error(state[1], mn0, quant(iscale0, mn0, T), best)
    mn_hi = mn0.clone()  # largest min used: bounds |iscale*(x - min)| over the loop

    cs = make_qkx_numerators(nmax, rmin, rdelta, nstep)
    search = fused if callable(fused) else (fused_qkx_search() if fused and not exact else None)
    if search is not None:
        s = search(X, W, torch.stack((mx, sum_w, sum_x)), torch.cat((state, mn_hi.unsqueeze(0))), cs, nmax)
        state, mn, mn_hi = s[:5], s[4], s[5]
    else:
        _qkx_candidates_eager(X, W, mx, sum_w, sum_x, cs, state, mn_hi, T, quant, error, exact)

    zero = torch.zeros_like(mx)
    scale = torch.where(early, zero, state[1])
    l_iscale = torch.where(early, zero, state[2])
    l_min = torch.where(early, zero, state[3])
    # early-out: *the_min = -min with min the clamped block minimum (state[4] is mn0 there).
    result = _QkxResult(scale, -mn, l_iscale, l_min, early)
    if exact:
        return result, torch.zeros(B, dtype=torch.bool)
    # Fast-path validity: |iscale*(x - min)| stays well inside nearest_int's range and
    # finite for every min the loop used; the bound is monotone in min, so mn_hi decides.
    c_max = max(abs(c) for c in cs)
    rng = mx - mn_hi
    ok = (rng > 0) & ((mn_hi - xmin) * c_max <= rng * 1.0e6) & (mx - xmin < 3.0e38)
    return result, ~ok & ~early


def _adversarial_blocks(n_blocks: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_blocks, 32] blocks and positive weights that probe the edges of the scale search."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks, 32, generator=gen) * torch.exp(torch.randn(n_blocks, 1, generator=gen) * 2)
    kind = torch.arange(n_blocks) % 16
    x[kind == 1] = x[kind == 1].abs() + 0.5  # all positive
    x[kind == 2] = -x[kind == 2].abs() - 0.5  # all negative
    x[kind == 3] = 0.0
    x[kind == 4] = 0.25  # constant
    x[kind == 5] = torch.round(x[kind == 5] * 2) / 2  # few distinct values: ties everywhere
    x[kind == 6] *= 1e-30
    x[kind == 7] *= 1e30
    x[kind == 8, 0] *= 1000  # one spike
    x[kind == 9] = x[kind == 9].clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(_F32)  # FP8 grid
    w = torch.rand(n_blocks, 32, generator=gen) * 2
    w[kind == 10] = 0.0
    w[kind == 11, ::3] = 0.0
    return x, w


def fused_matches_eager(search: Callable[..., torch.Tensor], blocks: int = 4101) -> bool:
    """Whether a compiled candidate loop (`make_qkx`'s `fused`) gives the eager search's
    results, bit for bit, on blocks that probe the edges (a count that leaves a partial
    vector of blocks), for the searches of Q4_K, Q5_K and the importance-matrix path."""
    x, w = _adversarial_blocks(blocks)
    X = gapped33(x.T.contiguous())
    W = gapped33(w.T.contiguous())
    data = ungap33(X)
    sum_w, sum_x = sum33(W.clone()), sum33(W * X)
    cases = ((15, -1.0, 0.1, 20, False), (31, -0.5, 0.1, 15, False), (15, -0.9, 0.05, 36, True), (31, -0.9, 0.05, 36, True))
    for nmax, rmin, rdelta, nstep, qkx3 in cases:
        args = (X, W, data.amin(0), data.amax(0), sum_w, sum_x, nmax, rmin, rdelta, nstep, qkx3)
        (got, got_flagged), (want, want_flagged) = (make_qkx(*args, fused=f) for f in (search, False))
        if not torch.equal(got_flagged, want_flagged):
            return False
        ok = ~want_flagged
        for a, b in zip((got.scale, got.the_min, got.l_iscale, got.l_min), (want.scale, want.the_min, want.l_iscale, want.l_min)):
            if not torch.equal(a[ok].view(torch.int32), b[ok].view(torch.int32)):
                return False
    return True


@functools.cache
def fused_qkx_search() -> Callable[..., torch.Tensor] | None:
    """The compiled candidate loop of make_qkx (`fused_kernel.qkx_search_cpp`) once it has
    matched the eager code here; else None (with a one-line warning)."""
    kernel = fused_kernel.compiled_qkx_search()
    if kernel is None:
        return None
    search = functools.partial(fused_kernel.qkx_search_cpp, kernel)
    try:
        if fused_matches_eager(search):
            return search
        reason = "its results differ from the eager code on this machine"
    except Exception as exc:  # noqa: BLE001 - a broken build surfaces on the first call
        reason = failure_reason(exc)
    fused_kernel.log.warning("fused K-quant kernel not used (%s); using the eager encoder", reason)
    return None


def fused_search_available() -> bool:
    """Whether make_qkx runs its candidate loop through the compiled kernel here (builds it)."""
    return fused_qkx_search() is not None


def _qkx_candidates_eager(X, W, mx, sum_w, sum_x, cs, state, mn_hi, T, quant, error, exact) -> None:
    """The candidate loop of `make_qkx` in eager torch: updates state [5, B] and mn_hi in place.

    T is the [33, B] scratch of `quant` and `error`."""
    B = X.shape[1]
    P = torch.empty((33, 3, B), dtype=_F32)  # w*l, w*l*x, w*l*l: summed in one pass
    P_wl, P_wlx, P_wll = P.unbind(1)
    gP = _Gap33(P)
    best, mn = state[0], state[4]
    new = torch.empty((5, B), dtype=_F32)
    cur, this_scale, isc, prev_mn, this_min = new
    c_ts = [torch.tensor(c, dtype=_F32) for c in cs]
    # G rows: sum_x (constant), then the sums of the P planes (sum_l, sum_xl, sum_l2), then a
    # copy of sum_l2, laid out so that the products below are plain row views.
    G = torch.empty((5, B), dtype=_F32)
    G[0] = sum_x
    sums = G[1:4]
    sum_l, sum_xl, sum_l2, sum_l2c = G[1], G[2], G[3], G[4]
    lhs1 = torch.stack([sum_w, sum_w, sum_x])
    prod1 = torch.empty((3, B), dtype=_F32)
    prod2 = torch.empty((3, B), dtype=_F32)
    D = prod1[1]
    scale_min = new[1:5:3]  # this_scale, this_min
    state_bits, new_bits = state.view(torch.int32), new.view(torch.int32)
    flip = torch.empty_like(new_bits)
    mask = torch.empty(B, dtype=torch.int32)
    acc = torch.empty(B, dtype=torch.bool)
    acc2 = torch.empty(B, dtype=torch.bool)
    pos = torch.empty(B, dtype=torch.bool)
    rng = torch.empty_like(mx)
    for c_t in c_ts:
        torch.sub(mx, mn, out=rng)
        torch.div(c_t, rng, out=isc)
        prev_mn.copy_(mn)
        if not exact:
            torch.maximum(mn_hi, mn, out=mn_hi)
        L = quant(isc, mn, T)
        torch.mul(W, L, out=P_wl)
        torch.mul(P_wl, L, out=P_wll)
        torch.mul(P_wl, X, out=P_wlx)
        gP.sum(sums, exact)
        # this_scale = (sum_w*sum_xl - sum_x*sum_l)/D, D = sum_w*sum_l2 - sum_l*sum_l,
        # this_min = (sum_l2*sum_x - sum_l*sum_xl)/D: three rows at a time (products of
        # two floats commute exactly, so the operand order within a product is free).
        sum_l2c.copy_(sum_l2)
        torch.mul(lhs1, G[2:5], out=prod1)  # sum_w*sum_xl, sum_w*sum_l2, sum_x*sum_l2
        torch.mul(sum_l, G[0:3], out=prod2)  # sum_l*sum_x, sum_l*sum_l, sum_l*sum_xl
        prod1.sub_(prod2)
        torch.div(prod1[0:3:2], D, out=scale_min)
        torch.gt(this_min, 0.0, out=pos)
        if exact or bool(pos.any()):
            this_min.masked_fill_(pos, 0.0)
            this_scale.copy_(torch.where(pos, sum_xl / sum_l2, this_scale))
        error(this_scale, this_min, L, cur)
        torch.gt(D, 0.0, out=acc)
        acc &= torch.lt(cur, best, out=acc2)
        # state = where(acc, new, state), as a bitwise select (torch.where is slow on CPU)
        mask.copy_(acc).neg_()
        torch.bitwise_xor(state_bits, new_bits, out=flip)
        flip &= mask
        state_bits ^= flip


def qkx_levels(X: torch.Tensor, res: _QkxResult, nmax: int, qkx3: bool, exact: bool) -> torch.Tensor:
    """The L that make_qkx*_quants leaves behind, recomputed from the winning (iscale, min)."""
    v = (X - res.l_min) * res.l_iscale
    if exact:
        if qkx3:
            return torch.where(v > 0, torch.round(torch.clamp(v, max=float(nmax))), torch.zeros_like(v))
        return nearest_int_bits(v).clamp_(0, nmax).to(_F32)
    return v.round_().clamp_(0.0, float(nmax))


def make_qkx_all(X, W, xmin, xmax, sum_w, sum_x, nmax, rmin, rdelta, nstep, qkx3):
    """make_qkx on all blocks, redoing exactly the few blocks the fast path cannot vouch for.

    Returns (scale, the_min, levels) where levels() computes the L [33, B] that ggml's
    function leaves behind (needed only where the requantization skips a sub-block)."""
    res, flagged = make_qkx(X, W, xmin, xmax, sum_w, sum_x, nmax, rmin, rdelta, nstep, qkx3)
    scale, the_min = res.scale, res.the_min
    fix = None
    if bool(flagged.any()):
        idx = flagged.nonzero().flatten()
        sub = [t[:, idx].contiguous() for t in (X, W)]
        vec = [t[idx] for t in (xmin, xmax, sum_w, sum_x)]
        res2, _ = make_qkx(*sub, *vec, nmax, rmin, rdelta, nstep, qkx3, exact=True)
        scale = scale.clone()
        the_min = the_min.clone()
        scale[idx] = res2.scale
        the_min[idx] = res2.the_min
        fix = (idx, sub[0], res2)

    def levels() -> torch.Tensor:
        L = qkx_levels(X, res, nmax, qkx3, exact=False)
        if fix is not None:
            idx, xs, res2 = fix
            L[:, idx] = qkx_levels(xs, res2, nmax, qkx3, exact=True)
        return L

    return scale, the_min, levels


# --------------------------------------------------------------------------------------------
# make_qx_quants (rmse_type = 1): symmetric scale search, 19 candidate scales evaluated at once.
# --------------------------------------------------------------------------------------------

_QX_STEPS = [0] + [s for s in range(-9, 10) if s != 0]


def qx_numerators(nmax: int) -> torch.Tensor:
    """make_qx_quants' candidate numerators -(nmax + 0.1f*is) for is in _QX_STEPS, float32."""
    nmax32 = np.float32(nmax)
    return torch.tensor([-(nmax32 + np.float32(0.1) * np.float32(s)) for s in _QX_STEPS], dtype=_F32)


@functools.cache
def fused_qx() -> Callable[..., None] | None:
    """The C++ make_qx_quants, once it has matched the array code bit for bit on probe blocks of
    16 and 32 (gapped) positions here, for Q6_K's, Q3_K's and Q4_0's nmax; else None."""
    kernel = fused_kernel.compiled_qx()
    if kernel is None:
        return None
    x, w = _adversarial_blocks(4101, seed=17)
    X32, W32 = gapped33(x.T.contiguous()), gapped33(w.T.contiguous())
    X16, W16 = x[:, :16].T.contiguous(), w[:, :16].T.contiguous()
    probes = [(X32, W32, 8, True), (X32, X32 * X32, 16, True), (X16, W16, 32, False), (X16, W16, 4, False)]

    def run(fused):
        return torch.cat([torch.cat([s.unsqueeze(0), L]).reshape(-1) for X, W, nmax, gapped in probes
                          for s, L in [make_qx(X, W, nmax, gapped, fused=fused)]])

    return matching_kernel("make_qx_quants", lambda: run(kernel), kernel, lambda: run(False), [[]])


def make_qx(X: torch.Tensor, W: torch.Tensor, nmax: int, gapped: bool,
            fused: bool | Callable[..., None] = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, qw=W) on position-major blocks.

    X, W: [16, B] (gapped=False) or [33, B] gapped 32-element blocks. Returns (scale [B],
    L [rows, B] float holding the stored levels l + nmax, 0 for all-zero blocks).

    The 19 candidate scales do not depend on each other, only the choice among them is
    sequential (a running `best`), so each candidate is evaluated for all blocks at once.
    Runs through the C++ kernel (`fused_kernel.qx_search_cpp`) where it is available and has
    matched this code here (`fused_qx`); `fused`: True, False (never), or the kernel."""
    kernel = fused if callable(fused) else (fused_qx() if fused else None)
    if kernel is not None:
        out = fused_kernel.qx_search_cpp(kernel, X, W, qx_numerators(nmax), nmax, GROUP_MAX_EPS)
        return out[0], out[1:]
    rows, B = X.shape
    lo, hi = -float(nmax), float(nmax - 1)
    # max: the element of largest magnitude, first one on ties (ggml: `if (ax > amax)`);
    # torch.max(dim) returns the first maximal index.
    data = ungap33(X) if gapped else X
    amax, arg = data.abs().max(dim=0)
    xmax = data.gather(0, arg.unsqueeze(0)).squeeze(0)
    zero_blk = amax < GROUP_MAX_EPS
    safe_max = torch.where(zero_blk, torch.ones_like(xmax), xmax)

    nmax32 = np.float32(nmax)
    cs = torch.tensor([-(nmax32 + np.float32(0.1) * np.float32(s)) for s in _QX_STEPS], dtype=_F32)
    isc = torch.div(cs.unsqueeze(1), safe_max.unsqueeze(0))  # [n_c, B]: iscale = -(nmax + 0.1f*is)/max

    WX = W * X
    V = torch.empty_like(X)  # levels l of the candidate
    A = torch.empty_like(X)  # w*x*l
    Bf = torch.empty_like(X)  # w*l, then w*l*l
    if gapped:
        gA, gB = _Gap33(A), _Gap33(Bf)

        def seqsum(g, out):
            return g.sum(out)
    else:
        gA, gB = A, Bf

        def seqsum(g, out):
            return sum_rows(g, out)

    sumlx = torch.empty(B, dtype=_F32)
    suml2 = torch.empty(B, dtype=_F32)
    # state rows: scale, best, iscale of the chosen levels; new: the candidate's values
    state = torch.empty((3, B), dtype=_F32)
    new = torch.empty((3, B), dtype=_F32)
    scale, best, best_isc = state
    state_bits, new_bits = state.view(torch.int32), new.view(torch.int32)
    flip = torch.empty_like(state_bits)
    mask = torch.empty(B, dtype=torch.int32)
    t1, t2 = torch.empty_like(sumlx), torch.empty_like(sumlx)
    acc = torch.empty(B, dtype=torch.bool)
    acc2 = torch.empty(B, dtype=torch.bool)
    for c in range(len(_QX_STEPS)):
        torch.mul(X, isc[c], out=V)
        V.round_().clamp_(lo, hi)
        torch.mul(WX, V, out=A)
        seqsum(gA, sumlx)
        torch.mul(W, V, out=Bf)
        Bf.mul_(V)
        seqsum(gB, suml2)
        if c == 0:  # scale = suml2 ? sumlx/suml2 : 0; best = scale*sumlx
            torch.div(sumlx, suml2, out=scale)
            scale.masked_fill_(suml2 == 0, 0.0)
            torch.mul(scale, sumlx, out=best)
            best_isc.copy_(isc[0])
            continue
        # if (suml2 > 0 && sumlx*sumlx > best*suml2) { scale = sumlx/suml2; best = scale*sumlx; }
        torch.gt(suml2, 0.0, out=acc)
        acc &= torch.gt(torch.mul(sumlx, sumlx, out=t1), torch.mul(best, suml2, out=t2), out=acc2)
        torch.div(sumlx, suml2, out=new[0])
        torch.mul(new[0], sumlx, out=new[1])
        new[2].copy_(isc[c])
        # state = where(acc, new, state), as a bitwise select
        mask.copy_(acc).neg_()
        torch.bitwise_xor(state_bits, new_bits, out=flip)
        flip &= mask
        state_bits ^= flip
    scale = scale.masked_fill(zero_blk, 0.0)

    L = torch.mul(X, best_isc, out=V).round_().clamp_(lo, hi).add_(float(nmax))
    L.masked_fill_(zero_blk.unsqueeze(0), 0.0)
    return scale, L


# --------------------------------------------------------------------------------------------
# make_qp_quants: 6-bit quantization of the 8 sub-block scales (or mins) of a super-block.
# --------------------------------------------------------------------------------------------


def _qp_consts(nmax: int) -> torch.Tensor:
    """The constants of `fused_kernel.qp_search_cpp` for this nmax: nmax, 1, eps, the 8
    candidate numerators 0.1f*is + nmax (is = -4..4, is != 0), 0, all float32."""
    nmax32 = np.float32(nmax)
    cands = [np.float32(0.1) * np.float32(s) + nmax32 for s in range(-4, 5) if s != 0]
    return torch.tensor([nmax, 1.0, GROUP_MAX_EPS, *cands, 0.0], dtype=_F32)


def short_block_probe(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial blocks of `rows` elements as [rows, cols] columns (every other one made
    non-negative, as scales and mins are), and positive weights with zeros among them."""
    x, w = _adversarial_blocks(cols, seed)
    x = x[:, :rows].T.contiguous()
    x[:, ::2] = x[:, ::2].abs()
    return x, w[:, :rows].T.contiguous()


def matching_kernel(name: str, run: Callable[..., torch.Tensor], kernel, eager: Callable[..., torch.Tensor], probes: list):
    """kernel, once run(*probe) has matched eager(*probe) bit for bit on every probe; else
    None (with a one-line warning naming it)."""
    try:
        if all(torch.equal(run(*p).view(torch.int32), eager(*p).view(torch.int32)) for p in probes):
            return kernel
        reason = "its results differ from the eager code on this machine"
    except Exception as exc:  # noqa: BLE001 - compile errors surface on the first call
        reason = failure_reason(exc)
    fused_kernel.log.warning("compiled %s not used (%s); using the eager encoder", name, reason)
    return None


@functools.cache
def fused_qp_step(rows: int) -> Callable[..., torch.Tensor] | None:
    """The compiled make_qp_quants (`fused_kernel.qp_search_cpp`) for blocks of `rows`
    elements, checked here; else None."""
    kernel = fused_kernel.compiled_qp_search()
    if kernel is None:
        return None
    step = functools.partial(fused_kernel.qp_search_cpp, kernel)

    def eager(x, w, consts):
        scale, L = make_qp(x, w, int(consts[0]), fused=False)
        return torch.cat([scale.unsqueeze(0), L.to(_F32)])

    # A column count that leaves a partial vector of blocks; uniform blocks reach the last
    # refinement passes (make_q3_quants, the same refinement, needs its fifth on 1 in 1500).
    x, w = short_block_probe(rows, 4101, seed=7)
    u = torch.rand((rows, 24000), generator=torch.Generator().manual_seed(7))
    return matching_kernel("qp_quants", step, step, eager,
                           [[x, w, _qp_consts(15)], [x, w, _qp_consts(63)], [u, u + 0.5, _qp_consts(15)]])


def make_qp(x: torch.Tensor, w: torch.Tensor, nmax: int, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qp_quants(n, nmax, x, L, quant_weights=w) for x, w: [n, cols], n <= 16.

    Returns (scale [cols], L int32 [n, cols] as stored in ggml's uint8_t L[]). Runs through
    the compiled kernel (`fused_kernel.qp_search_cpp`) where it is available and exact here."""
    step = fused_qp_step(x.shape[0]) if fused else None
    if step is not None:
        out = step(cpu32(x), cpu32(w), _qp_consts(nmax))
        return out[0], out[1:].to(torch.int32)
    n, cols = x.shape
    fnmax = float(nmax)
    exact_loop = False  # sum_rows falls back to the loop for unsuitable shapes
    # max = MAX(max, x[i]) from 0: it matters through `max < eps`, then as divisor.
    mx = x.amax(0)
    zero_blk = mx < GROUP_MAX_EPS
    mx = torch.where(zero_blk, torch.ones_like(mx), mx)

    def wsq_err(sc, l):  # sequential sum over i of w*diff*diff, diff = x - sc*l
        diff = x - sc * l
        return sum_rows(w * diff * diff, exact_loop=exact_loop)

    iscale = exact_div(fnmax, mx)
    L0 = (nearest_int_bits(iscale * x) & 0xFF).to(_F32)  # uint8_t L[i] = nearest_int(...)
    best_mse = wsq_err(exact_div(1.0, iscale), L0)
    for s in range(-4, 5):
        if s == 0:
            continue
        c = float(np.float32(0.1) * np.float32(s) + np.float32(nmax))
        iscale_is = exact_div(c, mx)
        l = torch.clamp(nearest_int_bits(iscale_is * x), max=nmax).to(_F32)
        mse = wsq_err(exact_div(1.0, iscale_is), l)
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        iscale = torch.where(better, iscale_is, iscale)

    li = torch.clamp(nearest_int_bits(iscale * x), max=nmax)
    L = li & 0xFF
    lf = li.to(_F32)
    wl = w * lf
    sumlx = sum_rows(w * x * lf, exact_loop=exact_loop)
    suml2 = sum_rows(wl * lf, exact_loop=exact_loop)

    # Coordinate refinement: each element in turn, the sums updated as it goes. A pass runs
    # only on the columns the previous pass changed (ggml stops a block after a pass without
    # a change): gathered, refined, scattered back, so later passes cost what they touch.
    wx = w * x
    idx = torch.arange(cols)
    for _ in range(5):
        if idx.numel() == 0:
            break
        whole = idx.numel() == cols
        xs, ws, wxs = (x, w, wx) if whole else (x[:, idx], w[:, idx], wx[:, idx])
        Ls = L if whole else L[:, idx]
        Lf = Ls.to(_F32)
        slx_s, sl2_s = (sumlx, suml2) if whole else (sumlx[idx], suml2[idx])
        changed = torch.zeros(idx.numel(), dtype=torch.bool)
        for i in range(n):
            Li, wi, xi = Lf[i], ws[i], xs[i]
            slx = slx_s - wxs[i] * Li
            sl2 = sl2_s - wi * Li * Li
            ok = (slx > 0) & (sl2 > 0)
            new_l = torch.clamp(nearest_int_bits(xi * sl2 / slx), max=nmax)
            nf = new_l.to(_F32)
            ok &= nf != Li
            slx += wxs[i] * nf
            sl2 += wi * nf * nf
            ok &= slx * slx * sl2_s > slx_s * slx_s * sl2
            if bool(ok.any()):
                Ls[i] = torch.where(ok, new_l & 0xFF, Ls[i])
                Lf[i] = Ls[i].to(_F32)
                slx_s = torch.where(ok, slx, slx_s)
                sl2_s = torch.where(ok, sl2, sl2_s)
                changed |= ok
        if whole:
            L, sumlx, suml2 = Ls, slx_s, sl2_s
        else:
            L[:, idx] = Ls
            sumlx = sumlx.index_copy(0, idx, slx_s)
            suml2 = suml2.index_copy(0, idx, sl2_s)
        idx = idx[changed]
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale.masked_fill_(zero_blk, 0.0)
    L.masked_fill_(zero_blk.unsqueeze(0), 0)
    return scale, L


