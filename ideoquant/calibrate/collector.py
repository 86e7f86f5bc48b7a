"""Forward hooks that record each linear's input statistics during calibration forwards."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import IdeoquantError
from ..model.inventory import ModelDims, expected_tensors
from ..model.sequence import IMAGE_INDICATOR, TEXT_INDICATOR
from .source_model import recorded_linears
from .statistics import (
    DEFAULT_MAX_SAMPLES,
    TIMESTEP_BINS,
    LinearStatistics,
    stable_int,
)

# Which rows of a linear's input carry information.
IMAGE_ROWS = ("input_proj", "final_layer.linear")


TEXT_ROWS = ("llm_cond_proj",)


def _row_kind(module: str, dims: ModelDims) -> str:
    one_row = {s.module for s in expected_tensors(dims) if s.kind == "linear" and s.rows_per_image == "one_row"}
    if module in one_row:
        return "all"
    if module in IMAGE_ROWS:
        return "image"
    if module in TEXT_ROWS:
        return "text"
    return "content"


@dataclass
class _ForwardState:
    call: int = -1
    token_bins: torch.Tensor | None = None  # [B*L]
    sample_bins: torch.Tensor | None = None  # [B]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)


class StatisticsCollector:
    """Forward hooks that fill LinearStatistics for the linears of one or more branches."""

    def __init__(
        self, seed: int, max_samples: int = DEFAULT_MAX_SAMPLES, bins: int = TIMESTEP_BINS, device: torch.device | str = "cpu"
    ):
        self.seed = seed
        self.max_samples = max_samples
        self.bins = bins
        self.device = torch.device(device)
        self.stats: dict[str, dict[str, LinearStatistics]] = {}
        # Per block: summed squares of [residual entering it, attention branch added, MLP branch added].
        self.energies: dict[str, dict[str, torch.Tensor]] = {}
        self.input_id = ""
        self._state: dict[str, _ForwardState] = {}
        self._handles: list = []

    def attach(self, model: nn.Module, branch: str) -> None:
        """Hook every recorded linear of a branch's model."""
        dims = ModelDims.from_config(model.config)
        self.stats.setdefault(branch, {})
        self._state[branch] = _ForwardState()
        self._handles.append(model.register_forward_pre_hook(self._forward_hook(branch), with_kwargs=True))
        for key, module in recorded_linears(model).items():
            self.stats[branch].setdefault(key, LinearStatistics.empty(module.in_features, self.bins, self.device))
            self._handles.append(module.register_forward_pre_hook(self._linear_hook(branch, key, _row_kind(key, dims))))
        energies = self.energies.setdefault(branch, {})
        for i, block in enumerate(model.layers):
            energy = energies.setdefault(f"layers.{i}", torch.zeros(3, dtype=torch.float64, device=self.device))
            self._handles += self._block_hooks(branch, block, energy)

    def detach(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def begin_input(self, input_id: str) -> None:
        """Start a new calibration input (a prompt or a synthetic sample): restarts call counters."""
        self.input_id = input_id
        for state in self._state.values():
            state.call = -1

    def _forward_hook(self, branch: str):
        def hook(module, args, kwargs):
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            indicator = kwargs.get("indicator", args[5] if len(args) > 5 else None)
            state = self._state[branch]
            state.call += 1
            t = timestep.detach().to(torch.float32)
            t = t if t.dim() == 1 else t[:, -1]
            sample_bins = (t * self.bins).long().clamp_(0, self.bins - 1).to(self.device)
            state.sample_bins = sample_bins
            seq = indicator.shape[1]
            state.token_bins = sample_bins.repeat_interleave(seq)
            flat = indicator.reshape(-1).to(self.device)
            state.masks = {"image": flat == IMAGE_INDICATOR, "text": flat == TEXT_INDICATOR}
            state.masks["content"] = state.masks["image"] | state.masks["text"]

        return hook

    def _block_hooks(self, branch: str, block: nn.Module, energy: torch.Tensor) -> list:
        """Hooks adding a block's residual and branch energies (content rows) into `energy`."""
        gates: dict[str, torch.Tensor] = {}

        def content_square_sum(x: torch.Tensor) -> torch.Tensor:
            rows = x.detach().reshape(-1, x.shape[-1])
            rows = rows[self._state[branch].masks["content"].to(rows.device)]
            return rows.to(torch.float64).square().sum().to(energy.device)

        def residual(module, args):
            energy[0] += content_square_sum(args[0])

        def modulation(module, args, out):
            _, gate_msa, _, gate_mlp = out.detach().chunk(4, dim=-1)
            gates["attention"], gates["mlp"] = torch.tanh(gate_msa), torch.tanh(gate_mlp)

        def added(slot: int, gate: str):
            def hook(module, args, out):
                energy[slot] += content_square_sum(gates[gate] * out)

            return hook

        return [
            block.register_forward_pre_hook(residual),
            block.adaln_modulation.register_forward_hook(modulation),
            block.attention_norm2.register_forward_hook(added(1, "attention")),
            block.ffn_norm2.register_forward_hook(added(2, "mlp")),
        ]

    def _linear_hook(self, branch: str, key: str, kind: str):
        def hook(module, args):
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])
            state = self._state[branch]
            keys = self._keys(branch, state.call, key, rows.shape[0])
            if kind == "all":
                bins = state.sample_bins.repeat_interleave(rows.shape[0] // state.sample_bins.shape[0])
            else:
                mask = state.masks[kind]
                if mask.shape[0] != rows.shape[0]:
                    raise IdeoquantError(f"{branch}: {key} saw {rows.shape[0]} rows for {mask.shape[0]} tokens")
                rows, bins, keys = rows[mask.to(rows.device)], state.token_bins[mask], keys[mask.cpu()]
            self.stats[branch][key].update(rows, keys, bins, self.max_samples)

        return hook

    def _keys(self, branch: str, call: int, module: str, n: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(stable_int(self.seed, self.input_id, branch, call, module))
        return torch.rand(n, generator=gen, dtype=torch.float64)
