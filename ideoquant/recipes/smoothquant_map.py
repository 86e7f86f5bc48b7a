"""The SmoothQuant fold map as data: which linears share an input and where each 1/s folds."""

from __future__ import annotations

from dataclasses import dataclass

from ..model.inventory import ModelDims

# Linears with no producing op to fold into: quantized unsmoothed or kept, never smoothed.
UNFOLDABLE = ("input_proj", "final_layer.linear")


@dataclass(frozen=True)
class FoldTarget:
    """Where 1/s goes: a norm weight vector, or a row range of a linear weight."""

    tensor: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class SmoothGroup:
    """Linears sharing one input (and so one s), with the fold target of 1/s."""

    name: str
    linears: tuple[str, ...]
    fold: FoldTarget


def smoothing_groups(dims: ModelDims) -> list[SmoothGroup]:
    """Every foldable input of a branch, per the fold table of the recipe."""
    H, F = dims.hidden, dims.intermediate
    groups = [SmoothGroup("llm_cond_proj", ("llm_cond_proj",), FoldTarget("llm_cond_norm.weight"))]
    for i in range(dims.num_layers):
        p = f"layers.{i}."
        groups += [
            SmoothGroup(p + "attention.qkv", (p + "attention.qkv",), FoldTarget(p + "attention_norm1.weight")),
            SmoothGroup(p + "attention.o", (p + "attention.o",), FoldTarget(p + "attention.qkv.weight", (2 * H, 3 * H))),
            SmoothGroup(
                p + "feed_forward.w1+w3", (p + "feed_forward.w1", p + "feed_forward.w3"), FoldTarget(p + "ffn_norm1.weight")
            ),
            SmoothGroup(p + "feed_forward.w2", (p + "feed_forward.w2",), FoldTarget(p + "feed_forward.w3.weight", (0, F))),
        ]
    return groups


# A converted INT8 folder keeps each branch's factors here, so that the smoothed weights can
# be rebuilt from the source (`verify --source`) and the recipe reproduced.
FACTORS_FOLDER = "smoothquant"
