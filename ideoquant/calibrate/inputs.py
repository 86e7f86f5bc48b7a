"""Calibration inputs: prompt files and synthetic latents at timesteps over the schedule."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import IdeoquantError
from ..io.input_files import MAX_JSON_BYTES, read_limited, show
from ..model.inventory import ModelDims
from ..model.sequence import packed_layout
from .statistics import stable_int


@dataclass(frozen=True)
class CalibrationPrompt:
    """One calibration prompt: a stable id, the text, and the size and seed the file may give."""

    id: str
    text: str
    width: int | None = None
    height: int | None = None
    seed: int | None = None


def read_prompts(path: str | Path) -> list[CalibrationPrompt]:
    """Prompts of a JSON-lines file (field `prompt`), through ideoquant.prompts when present."""
    try:
        from .prompts import load_prompts
    except ImportError:
        load_prompts = None
    if load_prompts is not None:
        # Calibration needs text, not a particular caption schema: free-form prompts are fine.
        records = load_prompts(path, require_caption=False)
        return [
            CalibrationPrompt(_prompt_id(r.id, r.prompt), r.prompt, r.width, r.height, r.seed) for r in records
        ]
    path = Path(path)
    try:
        lines = read_limited(path, MAX_JSON_BYTES, "prompt file").decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise IdeoquantError(f"{show(path)}: not a UTF-8 text file") from None
    except OSError as e:
        raise IdeoquantError(f"{path}: cannot read prompts ({e.strerror})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError):
            raise IdeoquantError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise IdeoquantError(f"{path}:{number}: no string field 'prompt'")
        prompts.append(CalibrationPrompt(_prompt_id(str(item.get("id", number)), item["prompt"]), item["prompt"]))
    if not prompts:
        raise IdeoquantError(f"{path}: no prompts")
    return prompts


def _prompt_id(record_id: str, text: str) -> str:
    # The text digest tells apart equal ids of different files (they would not be the same input).
    return f"prompt:{record_id}:{hashlib.blake2b(text.encode(), digest_size=6).hexdigest()}"


def synthetic_calls(
    dims: ModelDims, index: int, seed: int, steps: int, resolution: int, text_tokens: int, branch: str
) -> Iterator[dict[str, torch.Tensor]]:
    """Forward inputs of one synthetic sample: `steps` noisy latents at times spread over [0, 1]."""
    grid = resolution // 16
    gen = torch.Generator().manual_seed(stable_int(seed, "synthetic", index))
    # One heavy-tailed channel profile for every seed and input, as one text encoder would give.
    profile = torch.Generator().manual_seed(stable_int("text channel profile", dims.llm_features))
    channel_scale = torch.exp(0.8 * torch.randn(dims.llm_features, generator=profile))
    noise = torch.randn((1, grid * grid, dims.in_channels), generator=gen)
    clean = 0.8 * torch.randn((1, grid * grid, dims.in_channels), generator=gen)
    text = torch.randn((1, text_tokens, dims.llm_features), generator=gen) * channel_scale
    offsets = torch.rand(steps, generator=gen)
    position_ids, segment_ids, indicator = packed_layout(text_tokens, grid)
    for j in range(steps):
        t = float((j + offsets[j]) / steps)
        latents = t * clean + (1 - t) * noise
        if branch == "unconditional_transformer":
            # As at inference: image tokens only, zero text features.
            yield {
                "hidden_states": latents,
                "timestep": torch.tensor([t]),
                "encoder_hidden_states": torch.zeros((1, grid * grid, dims.llm_features)),
                "position_ids": position_ids[:, text_tokens:],
                "segment_ids": segment_ids[:, text_tokens:],
                "indicator": indicator[:, text_tokens:],
            }
        else:
            yield {
                "hidden_states": torch.cat([torch.zeros((1, text_tokens, dims.in_channels)), latents], dim=1),
                "timestep": torch.tensor([t]),
                "encoder_hidden_states": torch.cat([text, torch.zeros((1, grid * grid, dims.llm_features))], dim=1),
                "position_ids": position_ids,
                "segment_ids": segment_ids,
                "indicator": indicator,
            }


def guidance_schedule(steps: int) -> list[float]:
    """The presets' guidance: 7 for the main steps, 3 for the last three."""
    polish = min(3, max(steps - 1, 0))
    return [7.0] * (steps - polish) + [3.0] * polish
