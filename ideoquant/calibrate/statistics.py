"""The calibration statistics file: per-linear input statistics, merged across shards."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from ..errors import IdeoquantError, printable
from ..io.input_files import json_int, json_list, json_str, json_str_map, parse_json, show
from ..io.safetensors_reader import SafetensorsFile
from ..io.safetensors_writer import save_safetensors
from ..io.staging import OutputSet
from ..model.inventory import to_canonical_name

STATS_FORMAT = "ideoquant-calibration"


STATS_VERSION = 1


METADATA_KEY = "ideoquant.calibration"


# Equal-width bins over model time t in [0, 1] (0 = noise, 1 = clean).
TIMESTEP_BINS = 5


DEFAULT_MAX_SAMPLES = 512


# Sampled rows in bf16: the compute dtype on real weights, and half the file of float32.
SAMPLE_DTYPE = torch.bfloat16


FIELDS = ("absmax", "sumsq", "count", "bin_absmax", "bin_count", "samples", "sample_keys")


ENERGY_FIELD = "energy"

# Elements per vectorized chunk when accumulating statistics of one forward call.
CHUNK_ELEMENTS = 1 << 24


def statistics_key(module: str) -> str:
    """The canonical module whose recorded input a linear (canonical or diffusers name) uses."""
    canonical, _ = to_canonical_name(module + ".weight")
    canonical = canonical[: -len(".weight")]
    if canonical.endswith("feed_forward.w3"):
        return canonical[: -len("w3")] + "w1"
    return canonical


def stable_int(*parts: object) -> int:
    """A 63-bit integer from the parts, identical on every machine and process."""
    digest = hashlib.blake2b("|".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def timestep_bin_edges(bins: int = TIMESTEP_BINS) -> list[float]:
    """The bin edges over t in [0, 1]."""
    return [i / bins for i in range(bins + 1)]


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


def _read_metadata(handle: SafetensorsFile, path: Path) -> dict:
    """The provenance record of a statistics file, every field it is read by type-checked."""
    where = f"{show(path)}: metadata {METADATA_KEY}"
    raw = handle.metadata.get(METADATA_KEY)
    meta = parse_json(raw, where) if raw else None
    if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
        raise IdeoquantError(f"{show(path)}: not an ideoquant calibration statistics file")
    version = json_int(meta.get("version", 0), f"{where}: version")
    if version > STATS_VERSION:
        raise IdeoquantError(f"{show(path)}: statistics format version {version} is newer than this ideoquant reads")
    json_int(meta.get("max_samples", DEFAULT_MAX_SAMPLES), f"{where}: max_samples", minimum=1)
    json_str_map(meta.get("checksums", {}), f"{where}: checksums")
    for key in ("inputs", "runs", "branches", "timestep_bins"):
        if key in meta:
            json_list(meta[key], f"{where}: {key}")
    for item in meta.get("branches", []):
        json_str(item, f"{where}: branches entry")
    return meta


def _open_statistics(path: Path) -> SafetensorsFile:
    path = Path(path)
    if not path.exists():
        raise IdeoquantError(f"{show(path)}: no such statistics file")
    # The project's strict reader (regular files only, validated header, no memory map).
    return SafetensorsFile(path)


def load_statistics(path: str | Path, branches: Iterable[str] | None = None) -> CalibrationStatistics:
    """Read a statistics file (optionally only some branches)."""
    path = Path(path)
    handle = _open_statistics(path)
    meta = _read_metadata(handle, path)
    wanted = set(branches) if branches is not None else None
    fields: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    energies: dict[str, dict[str, torch.Tensor]] = {}
    for name in handle.tensors:
        branch, _, rest = name.partition("/")
        module, _, fld = rest.rpartition("/")
        if fld not in FIELDS + (ENERGY_FIELD,) or not module:
            raise IdeoquantError(f"{show(path)}: unexpected tensor {printable(repr(name))}")
        if wanted is not None and branch not in wanted:
            continue
        if fld == ENERGY_FIELD:
            energies.setdefault(branch, {})[module] = handle.read(name)
        else:
            fields.setdefault((branch, module), {})[fld] = handle.read(name)
    result: dict[str, dict[str, LinearStatistics]] = {}
    for (branch, module), f in fields.items():
        missing = [x for x in FIELDS if x not in f]
        if missing:
            raise IdeoquantError(f"{show(path)}: {printable(branch)}/{printable(module)} lacks {', '.join(missing)}")
        if f["count"].numel() != 1:
            raise IdeoquantError(f"{show(path)}: {printable(branch)}/{printable(module)}/count must hold one number")
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
    if f"{prefix}/sumsq" not in handle.tensors or f"{prefix}/count" not in handle.tensors:
        return None
    count_tensor = handle.read(f"{prefix}/count")
    if count_tensor.numel() != 1:
        raise IdeoquantError(f"{show(path)}: {prefix}/count must hold one number")
    count = int(count_tensor.reshape(-1)[0])
    if count == 0:
        return None
    return (handle.read(f"{prefix}/sumsq") / count).to(torch.float32)


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
