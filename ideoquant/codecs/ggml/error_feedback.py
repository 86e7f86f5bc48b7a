"""Activation-aware codes on the stock ggml grids: GPTQ-style error feedback.

Block headers (fp16 scales, 6-bit sub-block scales and mins) come from the type's own
encoder, so every reader decodes the bytes unchanged. Only the codes differ: each column's
codes are rounded on the grid its header defines, and the rounding error is pushed onto the
columns not yet quantized through the inverse Cholesky factor of the input second-moment
matrix H (GPTQ), which minimises ||X (W_q - W)^T|| instead of ||W_q - W||.

Each span of 256 columns gets its headers from the stock encoder run on the weights as
updated so far (GPTQ's groups chosen on the fly), then its codes column by column; rows are
processed in chunks of bounded size, columns vectorized over all rows of a chunk.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from .base import GGMLType, fp16_from_bytes
from .kquants import _k4_scales_and_mins

_F32 = torch.float32
# Columns whose headers are chosen together (one K-quant super-block, 8 blocks of 32).
SPAN = 256
# Weights per row chunk of the feedback loop.
CHUNK_WEIGHTS = 1 << 23


def _expand(per_group: torch.Tensor, width: int) -> torch.Tensor:
    """[n, groups] or [n, groups, 1] -> [n, groups * width], each value repeated `width` times."""
    n = per_group.shape[0]
    return per_group.reshape(n, -1, 1).expand(-1, -1, width).reshape(n, -1)


class _Grid:
    """The affine code grid of one ggml type: value = step * q + offset, q integer in [lo, hi]."""

    lo: int
    hi: int

    @staticmethod
    def step_offset(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-weight step and offset of uint8 blocks [n, type_size]: float32 [n, block_size] each."""
        raise NotImplementedError

    @staticmethod
    def with_codes(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The blocks with their codes replaced by q (int32 [n, block_size] in [lo, hi]); headers kept."""
        raise NotImplementedError


class _GridQ4K(_Grid):
    lo, hi = 0, 15

    @staticmethod
    def step_offset(blocks):
        dl, ml = _k4_scales_and_mins(blocks)
        return _expand(dl, 32), -_expand(ml, 32)

    @staticmethod
    def with_codes(blocks, q):
        out = blocks.clone()
        v = q.to(torch.uint8).reshape(-1, 4, 2, 32)
        out[:, 16:144] = (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(-1, 128)
        return out


class _GridQ5K(_Grid):
    lo, hi = 0, 31

    @staticmethod
    def step_offset(blocks):
        dl, ml = _k4_scales_and_mins(blocks)
        return _expand(dl, 32), -_expand(ml, 32)

    @staticmethod
    def with_codes(blocks, q):
        out = blocks.clone()
        v = q.to(torch.uint8).reshape(-1, 8, 32)  # [n, sub-block j, l]
        low = (v & 0xF).reshape(-1, 4, 2, 32)
        out[:, 48:176] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
        high = ((v >> 4) & 1).to(torch.int32) << torch.arange(8, dtype=torch.int32).view(1, 8, 1)
        out[:, 16:48] = high.sum(dim=1).to(torch.uint8)  # bit j of qh[l]: weight 32 j + l
        return out


class _GridQ6K(_Grid):
    lo, hi = -32, 31

    @staticmethod
    def step_offset(blocks):
        sc = blocks[:, 192:208].contiguous().view(torch.int8).to(_F32)
        d = fp16_from_bytes(blocks[:, 208:210])
        step = _expand(d * sc, 16)
        return step, torch.zeros_like(step)

    @staticmethod
    def with_codes(blocks, q):
        out = blocks.clone()
        u = (q + 32).to(torch.uint8).reshape(-1, 2, 4, 32)  # [n, half, quarter, l]
        lo, hi = u & 0xF, u >> 4
        ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2)
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        out[:, 0:128] = ql.reshape(-1, 128)
        out[:, 128:192] = qh.reshape(-1, 64)
        return out


class _GridQ4_0(_Grid):
    lo, hi = 0, 15

    @staticmethod
    def step_offset(blocks):
        d = fp16_from_bytes(blocks[:, 0:2])
        step = d.expand(-1, 32)
        return step, -8.0 * step

    @staticmethod
    def with_codes(blocks, q):
        out = blocks.clone()
        v = q.to(torch.uint8).reshape(-1, 2, 16)
        out[:, 2:18] = v[:, 0] | (v[:, 1] << 4)
        return out


class _GridQ8_0(_Grid):
    lo, hi = -127, 127

    @staticmethod
    def step_offset(blocks):
        step = fp16_from_bytes(blocks[:, 0:2]).expand(-1, 32)
        return step, torch.zeros_like(step)

    @staticmethod
    def with_codes(blocks, q):
        out = blocks.clone()
        out[:, 2:34] = q.to(torch.int8).view(torch.uint8)
        return out


GRIDS: dict[GGMLQuantizationType, type[_Grid]] = {
    GGMLQuantizationType.Q4_K: _GridQ4K,
    GGMLQuantizationType.Q5_K: _GridQ5K,
    GGMLQuantizationType.Q6_K: _GridQ6K,
    GGMLQuantizationType.Q4_0: _GridQ4_0,
    GGMLQuantizationType.Q8_0: _GridQ8_0,
}


def supports_feedback(cls: type[GGMLType]) -> bool:
    """Whether error feedback can choose this type's codes."""
    return cls.qtype in GRIDS


def grid_step_offset(cls: type[GGMLType], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-weight step and offset of encoded rows uint8 [m, row_bytes]: float32 [m, k] each."""
    m = rows.shape[0]
    step, offset = GRIDS[cls.qtype].step_offset(rows.reshape(-1, cls.type_size))
    return step.reshape(m, -1), offset.reshape(m, -1)


def rows_with_codes(cls: type[GGMLType], rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Encoded rows uint8 [m, row_bytes] with their codes replaced by q (int [m, k])."""
    m = rows.shape[0]
    blocks = GRIDS[cls.qtype].with_codes(rows.reshape(-1, cls.type_size), q.reshape(-1, cls.block_size))
    return blocks.reshape(m, -1)


def _damped_float64(hessian: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    """H in float64 with dead channels given the mean diagonal, plus `damping` x that mean."""
    h = hessian.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = mean
    diag += damping * mean
    return h, mean


def inverse_cholesky_factor(hessian: torch.Tensor, damping: float = 0.01, retries: int = 5) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (float32 [k, k]), H damped by `damping` x its mean diagonal.

    Channels that never carried signal (zero diagonal) get the mean diagonal, so they take
    no feedback and pass none on. An H that does not factor gets ten times more damping, up
    to `retries` times."""
    # Every step works in place on one float64 matrix: at 12288 inputs each copy is 1.2 GB.
    h, mean = _damped_float64(hessian, damping)
    info = torch.empty((), dtype=torch.int32)
    for attempt in range(retries + 1):
        torch.linalg.cholesky_ex(h, out=(h, info))
        if int(info) == 0:
            break
        if attempt == retries:
            raise ValueError(f"second-moment matrix [{h.shape[0]}, {h.shape[1]}] does not factor even with "
                             f"{retries} times more damping (non-finite calibration statistics?)")
        del h
        h, mean = _damped_float64(hessian, damping)
        torch.diagonal(h).add_(damping * mean * 10 * (attempt + 1))
    torch.cholesky_inverse(h, out=h)
    torch.linalg.cholesky(h, upper=True, out=h)
    return h.to(_F32)


def _feedback_columns(
    block: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, ub: torch.Tensor, grid: type[_Grid]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of a column block [m, n] (updated in place), column by column with feedback inside
    the block; returns (codes int32 [m, n], scaled errors [m, n]) for the feedback beyond it."""
    live = step != 0
    safe = torch.where(live, step, torch.ones_like(step))
    codes = torch.empty(block.shape, dtype=torch.int32)
    errors = torch.empty_like(block)
    dead_code = float(max(grid.lo, 0))
    for i in range(block.shape[1]):
        col = block[:, i]
        q = torch.round((col - offset[:, i]) / safe[:, i]).clamp_(grid.lo, grid.hi)
        q = torch.where(live[:, i], q, torch.full_like(q, dead_code))
        err = (col - (step[:, i] * q + offset[:, i])) / ub[i, i]
        if i + 1 < block.shape[1]:
            block[:, i + 1 :].sub_(err.unsqueeze(1) * ub[i, i + 1 :].unsqueeze(0))
        codes[:, i] = q.to(torch.int32)
        errors[:, i] = err
    return codes, errors


def quantize_with_feedback(
    cls: type[GGMLType],
    weight: torch.Tensor,
    hinv_factor: torch.Tensor,
    importance: torch.Tensor | None = None,
    chunk_weights: int = CHUNK_WEIGHTS,
) -> torch.Tensor:
    """Encode a float32 [m, k] weight in `cls` with GPTQ error feedback; uint8 [m, row_bytes].

    `hinv_factor` is `inverse_cholesky_factor(H)`; `importance` [k] (optional) weights the
    stock encoder's header search, run on each span of columns as feedback has left it."""
    grid = GRIDS[cls.qtype]
    m, k = weight.shape
    span = SPAN if k % SPAN == 0 else cls.block_size
    out = torch.empty((m, cls.row_bytes(k)), dtype=torch.uint8)
    u = hinv_factor.to(_F32)
    step_rows = max(1, chunk_weights // k)
    for r0 in range(0, m, step_rows):
        w = weight[r0 : r0 + step_rows].to(_F32).clone()
        for a in range(0, k, span):
            b = a + span
            block = w[:, a:b]
            imatrix = None if importance is None else importance[a:b]
            header = cls.quantize_rows(block.contiguous(), imatrix)
            step, offset = grid_step_offset(cls, header)
            codes, errors = _feedback_columns(block, step, offset, u[a:b, a:b], grid)
            if b < k:
                w[:, b:].sub_(errors @ u[a:b, b:])
            out[r0 : r0 + step_rows, a * cls.type_size // cls.block_size : b * cls.type_size // cls.block_size] = (
                rows_with_codes(cls, header, codes)
            )
    return out


def activation_order(hessian: torch.Tensor) -> torch.Tensor:
    """Columns by descending H diagonal: the channels that carry most signal are quantized first."""
    return torch.argsort(torch.diagonal(hessian), descending=True, stable=True)


def permuted(hessian: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """H with rows and columns taken in `order` (one k x k copy alive at a time)."""
    rows = hessian.index_select(0, order)
    return rows.index_select(1, order)


def quantize_with_feedback_ordered(
    cls: type[GGMLType],
    weight: torch.Tensor,
    hinv_factor: torch.Tensor,
    order: torch.Tensor,
    importance: torch.Tensor | None = None,
    batch: int = 128,
    chunk_weights: int = CHUNK_WEIGHTS,
) -> torch.Tensor:
    """GPTQ with columns in `order` (e.g. `activation_order`), `hinv_factor` the
    `inverse_cholesky_factor` of H permuted to that order; headers fixed beforehand by the
    stock encoder on the original weight, since a block's columns no longer come together."""
    grid = GRIDS[cls.qtype]
    m, k = weight.shape
    u = hinv_factor.to(_F32)
    out = torch.empty((m, cls.row_bytes(k)), dtype=torch.uint8)
    step_rows = max(1, chunk_weights // k)
    for r0 in range(0, m, step_rows):
        rows = weight[r0 : r0 + step_rows].to(_F32)
        header = cls.quantize_rows(rows.contiguous(), importance)
        step, offset = grid_step_offset(cls, header)
        w = rows[:, order].clone()
        step, offset = step[:, order], offset[:, order]
        codes = torch.empty(w.shape, dtype=torch.int32)
        for a in range(0, k, batch):
            b = min(k, a + batch)
            codes[:, a:b], errors = _feedback_columns(w[:, a:b], step[:, a:b], offset[:, a:b], u[a:b, a:b], grid)
            if b < k:
                w[:, b:].sub_(errors @ u[a:b, b:])
        natural = torch.empty_like(codes)
        natural[:, order] = codes
        out[r0 : r0 + step_rows] = rows_with_codes(cls, header, natural)
    return out
