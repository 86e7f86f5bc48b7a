"""The packed text+image token sequence the transformer takes, and velocity inputs built on it.

The layout is diffusers' own (`Ideogram4Pipeline._prepare_ids`): per prompt
`[left padding][text tokens][image tokens]`, text positions 0..n-1 on all three rotary axes,
image positions (0, h, w) + IMAGE_POSITION_OFFSET, one attention segment per prompt and the
indicator values of `transformer_ideogram4`, whose constants are re-exported here.
"""

from __future__ import annotations

from typing import Mapping

import torch
from diffusers.models.transformers.transformer_ideogram4 import (
    IMAGE_POSITION_OFFSET,
    LLM_TOKEN_INDICATOR,
    OUTPUT_IMAGE_INDICATOR,
    SEQUENCE_PADDING_INDICATOR,
)

IMAGE_INDICATOR = OUTPUT_IMAGE_INDICATOR
TEXT_INDICATOR = LLM_TOKEN_INDICATOR


def packed_sequence(
    text_lengths: list[int] | tuple[int, ...], grid_h: int, grid_w: int, max_text_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """position_ids [B, S, 3], segment_ids [B, S] and indicator [B, S] of a batch packed as
    `[left-pad][text][image]` with S = max_text_tokens + grid_h * grid_w."""
    lengths = torch.tensor(list(text_lengths), dtype=torch.long)
    if bool((lengths < 0).any()) or bool((lengths > max_text_tokens).any()):
        raise ValueError(f"text lengths {list(text_lengths)} must lie in 0..{max_text_tokens}")
    batch, n_img = len(lengths), grid_h * grid_w
    j = torch.arange(max_text_tokens + n_img)[None, :]
    offset = (max_text_tokens - lengths)[:, None]
    is_text = (j >= offset) & (j < max_text_tokens)
    is_image = (j >= max_text_tokens).expand(batch, -1)
    h = torch.arange(grid_h).repeat_interleave(grid_w)
    w = torch.arange(grid_w).repeat(grid_h)
    image_pos = torch.stack([torch.zeros_like(h), h, w], dim=1) + IMAGE_POSITION_OFFSET
    text_pos = torch.where(is_text, j - offset, 0)[..., None].expand(batch, -1, 3).clone()
    text_pos[:, max_text_tokens:] = image_pos
    segment_ids = torch.where(is_text | is_image, 1, SEQUENCE_PADDING_INDICATOR)
    indicator = torch.where(is_text, LLM_TOKEN_INDICATOR, torch.where(is_image, OUTPUT_IMAGE_INDICATOR, 0))
    return text_pos, segment_ids, indicator


def packed_layout(text_tokens: int, grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """position_ids, segment_ids and indicator of one unpadded [text][image] sequence on a square grid."""
    return packed_sequence([text_tokens], grid, grid, text_tokens)


def velocity_inputs(
    model_config: Mapping,
    text_lengths: list[int] | tuple[int, ...] = (5, 3),
    grid: tuple[int, int] = (4, 4),
    max_text_tokens: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    unconditional: bool = False,
) -> dict[str, torch.Tensor]:
    """Inputs of one denoising call, packed as the pipeline packs them: `[left-pad][text][image]`.

    With `unconditional`, only the image region with zero text features (as the pipeline
    feeds the unconditional transformer).
    """
    gen = torch.Generator().manual_seed(seed)
    batch = len(text_lengths)
    gh, gw = grid
    n_img = gh * gw
    in_ch = int(model_config["in_channels"])
    llm = int(model_config["llm_features_dim"])
    position_ids, segment_ids, indicator = packed_sequence(text_lengths, gh, gw, max_text_tokens)
    latents = torch.randn(batch, n_img, in_ch, generator=gen)
    text = torch.randn(batch, max_text_tokens, llm, generator=gen)
    pad = torch.arange(max_text_tokens)[None, :] < (max_text_tokens - torch.tensor(text_lengths))[:, None]
    text[pad] = 0.0
    timestep = torch.rand(batch, generator=gen) * 0.9 + 0.05
    if unconditional:
        inputs = {
            "hidden_states": latents,
            "encoder_hidden_states": torch.zeros(batch, n_img, llm),
            "position_ids": position_ids[:, max_text_tokens:],
            "segment_ids": segment_ids[:, max_text_tokens:],
            "indicator": indicator[:, max_text_tokens:],
        }
    else:
        inputs = {
            "hidden_states": torch.cat([torch.zeros(batch, max_text_tokens, in_ch), latents], dim=1),
            "encoder_hidden_states": torch.cat([text, torch.zeros(batch, n_img, llm)], dim=1),
            "position_ids": position_ids,
            "segment_ids": segment_ids,
            "indicator": indicator,
        }
    inputs["timestep"] = timestep
    out = {}
    for k, v in inputs.items():
        v = v.to(device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out
