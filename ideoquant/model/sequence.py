"""The packed text+image token sequence the transformer takes, and velocity inputs built on it."""

from __future__ import annotations

from typing import Mapping

import torch


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
    from diffusers import Ideogram4Pipeline

    gen = torch.Generator().manual_seed(seed)
    batch = len(text_lengths)
    gh, gw = grid
    n_img = gh * gw
    in_ch = int(model_config["in_channels"])
    llm = int(model_config["llm_features_dim"])
    position_ids, segment_ids, indicator = Ideogram4Pipeline._prepare_ids(list(text_lengths), gh, gw, max_text_tokens, torch.device("cpu"))
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


# Indicator values of the packed sequence (diffusers transformer_ideogram4).
IMAGE_INDICATOR = 2


TEXT_INDICATOR = 3


IMAGE_POSITION_OFFSET = 65536


def packed_layout(text_tokens: int, grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """position_ids, segment_ids and indicator of one [text][image] sequence, as the pipeline packs it."""
    n_img = grid * grid
    h = torch.arange(grid).repeat_interleave(grid)
    w = torch.arange(grid).repeat(grid)
    image_pos = torch.stack([torch.zeros_like(h), h, w], dim=1) + IMAGE_POSITION_OFFSET
    text_pos = torch.arange(text_tokens)[:, None].expand(text_tokens, 3)
    position_ids = torch.cat([text_pos, image_pos])[None]
    segment_ids = torch.ones((1, text_tokens + n_img), dtype=torch.long)
    indicator = torch.cat([torch.full((text_tokens,), TEXT_INDICATOR), torch.full((n_img,), IMAGE_INDICATOR)])[None]
    return position_ids, segment_ids, indicator
