"""A linear that keeps its float8_e4m3fn weight and per-row scales, dequantized per forward."""

from __future__ import annotations

import torch
from torch import nn


class FP8Linear(nn.Module):
    """A linear whose float8_e4m3fn weight and per-row scale stay as stored; dequantized per forward."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # Buffers, not parameters: diffusers reads a model's dtype from its first floating parameter.
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.to(torch.float32).reshape(-1))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
