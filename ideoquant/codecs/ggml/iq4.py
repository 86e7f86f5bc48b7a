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
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .scale_search import GROUP_MAX_EPS, exact_div, sum33

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


def iq4_block_scales(X: torch.Tensor, W: torch.Tensor, ntry: int = IQ4_NTRY) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-block scale search of quantize_row_iq4_nl_impl (ntry > 0).

    X, W: [33, B] gapped position-major 32-weight blocks and their weights (row 16 is scratch
    and must hold zeros). Returns (scale [B], max [B]): the least-squares scale `scales[ib]`
    (0 for blocks whose largest |x| is below GROUP_MAX_EPS) and the block's signed element of
    largest magnitude (first on ties)."""
    data = torch.cat([X[:16], X[17:33]])
    amax, arg = data.abs().max(dim=0)
    xmax = data.gather(0, arg.unsqueeze(0)).squeeze(0)
    zero_blk = amax < GROUP_MAX_EPS
    safe_max = torch.where(zero_blk, torch.ones_like(xmax), xmax)

    Q = torch.empty_like(X)  # the candidate's codebook values
    WQ = torch.empty_like(X)  # w*q, then w*q*q
    P = torch.empty_like(X)  # w*q*x
    sumqx = torch.empty_like(safe_max)
    sumq2 = torch.empty_like(safe_max)

    def sums(iscale: torch.Tensor) -> None:
        torch.mul(X, iscale, out=Q)
        Q.copy_(iq4_value(Q))
        torch.mul(W, Q, out=WQ)
        torch.mul(WQ, X, out=P)
        sum33(P, sumqx)
        WQ.mul_(Q)
        sum33(WQ, sumq2)

    # d = -max/values[0]; the first levels come from id = 1/d.
    d0 = torch.div(-safe_max, torch.tensor(float(KVALUES_IQ4NL[0]), dtype=_F32))
    sums(exact_div(1.0, d0))
    d = sumqx / sumq2
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sums(exact_div(float(itry + KVALUES_IQ4NL[0]), safe_max))
        take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d_new = sumqx / sumq2
        d = torch.where(take, d_new, d)
        best = torch.where(take, d_new * sumqx, best)
    return d.masked_fill_(zero_blk, 0.0), xmax
