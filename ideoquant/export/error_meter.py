"""Relative error of a quantized tensor against its source, accumulated chunk by chunk, and
the check that every stored value decodes to a finite number."""

from __future__ import annotations

import math

import torch

from ..codecs.ggml.base import GGMLType
from ..errors import IdeoquantError


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| in float64 (0 for an all-zero tensor reproduced exactly)."""
    return ErrorMeter().add(approx, exact).relative()


def require_finite(
    name: str, stored_as: str, decoded: torch.Tensor, source: torch.Tensor | None = None, hint: str = ""
) -> None:
    """Refuse an output tensor holding Inf/NaN once decoded: an error naming the tensor, the
    type that overflowed, and (given the source values) whether the source itself did."""
    bad = int(torch.count_nonzero(~torch.isfinite(decoded)))
    if not bad:
        return
    if source is not None and not bool(torch.isfinite(source).all()):
        raise IdeoquantError(
            f"tensor {name}: {int(torch.count_nonzero(~torch.isfinite(source)))} source values overflow float32 "
            f"when decoded (weight times scale beyond 3.4e38)"
        )
    largest = f" (largest source magnitude {float(source.abs().max()):.4g})" if source is not None else ""
    raise IdeoquantError(f"tensor {name}: {bad} values overflow {stored_as} and would be stored as Inf/NaN{largest}{hint}")


class ErrorMeter:
    """Accumulates ||approx - exact||^2 and ||exact||^2 over chunks, summed in float64 (a
    float64 pass costs more than the quantization; one float32 dot over hundreds of
    millions of values drifts, so dots run over pieces of 1 M values).

    Given a tensor `name`, every chunk's decoded values are also checked finite: a
    non-finite sum of squares (free to see) triggers the exact check. `add_encoded` takes
    ggml blocks instead of decoded values, and sums in float64 in C++ where the type has an
    error kernel (a non-finite sum there sends the chunk through `add`)."""

    PIECE = 1 << 20

    def __init__(self, name: str | None = None, stored_as: str = "", hint: str = "") -> None:
        self.name = name
        self.stored_as = stored_as
        self.hint = hint
        self.err_sq = 0.0
        self.ref_sq = 0.0

    @classmethod
    def sum_of_squares(cls, values: torch.Tensor) -> float:
        """sum(values^2) of a flat float32 tensor, accurate to float32 rounding per piece."""
        return sum(float(torch.dot(p, p)) for p in values.split(cls.PIECE))

    def add(self, approx: torch.Tensor, exact: torch.Tensor) -> "ErrorMeter":
        """Add one chunk (neither input is modified: either may still be queued for writing)."""
        ref_sq = self.sum_of_squares(exact.reshape(-1))
        # One fused pass with cascade summation: no difference tensor, no float32 drift.
        err_sq = float(torch.nn.functional.mse_loss(approx, exact, reduction="sum"))
        if not (math.isfinite(err_sq) and math.isfinite(ref_sq)):
            if self.name is not None:
                require_finite(self.name, self.stored_as, approx, exact, self.hint)
            # Finite values too large for float32 squares: the (rare) chunk again in float64.
            exact64 = exact.reshape(-1).to(torch.float64)
            ref_sq = float(exact64.square().sum())
            err_sq = float((approx.reshape(-1).to(torch.float64) - exact64).square().sum())
        self.ref_sq += ref_sq
        self.err_sq += err_sq
        return self

    def add_encoded(self, cls: type[GGMLType], data: torch.Tensor, exact: torch.Tensor) -> "ErrorMeter":
        """Add one chunk of rows `exact` encoded as `data` in ggml type `cls`: measured by the
        type's error kernel where it has one (no decoded copy), else decoded and added."""
        sums = cls.error_sums(data, exact)
        if sums is not None and all(math.isfinite(v) for v in sums):
            self.err_sq += sums[0]
            self.ref_sq += sums[1]
            return self
        # No kernel, or a non-finite decode: the decoded values name the problem.
        return self.add(cls.dequantize_rows(data), exact)

    def relative(self) -> float:
        """The relative error of everything added."""
        if self.ref_sq == 0:
            return 0.0 if self.err_sq == 0 else float("inf")
        return (self.err_sq / self.ref_sq) ** 0.5
