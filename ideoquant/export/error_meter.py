"""Relative error of a quantized tensor against its source, accumulated chunk by chunk."""

from __future__ import annotations

import torch


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| in float64 (0 for an all-zero tensor reproduced exactly)."""
    return ErrorMeter().add(approx, exact).relative()


class ErrorMeter:
    """Accumulates ||approx - exact||^2 and ||exact||^2 over chunks, summed in float64 (a
    float64 pass costs more than the quantization; one float32 dot over hundreds of
    millions of values drifts, so dots run over pieces of 1 M values)."""

    PIECE = 1 << 20

    def __init__(self) -> None:
        self.err_sq = 0.0
        self.ref_sq = 0.0

    @classmethod
    def sum_of_squares(cls, values: torch.Tensor) -> float:
        """sum(values^2) of a flat float32 tensor, accurate to float32 rounding per piece."""
        return sum(float(torch.dot(p, p)) for p in values.split(cls.PIECE))

    def add(self, approx: torch.Tensor, exact: torch.Tensor) -> "ErrorMeter":
        """Add one chunk (neither input is modified: either may still be queued for writing)."""
        self.ref_sq += self.sum_of_squares(exact.reshape(-1))
        # One fused pass with cascade summation: no difference tensor, no float32 drift.
        self.err_sq += float(torch.nn.functional.mse_loss(approx, exact, reduction="sum"))
        return self

    def relative(self) -> float:
        """The relative error of everything added."""
        if self.ref_sq == 0:
            return 0.0 if self.err_sq == 0 else float("inf")
        return (self.err_sq / self.ref_sq) ** 0.5
