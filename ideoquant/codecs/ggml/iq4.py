"""The IQ4 non-linear codebook and ggml's IQ4 block-scale search (IQ4_NL, IQ4_XS).

ggml's `quantize_row_iq4_nl_impl` maps each weight to one of 16 fixed int8 values
(`kvalues_iq4nl`) times a per-32-weight scale. Per block it tries the scale that maps the
largest weight onto +127, then the 15 that map it onto -127-7 .. -127+7, keeping the
weighted least-squares scale of the best fit. This module holds the codebook, ggml's
`best_index_int8` and that search, on position-major gapped blocks (see `scale_search`).

best_index_int8 exactly. ggml picks the nearer neighbour with the float32 test
`x - val[mu-1] < val[mu] - x` (a tie goes up). Rounding can only turn a strict `<` into a
tie, and only where x lies within half an ulp of the half gap h = (b-a)/2 from the midpoint
while its own ulp is finer than h's; for this codebook every midpoint |m| is in the binade
of h or above it, so the test is exactly `x >= (a+b)/2`. All midpoints are multiples of 1/2,
so the index is the number of doubled midpoints <= floor(2x): one table lookup.

Speed. The 16 candidate scales of a block are independent until the choice among them, so
their sums are computed in one pass (`candidate_sums`: for each position, all candidates),
which the C++ source of `fused_kernel` runs for 16 blocks at a time with the blocks and the
sums in registers (`iq4_sums_cpp`; the codebook value as the sum of the steps whose midpoint
is reached, instead of a table lookup). It is checked bit for bit against the array code
once per process and replaced by it when it differs or cannot be built; IDEOQUANT_FUSED=0
turns it off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from ..native import failure_reason
from . import fused_kernel
from .scale_search import GROUP_MAX_EPS, _adversarial_blocks, exact_div, gapped33

KVALUES_IQ4NL: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# Scales tried besides the first: values[0] + itry for itry in -IQ4_NTRY..IQ4_NTRY (ggml's ntry).
IQ4_NTRY = 7

# Twice the midpoints between neighbouring codebook values (integers).
_MIDPOINTS2 = tuple(a + b for a, b in zip(KVALUES_IQ4NL[:-1], KVALUES_IQ4NL[1:]))
# floor(2x) is clamped to [-_LUT_HALF, _LUT_HALF - 1]; beyond the outermost midpoints anyway.
_LUT_HALF = 256

_F32 = torch.float32


@functools.cache
def _tables(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [512] int64, value [512] float32) by floor(2x) + 256."""
    t = np.arange(-_LUT_HALF, _LUT_HALF)
    index = (np.array(_MIDPOINTS2)[None, :] <= t[:, None]).sum(axis=1)
    value = np.array(KVALUES_IQ4NL, dtype=np.float32)[index]
    return torch.from_numpy(index).to(device), torch.from_numpy(value).to(device)


def _lut_position(x: torch.Tensor) -> torch.Tensor:
    """floor(2x) + 256, clamped to the table; NaN goes to the top (ggml returns 15 for NaN)."""
    t = torch.nan_to_num(x * 2.0, nan=float(_LUT_HALF)).floor_()
    return t.clamp_(-_LUT_HALF, _LUT_HALF - 1).add_(_LUT_HALF).to(torch.int64)


def iq4_index(x: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8(16, kvalues_iq4nl, x) for every element: int64 levels 0..15."""
    index, _ = _tables(str(x.device))
    return index[_lut_position(x)]


def iq4_value(x: torch.Tensor) -> torch.Tensor:
    """kvalues_iq4nl[best_index_int8(x)] as float32."""
    _, value = _tables(str(x.device))
    return value[_lut_position(x)]


# Rows of the gapped 33-row layout that hold data (row 16 is scratch).
_DATA_ROWS = tuple(range(16)) + tuple(range(17, 33))
def candidate_sums(x: torch.Tensor, w: torch.Tensor, iscales: torch.Tensor, value_lut: torch.Tensor) -> torch.Tensor:
    """For every block and candidate: sumqx = sum of w*q*x and sumq2 = sum of w*q*q, in ggml's
    order, with q the codebook value best_index_int8 picks for iscale*x.

    x, w [33, B] gapped position-major blocks and weights; iscales [C, B]; value_lut: the
    codebook value by floor(2*al) + 256 (`_tables`). Returns [2, C, B]. Every candidate's
    |iscale*x| is at most 134 here, so the lookup needs no NaN or overflow handling."""
    sumqx = sumq2 = None
    for r in _DATA_ROWS:
        xr = x[r]
        al = xr * iscales
        idx = torch.clamp(torch.floor(al * 2.0), -_LUT_HALF, _LUT_HALF - 1).to(torch.int64) + _LUT_HALF
        q = value_lut[idx]
        wq = w[r] * q
        a, b = wq * xr, wq * q
        if sumqx is None:  # ggml starts each sum from 0.0f
            sumqx, sumq2 = a + 0.0, b + 0.0
        else:
            sumqx, sumq2 = sumqx + a, sumq2 + b
    return torch.stack((sumqx, sumq2))


def eager_candidate_sums(x: torch.Tensor, w: torch.Tensor, iscales: torch.Tensor) -> torch.Tensor:
    """`candidate_sums` with this device's codebook table."""
    _, value = _tables(str(x.device))
    return candidate_sums(x, w, iscales, value)


@functools.cache
def compiled_candidate_sums() -> Callable[..., torch.Tensor] | None:
    """The C++ `candidate_sums`, once it has matched the array code bit for bit on blocks
    that probe the edges (with ggml's weights x^2 and with importance weights); else None."""
    kernel = fused_kernel.compiled_iq4_sums()
    if kernel is None:
        return None

    def step(x, w, iscales):
        return fused_kernel.iq4_sums_cpp(kernel, x, w, iscales, KVALUES_IQ4NL)

    try:
        x, qw = _adversarial_blocks(4101, seed=3)
        X = gapped33(x.T.contiguous())
        for W in (X * X, gapped33(qw.T.contiguous())):
            iscales = _candidate_iscales(X)
            if not torch.equal(step(X, W, iscales).view(torch.int32), eager_candidate_sums(X, W, iscales).view(torch.int32)):
                reason = "its results differ from the eager code on this machine"
                break
        else:
            return step
    except Exception as exc:  # noqa: BLE001 - a library without the symbol, say
        reason = failure_reason(exc)
    fused_kernel.log.warning("compiled IQ4 kernel not used (%s); using the eager encoder", reason)
    return None


def compiled_search_available() -> bool:
    """Whether IQ4 scale searches run through the C++ candidate sums here (builds and checks them)."""
    return compiled_candidate_sums() is not None


def block_absmax(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max) of gapped position-major blocks X [33, B]: the largest |x| of each block
    and its signed element, the first one where +a and -a tie (ggml's `ax > amax` scan).

    From the max and min of the two 16-row halves (plain reductions); only blocks where
    +a and -a tie look up which comes first."""
    hi = torch.maximum(X[:16].amax(dim=0), X[17:33].amax(dim=0))
    lo = torch.minimum(X[:16].amin(dim=0), X[17:33].amin(dim=0))
    neg = -lo
    amax = torch.maximum(hi, neg)
    mx = torch.where(neg > hi, lo, hi)
    tie = ((neg == hi) & (hi > 0)).nonzero().squeeze(1)
    if tie.numel():
        data = torch.cat([X[:16, tie], X[17:33, tie]])
        arg = data.abs().max(dim=0).indices  # first maximal index
        mx[tie] = data.gather(0, arg.unsqueeze(0)).squeeze(0)
    return amax, mx


def _candidate_iscales(X: torch.Tensor, ntry: int = IQ4_NTRY) -> torch.Tensor:
    """[1 + 2*ntry + 1, B]: 1/d with d = -max/values[0], then (itry + values[0])/max."""
    amax, xmax = block_absmax(X)
    safe_max = torch.where(amax < GROUP_MAX_EPS, torch.ones_like(xmax), xmax)
    d0 = torch.div(-safe_max, torch.tensor(float(KVALUES_IQ4NL[0]), dtype=_F32))
    rows = [exact_div(1.0, d0)]
    rows += [exact_div(float(itry + KVALUES_IQ4NL[0]), safe_max) for itry in range(-ntry, ntry + 1)]
    return torch.stack(rows)


def iq4_block_scales(X: torch.Tensor, W: torch.Tensor, ntry: int = IQ4_NTRY, compiled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-block scale search of quantize_row_iq4_nl_impl (ntry > 0).

    X, W: [33, B] gapped position-major 32-weight blocks and their weights (row 16 is scratch
    and must hold zeros). Returns (scale [B], max [B]): the least-squares scale `scales[ib]`
    (0 for blocks whose largest |x| is below GROUP_MAX_EPS) and the block's signed element of
    largest magnitude (first on ties). `compiled`: use the C++ candidate sums where they are
    available."""
    amax, xmax = block_absmax(X)
    zero_blk = amax < GROUP_MAX_EPS
    iscales = _candidate_iscales(X, ntry)
    step = compiled_candidate_sums() if compiled else None
    sums = (step or eager_candidate_sums)(X, W, iscales)
    sumqx, sumq2 = sums[0], sums[1]
    d = sumqx[0] / sumq2[0]
    best = d * sumqx[0]
    for c in range(1, iscales.shape[0]):
        take = (sumq2[c] > 0) & (sumqx[c] * sumqx[c] > best * sumq2[c])
        d_new = sumqx[c] / sumq2[c]
        d = torch.where(take, d_new, d)
        best = torch.where(take, d_new * sumqx[c], best)
    return d.masked_fill_(zero_blk, 0.0), xmax
