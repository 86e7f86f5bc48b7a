"""W8A8 numerics: int8 weights per output channel, int8 activations per token, the int32 GEMM.

This is the definition the converter quantizes against and the runtime computes with:

* weights: symmetric per output channel, scale = row absmax / 127, q = round(w / scale)
  (round half to even, as `torch.round` and the compressed-tensors compressor);
* activations: symmetric per token, computed at run time, scale = token absmax / 127;
* y = (q_x @ q_w^T in int32) * scale_x * scale_w^T + bias.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
# Smallest scale used for an all-zero row or token: keeps q = x / scale finite (q = 0).
MIN_SCALE = 1e-12
# Rows per vectorized chunk when quantizing large weights (bounds the float32 temporaries).
QUANT_CHUNK_ELEMENTS = 1 << 24
# K-slices of the exact fallback GEMM: partial sums of <= 1024 products of |q| <= 127
# stay below 2**24, so float32 accumulates them exactly.
FALLBACK_K_CHUNK = 1024


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (int8 [out, in], float32 scale [out, 1])."""
    out_features, in_features = weight.shape
    q = torch.empty((out_features, in_features), dtype=torch.int8, device=weight.device)
    scale = torch.empty((out_features, 1), dtype=torch.float32, device=weight.device)
    step = max(1, QUANT_CHUNK_ELEMENTS // max(1, in_features))
    for start in range(0, out_features, step):
        rows = weight[start : start + step].to(torch.float32)
        s = rows.abs().amax(dim=1, keepdim=True).clamp_min(MIN_SCALE) / INT8_MAX
        q[start : start + step] = torch.round(rows / s).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        scale[start : start + step] = s
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weight from int8 codes and per-row scales (for checks, not for inference)."""
    return q.to(torch.float32) * scale.to(torch.float32).reshape(-1, 1)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 per row of a 2-D activation: (int8 [M, K], float32 scale [M, 1])."""
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_SCALE) / INT8_MAX
    q = torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def _int_mm_fallback(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ w^T without `_int_mm`: float32 over K-slices small enough to be exact."""
    out = torch.zeros((a.shape[0], w.shape[0]), dtype=torch.int32, device=a.device)
    for k0 in range(0, a.shape[1], FALLBACK_K_CHUNK):
        k1 = k0 + FALLBACK_K_CHUNK
        part = a[:, k0:k1].to(torch.float32) @ w[:, k0:k1].to(torch.float32).t()
        out += part.to(torch.int32)
    return out


def _cuda_int_mm_ok(k: int, n: int) -> bool:
    # cuBLASLt int8 GEMM in torch needs K and N multiples of 8 (M > 16 is met by padding).
    return k % 8 == 0 and n % 8 == 0


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int32 product a @ w^T of int8 a [M, K] and int8 w [N, K]."""
    m, k = a.shape
    n = w.shape[0]
    if a.is_cuda:
        if not _cuda_int_mm_ok(k, n):
            return _int_mm_fallback(a, w)
        pad = max(0, 17 - m)
        pad += -(m + pad) % 8
        if pad:
            # M <= 16 is refused on CUDA: zero rows are free to add and dropped after.
            a = torch.cat([a, a.new_zeros((pad, k))])
        try:
            return torch._int_mm(a, w.t())[:m]
        except RuntimeError:
            return _int_mm_fallback(a[:m], w)
    try:
        return torch._int_mm(a, w.t())
    except RuntimeError:
        return _int_mm_fallback(a, w)



# Columns per lazy-update block of the error-feedback rounding (the GPTQ paper's B).
ERROR_FEEDBACK_BLOCK = 128
# Damping of the inputs' second-moment matrix, as a fraction of its mean diagonal: the
# calibration sample holds a few hundred rows, fewer than many linears have inputs, so the
# matrix is rank-deficient and its small eigenvalues are noise.
ERROR_FEEDBACK_DAMP = 0.3


def input_second_moment(x: torch.Tensor) -> torch.Tensor:
    """H = X^T X / rows (float64 accumulation, float32 result) of sample rows x [rows, in]."""
    xf = x.to(torch.float64)
    return (xf.t() @ xf / max(1, x.shape[0])).to(torch.float32)


def _upper_inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped H^-1 (dead input channels get a unit diagonal)."""
    # float32 is enough: the damping bounds the condition number by about in / damp.
    h = hessian.to(torch.float32).clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    diag[dead] = 1.0
    diag += damp * float(diag.mean())
    # With J the order reversal and L the lower Cholesky factor of J H J, U = J L^-1 J is upper
    # triangular with U^T U = H^-1: one factorization and one triangular inverse.
    lower = torch.linalg.cholesky(h.flip(0, 1))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)


def quantize_weight_error_feedback(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float = ERROR_FEEDBACK_DAMP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel int8 like `quantize_weight_per_channel` (same scales), with each column's
    rounding error fed back into the columns not yet rounded (GPTQ, Frantar et al. 2022) so that
    ||X W^T - X Q^T|| is small for inputs of second moment `hessian` [in, in]."""
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"second-moment matrix {list(hessian.shape)} does not fit a weight {list(weight.shape)}")
    device = weight.device
    # Columns in order of decreasing input energy: the loudest are rounded while every
    # other column can still absorb their error.
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True).to(device)
    inverse_order = torch.argsort(order)
    u = _upper_inverse_cholesky(hessian.to(device)[order][:, order], damp)
    q = torch.empty((out_features, in_features), dtype=torch.int8, device=device)
    scale = torch.empty((out_features, 1), dtype=torch.float32, device=device)
    step = max(1, QUANT_CHUNK_ELEMENTS // max(1, in_features))
    for start in range(0, out_features, step):
        rows = weight[start : start + step].to(torch.float32)
        s = (rows.abs().amax(dim=1, keepdim=True).clamp_min(MIN_SCALE) / INT8_MAX)[:, 0]
        # Transposed, [in, rows]: each input column is one contiguous row, so the per-column
        # sweep touches contiguous memory.
        w = rows.t()[order].contiguous()
        codes = torch.empty_like(w)
        for c0 in range(0, in_features, ERROR_FEEDBACK_BLOCK):
            c1 = min(c0 + ERROR_FEEDBACK_BLOCK, in_features)
            block = w[c0:c1]
            errors = torch.empty_like(block)
            for i in range(c1 - c0):
                column = block[i]
                code = torch.round(column / s).clamp_(-INT8_MAX, INT8_MAX)
                codes[c0 + i] = code
                err = (column - code * s) / u[c0 + i, c0 + i]
                block[i:].sub_(torch.outer(u[c0 + i, c0 + i : c1], err))
                errors[i] = err
            w[c1:] -= u[c0:c1, c1:].t() @ errors
        q[start : start + step] = codes[inverse_order].t().to(torch.int8)
        scale[start : start + step] = s[:, None]
    return q, scale
