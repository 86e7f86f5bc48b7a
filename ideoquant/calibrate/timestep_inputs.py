"""Exact inputs of the timestep-only linears on a dense grid of timesteps.

The timestep MLP (`t_embedding.mlp_in`, `t_embedding.mlp_out`), `adaln_proj` and every
adaLN modulation linear see a function of the timestep alone, one row per image. Their
input at any timestep follows from the weights, so a dense grid over the model's timestep
range gives their whole input distribution. Calibration forwards see only the few
timesteps they ran: error feedback fitted to those rows fits those timesteps and little
else (the sinusoidal embedding's fast channels differ at every other timestep).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..model.build import assign_tensor, build_meta_transformer
from ..model.inventory import ModelDims, expected_tensors
from .statistics import LinearStatistics, TIMESTEP_BINS

# Timesteps of the grid (evenly spaced midpoints over [0, 1]): many more than the widest
# input (3072 on the real model), so the grid spans every direction the embedding takes.
GRID_TIMESTEPS = 8192
# The conditioning path's tensors: all that the inputs depend on.
CONDITIONING_TENSORS = (
    "t_embedding.mlp_in.weight", "t_embedding.mlp_in.bias",
    "t_embedding.mlp_out.weight", "t_embedding.mlp_out.bias",
    "adaln_proj.weight", "adaln_proj.bias",
)
# Rows per forward through the conditioning path (bounds the float32 temporaries).
CHUNK_TIMESTEPS = 1024


def timestep_linears(dims: ModelDims) -> list[str]:
    """Linear modules whose input is a function of the timestep alone (one row per image)."""
    return [s.module for s in expected_tensors(dims) if s.kind == "linear" and s.rows_per_image == "one_row"]


def timestep_grid(n: int = GRID_TIMESTEPS) -> torch.Tensor:
    """n timesteps evenly spaced over [0, 1] (the midpoints of n equal intervals), float32."""
    return (torch.arange(n, dtype=torch.float64) + 0.5).div(n).to(torch.float32)


@torch.no_grad()
def timestep_linear_inputs(
    read: Callable[[str], torch.Tensor], dims: ModelDims, timesteps: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The input rows [n, in] (float32) of every timestep-only linear at the given timesteps.

    `read(name)` gives a canonical tensor in float32. The adaLN modulation linears of every
    block share one input (the same tensor in the result)."""
    model = build_meta_transformer(dims)
    for name in CONDITIONING_TENSORS:
        assign_tensor(model, name, read(name).to(torch.float32))
    seen: dict[str, list[torch.Tensor]] = {"t_embedding.mlp_in": [], "t_embedding.mlp_out": []}
    hooks = [
        getattr(model.t_embedding, part).register_forward_pre_hook(
            lambda _m, args, key=f"t_embedding.{part}": seen[key].append(args[0].detach().clone())
        )
        for part in ("mlp_in", "mlp_out")
    ]
    t_cond, adaln_input = [], []
    try:
        for start in range(0, timesteps.shape[0], CHUNK_TIMESTEPS):
            t = timesteps[start : start + CHUNK_TIMESTEPS].to(torch.float32)
            cond = model.t_embedding(t)
            # As Ideogram4Transformer2DModel.forward: adaln_input = silu(adaln_proj(t_cond)).
            t_cond.append(cond)
            adaln_input.append(F.silu(model.adaln_proj(cond)))
    finally:
        for h in hooks:
            h.remove()
    block_input = torch.cat(adaln_input)
    inputs = {
        "t_embedding.mlp_in": torch.cat(seen["t_embedding.mlp_in"]),
        "t_embedding.mlp_out": torch.cat(seen["t_embedding.mlp_out"]),
        "adaln_proj": torch.cat(t_cond),
        # Ideogram4FinalLayer.forward applies one more silu to the conditioning.
        "final_layer.adaln_modulation": F.silu(block_input),
    }
    for module in timestep_linears(dims):
        if module.endswith(".adaln_modulation") and module.startswith("layers."):
            inputs[module] = block_input
    missing = set(timestep_linears(dims)) - set(inputs)
    assert not missing, f"timestep-only linears without inputs: {sorted(missing)}"
    return inputs


def timestep_statistics(
    read: Callable[[str], torch.Tensor], dims: ModelDims, n: int = GRID_TIMESTEPS
) -> dict[str, LinearStatistics]:
    """Statistics of every timestep-only linear over `n` grid timesteps, every row kept as a sample."""
    timesteps = timestep_grid(n)
    bins = (timesteps * TIMESTEP_BINS).long().clamp_(0, TIMESTEP_BINS - 1)
    keys = torch.arange(n, dtype=torch.float64)
    made: dict[int, LinearStatistics] = {}
    out: dict[str, LinearStatistics] = {}
    for module, rows in timestep_linear_inputs(read, dims, timesteps).items():
        if id(rows) not in made:  # the blocks' modulation linears share one input
            st = LinearStatistics.empty(rows.shape[1])
            st.update(rows, keys, bins, max_samples=n)
            made[id(rows)] = st
        out[module] = made[id(rows)]
    return out
