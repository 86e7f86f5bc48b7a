"""Calibration: run the model and record what every nn.Linear sees at its input.

Per linear input channel (keyed by canonical module name; q/k/v share the `attention.qkv`
input and w1/w3 share the `feed_forward.w1` input, so each is recorded once):

* absmax, overall and per timestep bin (SmoothQuant, and to see how activations move
  along the sampling schedule);
* sum of squares and token count (E[x^2]: the importance matrix of GGUF K-quants);
* a bounded uniform sample of input rows (to search alpha and measure quantization error).

Per block, the energy of the residual stream entering it and of what its attention and
MLP branches add: a block linear's error reaches the stream scaled by that ratio.

Rows the model masks out carry no information and are skipped: text positions at
`input_proj` and `final_layer.linear`, image positions at `llm_cond_proj`, and padding
positions everywhere (their outputs never reach an image token).

Row sampling is bottom-k by a random key per row, each key drawn from a stream seeded by
(seed, input, branch, forward call, module). A row's key does not depend on which process
saw it or in what order, so shards merge exactly: keep the k smallest keys of the union.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .errors import IdeoquantError
from .inventory import BRANCH_ALIASES, ModelDims, expected_tensors, to_canonical_name, to_layout_names
from .source import BranchSource, Source, open_source
from .writers.files import OutputSet
from .writers.safetensors import save_safetensors

log = logging.getLogger("ideoquant")

STATS_FORMAT = "ideoquant-calibration"
STATS_VERSION = 1
METADATA_KEY = "ideoquant.calibration"
# Equal-width bins over model time t in [0, 1] (0 = noise, 1 = clean).
TIMESTEP_BINS = 5
DEFAULT_MAX_SAMPLES = 512
# Square image size when neither the command nor the prompt file gives one.
DEFAULT_RESOLUTION = 1024
# Sampled rows in bf16: the compute dtype on real weights, and half the file of float32.
SAMPLE_DTYPE = torch.bfloat16
# Elements per vectorized chunk when accumulating statistics of one forward call.
CHUNK_ELEMENTS = 1 << 24
# Indicator values of the packed sequence (diffusers transformer_ideogram4).
IMAGE_INDICATOR = 2
TEXT_INDICATOR = 3
IMAGE_POSITION_OFFSET = 65536
# Which rows of a linear's input carry information.
IMAGE_ROWS = ("input_proj", "final_layer.linear")
TEXT_ROWS = ("llm_cond_proj",)
FIELDS = ("absmax", "sumsq", "count", "bin_absmax", "bin_count", "samples", "sample_keys")
ENERGY_FIELD = "energy"


def statistics_key(module: str) -> str:
    """The canonical module whose recorded input a linear (canonical or diffusers name) uses."""
    canonical, _ = to_canonical_name(module + ".weight")
    canonical = canonical[: -len(".weight")]
    if canonical.endswith("feed_forward.w3"):
        return canonical[: -len("w3")] + "w1"
    return canonical


def _stable_int(*parts: object) -> int:
    """A 63-bit integer from the parts, identical on every machine and process."""
    digest = hashlib.blake2b("|".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def timestep_bin_edges(bins: int = TIMESTEP_BINS) -> list[float]:
    """The bin edges over t in [0, 1]."""
    return [i / bins for i in range(bins + 1)]


# --- per-linear statistics ---------------------------------------------------------------

@dataclass
class LinearStatistics:
    """What one linear saw at its input, summed over every recorded row."""

    absmax: torch.Tensor  # float32 [in]
    sumsq: torch.Tensor  # float64 [in]
    count: int
    bin_absmax: torch.Tensor  # float32 [bins, in]
    bin_count: torch.Tensor  # int64 [bins]
    samples: torch.Tensor  # SAMPLE_DTYPE [k, in], sorted by key
    sample_keys: torch.Tensor  # float64 [k], ascending

    @classmethod
    def empty(
        cls, in_features: int, bins: int = TIMESTEP_BINS, device: torch.device | str = "cpu"
    ) -> "LinearStatistics":
        """Statistics of a linear that has seen nothing yet."""
        return cls(
            absmax=torch.zeros(in_features, dtype=torch.float32, device=device),
            sumsq=torch.zeros(in_features, dtype=torch.float64, device=device),
            count=0,
            bin_absmax=torch.zeros((bins, in_features), dtype=torch.float32, device=device),
            bin_count=torch.zeros(bins, dtype=torch.int64, device=device),
            samples=torch.zeros((0, in_features), dtype=SAMPLE_DTYPE),
            sample_keys=torch.zeros(0, dtype=torch.float64),
        )

    @property
    def in_features(self) -> int:
        """Input width of the linear."""
        return self.absmax.shape[0]

    def importance(self) -> torch.Tensor:
        """E[x^2] per input channel (float32)."""
        return (self.sumsq / max(self.count, 1)).to(torch.float32)

    def update(self, rows: torch.Tensor, keys: torch.Tensor, bins: torch.Tensor, max_samples: int) -> None:
        """Add rows [n, in] with their sampling keys [n] and timestep bins [n]."""
        if rows.shape[0] == 0:
            return
        bins = bins.to(rows.device)
        step = max(1, CHUNK_ELEMENTS // rows.shape[1])
        for start in range(0, rows.shape[0], step):
            x = rows[start : start + step].to(torch.float32)
            b = bins[start : start + step]
            a = x.abs()
            self.absmax = torch.maximum(self.absmax, a.amax(dim=0))
            # Squares of float32 values are exact in float64: only the sums round.
            self.sumsq += x.to(torch.float64).square().sum(dim=0)
            for bin_index in torch.unique(b).tolist():
                peak = a[b == bin_index].amax(dim=0)
                self.bin_absmax[bin_index] = torch.maximum(self.bin_absmax[bin_index], peak)
        self.count += rows.shape[0]
        self.bin_count += torch.bincount(bins, minlength=self.bin_count.shape[0]).to(self.bin_count.device)
        self._add_samples(rows, keys, max_samples)

    def _add_samples(self, rows: torch.Tensor, keys: torch.Tensor, max_samples: int) -> None:
        if len(self.sample_keys) >= max_samples:
            candidates = torch.nonzero(keys < self.sample_keys[max_samples - 1]).squeeze(1)
        else:
            candidates = torch.arange(keys.shape[0])
        if candidates.numel() == 0:
            return
        if candidates.numel() > max_samples:
            order = torch.argsort(keys[candidates], stable=True)[:max_samples]
            candidates = candidates[order]
        new_rows = rows[candidates.to(rows.device)].to(device="cpu", dtype=SAMPLE_DTYPE)
        all_keys = torch.cat([self.sample_keys, keys[candidates]])
        self._keep_smallest(all_keys, torch.cat([self.samples, new_rows]), max_samples)

    def _keep_smallest(self, keys: torch.Tensor, rows: torch.Tensor, max_samples: int) -> None:
        order = torch.argsort(keys, stable=True)[:max_samples]
        self.sample_keys = keys[order].contiguous()
        self.samples = rows[order].contiguous()

    def merge(self, other: "LinearStatistics", max_samples: int) -> None:
        """Fold another shard's statistics of the same linear into this one."""
        if other.in_features != self.in_features:
            raise IdeoquantError(f"cannot merge statistics of widths {self.in_features} and {other.in_features}")
        self.absmax = torch.maximum(self.absmax, other.absmax.to(self.absmax.device))
        self.sumsq = self.sumsq + other.sumsq.to(self.sumsq.device)
        self.count += other.count
        self.bin_absmax = torch.maximum(self.bin_absmax, other.bin_absmax.to(self.bin_absmax.device))
        self.bin_count = self.bin_count + other.bin_count.to(self.bin_count.device)
        self._keep_smallest(
            torch.cat([self.sample_keys, other.sample_keys]), torch.cat([self.samples, other.samples]), max_samples
        )

    def to(self, device: torch.device | str) -> "LinearStatistics":
        """The same statistics with the summaries on `device` (samples stay on the CPU)."""
        return LinearStatistics(
            self.absmax.to(device), self.sumsq.to(device), self.count, self.bin_absmax.to(device),
            self.bin_count.to(device), self.samples, self.sample_keys,
        )

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The safetensors entries of these statistics under `prefix`."""
        cpu = self.to("cpu")
        return {
            f"{prefix}/absmax": cpu.absmax.contiguous(),
            f"{prefix}/sumsq": cpu.sumsq.contiguous(),
            f"{prefix}/count": torch.tensor([cpu.count], dtype=torch.int64),
            f"{prefix}/bin_absmax": cpu.bin_absmax.contiguous(),
            f"{prefix}/bin_count": cpu.bin_count.contiguous(),
            f"{prefix}/samples": cpu.samples.contiguous(),
            f"{prefix}/sample_keys": cpu.sample_keys.contiguous(),
        }


@dataclass
class CalibrationStatistics:
    """Statistics of every recorded linear, per branch, with the run's provenance."""

    branches: dict[str, dict[str, LinearStatistics]]
    metadata: dict
    # branch -> "layers.N" -> float64 [3]: summed squares of the residual entering the block
    # and of what its attention and MLP branches add (content rows).
    energies: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def max_samples(self) -> int:
        """Rows kept per linear when the file was written."""
        return int(self.metadata.get("max_samples", DEFAULT_MAX_SAMPLES))

    def branch(self, name: str) -> dict[str, LinearStatistics]:
        """The statistics of one branch ({} when the file has none for it)."""
        return self.branches.get(name, {})

    def get(self, branch: str, module: str) -> LinearStatistics | None:
        """The statistics a linear (canonical or diffusers name) uses, or None."""
        return self.branch(branch).get(statistics_key(module))

    def save(self, path: Path, overwrite: bool = False) -> Path:
        """Write one safetensors file (JSON provenance in its metadata)."""
        tensors: dict[str, torch.Tensor] = {}
        for branch, modules in self.branches.items():
            for module, stats in modules.items():
                if stats.count:
                    tensors.update(stats.tensors(f"{branch}/{module}"))
        for branch, blocks in self.energies.items():
            for block, energy in blocks.items():
                if float(energy[0]) > 0:
                    tensors[f"{branch}/{block}/{ENERGY_FIELD}"] = energy.to("cpu", torch.float64).contiguous()
        outputs = OutputSet(overwrite=overwrite)
        save_safetensors(outputs, Path(path), tensors, {METADATA_KEY: json.dumps(self.metadata, sort_keys=True)})
        return Path(path)


def _read_metadata(handle, path: Path) -> dict:
    raw = (handle.metadata() or {}).get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
        raise IdeoquantError(f"{path}: not an ideoquant calibration statistics file")
    if int(meta.get("version", 0)) > STATS_VERSION:
        raise IdeoquantError(f"{path}: statistics format version {meta['version']} is newer than this ideoquant reads")
    return meta


def _open_statistics(path: Path):
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise IdeoquantError(f"{path}: no such statistics file")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise IdeoquantError(f"{path}: not a safetensors file ({str(e).splitlines()[0]})") from None


def load_statistics(path: str | Path, branches: Iterable[str] | None = None) -> CalibrationStatistics:
    """Read a statistics file (optionally only some branches)."""
    path = Path(path)
    handle = _open_statistics(path)
    meta = _read_metadata(handle, path)
    wanted = set(branches) if branches is not None else None
    fields: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    energies: dict[str, dict[str, torch.Tensor]] = {}
    for name in handle.keys():
        branch, _, rest = name.partition("/")
        module, _, fld = rest.rpartition("/")
        if fld not in FIELDS + (ENERGY_FIELD,) or not module:
            raise IdeoquantError(f"{path}: unexpected tensor {name!r}")
        if wanted is not None and branch not in wanted:
            continue
        if fld == ENERGY_FIELD:
            energies.setdefault(branch, {})[module] = handle.get_tensor(name)
        else:
            fields.setdefault((branch, module), {})[fld] = handle.get_tensor(name)
    result: dict[str, dict[str, LinearStatistics]] = {}
    for (branch, module), f in fields.items():
        missing = [x for x in FIELDS if x not in f]
        if missing:
            raise IdeoquantError(f"{path}: {branch}/{module} lacks {', '.join(missing)}")
        result.setdefault(branch, {})[module] = LinearStatistics(
            absmax=f["absmax"], sumsq=f["sumsq"], count=int(f["count"][0]), bin_absmax=f["bin_absmax"],
            bin_count=f["bin_count"], samples=f["samples"], sample_keys=f["sample_keys"],
        )
    return CalibrationStatistics(result, meta, energies)


def residual_gains(energies: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per block linear: RMS of what its branch adds to the residual stream over the residual's RMS.

    A relative output error e of such a linear changes the stream by about e * gain; the
    linears outside the blocks (input_proj, llm_cond_proj, final_layer.linear) write the
    stream or the velocity directly, gain 1.
    """
    gains: dict[str, float] = {}
    for block, energy in energies.items():
        residual = float(energy[0])
        if residual <= 0:
            continue
        attention, mlp = (float(energy[1]) / residual) ** 0.5, (float(energy[2]) / residual) ** 0.5
        gains[f"{block}.attention.qkv"] = gains[f"{block}.attention.o"] = attention
        for name in ("w1", "w2", "w3"):
            gains[f"{block}.feed_forward.{name}"] = mlp
    return gains


def load_importance(stats_path: str | Path, canonical_module: str, branch: str = "transformer") -> torch.Tensor | None:
    """E[x^2] per input channel of a linear (float32 [in]), or None where it has no statistics."""
    path = Path(stats_path)
    handle = _open_statistics(path)
    _read_metadata(handle, path)
    prefix = f"{branch}/{statistics_key(canonical_module)}"
    names = set(handle.keys())
    if f"{prefix}/sumsq" not in names:
        return None
    count = int(handle.get_tensor(f"{prefix}/count")[0])
    if count == 0:
        return None
    return (handle.get_tensor(f"{prefix}/sumsq") / count).to(torch.float32)


def merge_statistics(paths: list[str | Path], out: str | Path, overwrite: bool = False) -> CalibrationStatistics:
    """Merge statistics files of the same weights (max, sums, bottom-k samples) into one file."""
    if not paths:
        raise IdeoquantError("calibrate merge needs at least one statistics file")
    merged = load_statistics(paths[0])
    meta = dict(merged.metadata)
    for path in paths[1:]:
        # One shard in memory at a time besides the running merge.
        shard = load_statistics(path)
        other = shard.metadata
        for key in ("timestep_bins", "max_samples"):
            if other.get(key) != meta.get(key):
                raise IdeoquantError(f"{path}: {key} {other.get(key)} differs from {meta.get(key)}; cannot merge")
        for branch, checksum in other.get("checksums", {}).items():
            known = meta.get("checksums", {}).get(branch)
            if known is not None and known != checksum:
                raise IdeoquantError(f"{path}: collected on different {branch} weights than {paths[0]}")
        overlap = set(meta.get("inputs", [])) & set(other.get("inputs", []))
        if overlap:
            raise IdeoquantError(f"{path}: shares {len(overlap)} inputs with an earlier shard (would count them twice)")
        for branch, modules in shard.branches.items():
            target = merged.branches.setdefault(branch, {})
            for module, stats in modules.items():
                if module in target:
                    target[module].merge(stats, merged.max_samples)
                else:
                    target[module] = stats
        for branch, blocks in shard.energies.items():
            target_energy = merged.energies.setdefault(branch, {})
            for block, energy in blocks.items():
                target_energy[block] = target_energy.get(block, torch.zeros_like(energy)) + energy
        meta["checksums"] = {**meta.get("checksums", {}), **other.get("checksums", {})}
        meta["inputs"] = list(meta.get("inputs", [])) + list(other.get("inputs", []))
        meta["runs"] = list(meta.get("runs", [])) + list(other.get("runs", []))
        meta["branches"] = sorted(set(meta.get("branches", [])) | set(other.get("branches", [])))
    merged.metadata = meta
    merged.save(Path(out), overwrite=overwrite)
    return merged


# --- the model, loaded from the source reader ------------------------------------------------

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


def _transformer_config(bs: BranchSource) -> dict:
    config = bs.dims.to_config()
    for key in ("rope_theta", "mrope_section", "norm_eps"):
        if bs.config and key in bs.config:
            config[key] = bs.config[key]
    return config


def _read_fp8(bs: BranchSource, canonical: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A linear's stored FP8 weight and per-row float32 scale, or None if it is not FP8."""
    names = to_layout_names(canonical, bs.layout)
    if any(bs.stored[n].dtype != torch.float8_e4m3fn for n in names):
        return None
    weights, scales = [], []
    for n in names:
        w, s = bs.read_stored(n)
        s = s.reshape(-1)
        weights.append(w.view(torch.uint8))
        scales.append(s.expand(w.shape[0]) if s.numel() == 1 else s)
    return torch.cat(weights).view(torch.float8_e4m3fn), torch.cat(scales)


def transformer_from_tensors(
    config: dict | ModelDims,
    read: Callable[[str], torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A diffusers Ideogram 4 transformer filled from canonical tensors (`read(name)` -> float)."""
    from .runtime.common import assign_tensor, build_meta_transformer, materialize_rotary

    model = build_meta_transformer(config)
    dims = _dims_of(model)
    for spec in expected_tensors(dims):
        tensor = read(spec.name).to(device=device, dtype=dtype)
        names = to_layout_names(spec.name, "diffusers")
        for name, part in zip(names, tensor.chunk(len(names), dim=0)):
            assign_tensor(model, name, part.contiguous())
    materialize_rotary(model, device)
    return model.eval()


def _dims_of(model: nn.Module) -> ModelDims:
    c = model.config
    return ModelDims(
        in_channels=c.in_channels, hidden=c.attention_head_dim * c.num_attention_heads, head_dim=c.attention_head_dim,
        intermediate=c.intermediate_size, adaln_dim=c.adaln_dim, llm_features=c.llm_features_dim, num_layers=c.num_layers,
    )


def load_source_transformer(
    bs: BranchSource, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, keep_fp8: bool = True
) -> nn.Module:
    """The branch as a diffusers model, read tensor by tensor; FP8 linears stay FP8 (FP8Linear) when asked."""
    from .runtime.common import assign_tensor, build_meta_transformer, materialize_rotary, meta_leftovers, set_module

    model = build_meta_transformer(_transformer_config(bs))
    for spec in expected_tensors(bs.dims):
        names = to_layout_names(spec.name, "diffusers")
        fp8 = _read_fp8(bs, spec.name) if keep_fp8 and spec.kind == "linear" else None
        if fp8 is not None:
            weight, scale = fp8
            for i, name in enumerate(names):
                rows = slice(i * weight.shape[0] // len(names), (i + 1) * weight.shape[0] // len(names))
                module = FP8Linear(weight[rows].contiguous().to(device), scale[rows].contiguous().to(device))
                set_module(model, name[: -len(".weight")], module)
            continue
        tensor = bs.read_float32(spec.name).to(device=device, dtype=dtype)
        for name, part in zip(names, tensor.chunk(len(names), dim=0)):
            assign_tensor(model, name, part.contiguous())
    materialize_rotary(model, device)
    missing = meta_leftovers(model)
    if missing:
        raise IdeoquantError(f"{bs.branch}: transformer tensors left unloaded: {', '.join(missing[:5])}")
    return model.eval()


# --- recording -------------------------------------------------------------------------------

def recorded_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical statistics key -> the diffusers module whose input is recorded (one per shared input)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not hasattr(module, "in_features") or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if not name or "rotary" in name:
            continue
        canonical, part = to_canonical_name(name + ".weight")
        if part not in (None, 0):
            continue  # to_k / to_v: same input as to_q
        key = statistics_key(canonical[: -len(".weight")])
        if key == canonical[: -len(".weight")]:
            found[key] = module
    return found


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
        dims = _dims_of(model)
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
        gen = torch.Generator().manual_seed(_stable_int(self.seed, self.input_id, branch, call, module))
        return torch.rand(n, generator=gen, dtype=torch.float64)


# --- inputs ----------------------------------------------------------------------------------

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
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise IdeoquantError(f"{path}: cannot read prompts ({e.strerror})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
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


def synthetic_calls(
    dims: ModelDims, index: int, seed: int, steps: int, resolution: int, text_tokens: int, branch: str
) -> Iterator[dict[str, torch.Tensor]]:
    """Forward inputs of one synthetic sample: `steps` noisy latents at times spread over [0, 1]."""
    grid = resolution // 16
    gen = torch.Generator().manual_seed(_stable_int(seed, "synthetic", index))
    # One heavy-tailed channel profile for every seed and input, as one text encoder would give.
    profile = torch.Generator().manual_seed(_stable_int("text channel profile", dims.llm_features))
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


# --- distributed reduction -------------------------------------------------------------------

def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed under torchrun when it is not yet."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce_statistics(stats: dict[str, dict[str, LinearStatistics]], energies: dict[str, dict[str, torch.Tensor]],
                       max_samples: int) -> None:
    """Combine every rank's statistics in place (max, sums, bottom-k samples)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for branch in sorted(energies):
        for block in sorted(energies[branch]):
            total = energies[branch][block].to(comm)
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            energies[branch][block] = total.to(energies[branch][block].device)
    for branch in sorted(stats):
        for module in sorted(stats[branch]):
            s = stats[branch][module]
            absmax, sumsq, bin_absmax = s.absmax.to(comm), s.sumsq.to(comm), s.bin_absmax.to(comm)
            counts = torch.cat([torch.tensor([s.count]), s.bin_count.cpu()]).to(comm)
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX)
            dist.all_reduce(bin_absmax, op=dist.ReduceOp.MAX)
            dist.all_reduce(sumsq, op=dist.ReduceOp.SUM)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            keys = torch.full((max_samples,), math.inf, dtype=torch.float64)
            rows = torch.zeros((max_samples, s.in_features), dtype=torch.float32)
            keys[: len(s.sample_keys)] = s.sample_keys
            rows[: len(s.sample_keys)] = s.samples.to(torch.float32)
            all_keys = [torch.empty_like(keys, device=comm) for _ in range(world)]
            all_rows = [torch.empty_like(rows, device=comm) for _ in range(world)]
            dist.all_gather(all_keys, keys.to(comm))
            dist.all_gather(all_rows, rows.to(comm))
            gathered_keys = torch.cat(all_keys).cpu()
            gathered_rows = torch.cat(all_rows).cpu().to(SAMPLE_DTYPE)
            real = torch.isfinite(gathered_keys)
            s.absmax = absmax.to(s.absmax.device)
            s.sumsq = sumsq.to(s.sumsq.device)
            s.bin_absmax = bin_absmax.to(s.bin_absmax.device)
            counts = counts.cpu()
            s.count = int(counts[0])
            s.bin_count = counts[1:].to(s.bin_count.device)
            s._keep_smallest(gathered_keys[real], gathered_rows[real], max_samples)


# --- the command -----------------------------------------------------------------------------

def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def calibrate(
    src: str | Path,
    out: str | Path,
    *,
    prompts: str | Path | None = None,
    synthetic: bool = False,
    steps: int = 20,
    resolution: int | None = None,
    seed: int = 0,
    branches: str = "both",
    synthetic_inputs: int = 8,
    text_tokens: int = 64,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    max_sequence_length: int = 2048,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    offload: bool | None = None,
    keep_fp8: bool | None = None,
    shard: tuple[int, int] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> CalibrationStatistics:
    """Run the model over prompts (full pipeline) or synthetic inputs and write the statistics file.

    `shard=(i, n)` keeps every n-th input from the i-th, for runs on separate machines that
    `merge_statistics` combines later; under torchrun the ranks split the inputs further.
    """
    if (prompts is None) == (not synthetic):
        raise IdeoquantError("calibrate needs exactly one of --prompts FILE or --synthetic")
    if steps < 1:
        raise IdeoquantError(f"--steps must be at least 1, not {steps}")
    if resolution is not None and (resolution < 16 or resolution % 16):
        raise IdeoquantError(f"--resolution must be a positive multiple of 16, not {resolution}")
    if branches not in BRANCH_ALIASES:
        raise IdeoquantError(f"--branches must be cond, uncond or both, not {branches!r}")
    shard_index, shard_count = shard or (0, 1)
    if not 0 <= shard_index < shard_count:
        raise IdeoquantError(f"shard {shard_index} of {shard_count} does not exist")
    out = Path(out)
    rank, world = _distributed()
    device = torch.device(device) if device is not None else _default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # FP8 kept in memory where it matters (GPU); on the CPU, fp8 -> float per forward is slow.
    keep_fp8 = device.type == "cuda" if keep_fp8 is None else keep_fp8
    if out.exists() and not overwrite:
        raise IdeoquantError(f"{out} already exists (use --overwrite to replace it)")
    wanted = BRANCH_ALIASES[branches]
    # The prompt path runs both transformers (guidance mixes them), whatever is recorded.
    source = open_source(src, "both" if prompts is not None else branches)
    collector = StatisticsCollector(seed, max_samples, device=device)

    if prompts is not None:
        records = read_prompts(prompts)[shard_index::shard_count]
        ids = [r.id for r in records]
        _run_pipeline(source, collector, wanted, records[rank::world], steps, resolution, seed, device, dtype,
                      max_sequence_length, offload, keep_fp8, quiet or rank != 0)
        run = {"mode": "prompts", "prompts_file": str(prompts), "prompts": [r.text for r in records], "steps": steps,
               "resolution": resolution or "per prompt", "seed": seed, "max_sequence_length": max_sequence_length}
    else:
        chosen = list(range(synthetic_inputs))[shard_index::shard_count]
        ids = [f"synthetic:{seed}:{i}" for i in chosen]
        mine = list(zip(chosen, ids))[rank::world]
        for branch in wanted:
            _run_synthetic(source.branches[branch], collector, mine, steps, resolution or DEFAULT_RESOLUTION,
                           text_tokens, seed, device, dtype, keep_fp8, quiet or rank != 0)
        run = {"mode": "synthetic", "prompts": None, "inputs": len(chosen), "steps": steps,
               "resolution": resolution or DEFAULT_RESOLUTION, "seed": seed, "text_tokens": text_tokens}
    run["shard"] = [shard_index, shard_count]
    collector.detach()
    stats = {b: collector.stats.get(b, {}) for b in wanted}
    energies = {b: collector.energies.get(b, {}) for b in wanted}
    if world > 1:
        _reduce_statistics(stats, energies, max_samples)
    stats = {b: {k: v.to("cpu") for k, v in modules.items() if v.count} for b, modules in stats.items()}
    energies = {b: {k: v.cpu() for k, v in blocks.items()} for b, blocks in energies.items()}
    run.update({"world_size": world, "dtype": str(dtype).replace("torch.", "")})
    metadata = {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "source": source.name,
        "checksums": {b: source.branches[b].checksum() for b in wanted},
        "branches": list(wanted),
        "timestep_bins": timestep_bin_edges(),
        "max_samples": max_samples,
        "sample_dtype": str(SAMPLE_DTYPE).replace("torch.", ""),
        "inputs": ids,
        "runs": [run],
    }
    result = CalibrationStatistics(stats, metadata, energies)
    if rank == 0:
        result.save(out, overwrite=overwrite)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result


def calibrate_synthetic(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A quick synthetic calibration (demo and tests): small images, a few timesteps; returns `out`."""
    calibrate(src, out, synthetic=True, steps=4, resolution=128, synthetic_inputs=4, text_tokens=16,
              max_samples=256, overwrite=overwrite, quiet=True)
    return Path(out)


def _progress(total: int, quiet: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="input", disable=quiet)


@torch.no_grad()
def _run_synthetic(bs: BranchSource, collector: StatisticsCollector, inputs: list[tuple[int, str]], steps: int,
                   resolution: int, text_tokens: int, seed: int, device: torch.device, dtype: torch.dtype,
                   keep_fp8: bool, quiet: bool) -> None:
    model = load_source_transformer(bs, device=device, dtype=dtype, keep_fp8=keep_fp8)
    collector.attach(model, bs.branch)
    with _progress(len(inputs), quiet, bs.branch) as bar:
        for index, input_id in inputs:
            collector.begin_input(input_id)
            for call in synthetic_calls(bs.dims, index, seed, steps, resolution, text_tokens, bs.branch):
                call = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in call.items()}
                model(**call, return_dict=False)
            bar.update(1)
    collector.detach()
    del model


@torch.no_grad()
def _run_pipeline(source: Source, collector: StatisticsCollector, wanted: tuple[str, ...],
                  prompts: list[CalibrationPrompt],
                  steps: int, resolution: int | None, seed: int, device: torch.device, dtype: torch.dtype,
                  max_sequence_length: int, offload: bool | None, keep_fp8: bool, quiet: bool) -> None:
    from diffusers import Ideogram4Pipeline

    if source.repo_id is None and not (source.root / "model_index.json").is_file():
        raise IdeoquantError(
            f"{source.origin}: --prompts needs a pipeline folder (model_index.json, text_encoder/, tokenizer/)"
        )
    offload = device.type == "cuda" if offload is None else offload
    load_device = torch.device("cpu") if offload else device
    models = {b: load_source_transformer(source.branches[b], load_device, dtype, keep_fp8) for b in source.branches}
    try:
        pipe = Ideogram4Pipeline.from_pretrained(
            source.repo_id or str(source.root), transformer=models["transformer"],
            unconditional_transformer=models["unconditional_transformer"], torch_dtype=dtype,
        )
    except (OSError, ValueError) as e:
        raise IdeoquantError(f"{source.origin}: cannot load the pipeline ({str(e).splitlines()[0]})") from None
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for branch in wanted:
        collector.attach(models[branch], branch)
    with _progress(len(prompts), quiet, "prompts") as bar:
        for p in prompts:
            collector.begin_input(p.id)
            generator = torch.Generator().manual_seed(_stable_int(seed, p.id if p.seed is None else p.seed))
            height = resolution or p.height or DEFAULT_RESOLUTION
            width = resolution or p.width or DEFAULT_RESOLUTION
            pipe(
                prompt=p.text, height=height, width=width, num_inference_steps=steps,
                guidance_schedule=guidance_schedule(steps), max_sequence_length=max_sequence_length,
                generator=generator, output_type="latent",
            )
            bar.update(1)
    collector.detach()
