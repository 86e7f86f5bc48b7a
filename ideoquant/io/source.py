"""Stage 1: read the source weights, one tensor at a time, from memory-mapped safetensors.

One reader serves every output format. It accepts a pipeline folder, a branch folder, a
single `.safetensors` file, a sharded checkpoint with its index, or a Hub repo id; detects
the fused or diffusers layout and FP8 weight scales; validates the whole inventory before
anything is written; and hands out canonical (fused) tensors in float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..codecs.fp8 import fp8_has_nan, fp8_to_float32
from ..errors import IdeoquantError
from ..model.inventory import (
    BRANCH_ALIASES,
    BRANCHES,
    CONFIG_KEYS,
    IDENTIFYING_TENSOR,
    Layout,
    ModelDims,
    detect_layout,
    expected_tensors,
    to_canonical_name,
    to_layout_names,
)
from .safetensors_reader import SafetensorsFile, StoredTensor

log = logging.getLogger("ideoquant")

FLOAT_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)
SCALE_SUFFIX = ".weight_scale"
# Companion tensors other FP8 exporters add; read past, never reported as unknown.
KNOWN_COMPANIONS = (SCALE_SUFFIX, ".input_scale")
HUB_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class BranchSource:
    """One branch of a checkpoint: its files, layout and dims; tensors out by canonical name."""

    branch: str
    files: list[SafetensorsFile]
    config: dict | None = None
    origin: str = ""
    prefix: str = ""
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._checksum = ""
        self._checksum_lock = threading.Lock()
        self.stored: dict[str, StoredTensor] = {}
        for f in self.files:
            for name, t in f.tensors.items():
                if self.prefix:
                    if not name.startswith(self.prefix):
                        continue
                    name = name[len(self.prefix) :]
                if name in self.stored:
                    raise IdeoquantError(f"tensor {name!r} appears in both {self.stored[name].file.path} and {f.path}")
                self.stored[name] = t
        try:
            self.layout: Layout = detect_layout(self.stored)
        except ValueError as e:
            raise IdeoquantError(f"{self.origin}: {e}") from None
        self.dims = self._infer_dims()
        self.specs = {s.name: s for s in expected_tensors(self.dims)}

    # --- inventory -----------------------------------------------------------------------
    def _shape_of(self, canonical: str) -> tuple[int, ...]:
        names = to_layout_names(canonical, self.layout)
        if any(n not in self.stored for n in names):
            raise IdeoquantError(f"{self.branch}: missing tensor {names[0]}")
        shapes = [self.stored[n].shape for n in names]
        if len(shapes) == 1:
            return shapes[0]
        return (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])

    def _infer_dims(self) -> ModelDims:
        """Dims from tensor shapes, cross-checked with config.json when present."""
        if IDENTIFYING_TENSOR not in self.stored:
            raise IdeoquantError(f"{self.origin}: not an Ideogram 4 checkpoint (no {IDENTIFYING_TENSOR})")
        layers = {int(m.group(1)) for n in self.stored if (m := re.match(r"layers\.(\d+)\.", n))}
        if not layers:
            raise IdeoquantError(f"{self.branch}: no transformer blocks (layers.N.*) found")
        in_proj = self._shape_of("input_proj.weight")
        dims = ModelDims(
            in_channels=in_proj[1],
            hidden=in_proj[0],
            head_dim=self._shape_of("layers.0.attention.norm_q.weight")[0],
            intermediate=self._shape_of("layers.0.feed_forward.w1.weight")[0],
            adaln_dim=self._shape_of("adaln_proj.weight")[0],
            llm_features=self._shape_of("llm_cond_norm.weight")[0],
            num_layers=max(layers) + 1,
        )
        if dims.head_dim == 0 or dims.hidden % dims.head_dim:
            raise IdeoquantError(f"{self.branch}: hidden width {dims.hidden} is not a multiple of head width {dims.head_dim}")
        if self.config:
            for key, attr in CONFIG_KEYS.items():
                if key in self.config and int(self.config[key]) != getattr(dims, attr):
                    raise IdeoquantError(
                        f"{self.branch}: config.json {key}={self.config[key]} but tensors say {getattr(dims, attr)}"
                    )
            heads = self.config.get("num_attention_heads")
            if heads is not None and int(heads) != dims.num_heads:
                raise IdeoquantError(f"{self.branch}: config.json num_attention_heads={heads} but tensors say {dims.num_heads}")
        return dims

    def validate(self) -> None:
        """Check every expected tensor is present with its exact shape; FP8 weights need scales."""
        seen: set[str] = set()
        for spec in self.specs.values():
            names = to_layout_names(spec.name, self.layout)
            for n in names:
                if n not in self.stored:
                    raise IdeoquantError(f"{self.branch}: missing tensor {n}")
                seen.add(n)
            shape = self._shape_of(spec.name)
            if shape != spec.shape:
                raise IdeoquantError(f"{self.branch}: tensor {names[0]} has shape {list(shape)}, expected {list(spec.shape)}")
            for n in names:
                t = self.stored[n]
                if t.dtype not in FLOAT_WEIGHT_DTYPES:
                    raise IdeoquantError(f"{self.branch}: tensor {n} has unsupported dtype {t.dtype}")
                if t.dtype == torch.float8_e4m3fn:
                    self._check_scale(n, t)
        for n in self.stored:
            if n in seen or n.endswith(KNOWN_COMPANIONS):
                continue
            msg = f"{self.branch}: unknown extra tensor {n} (ignored)"
            self.warnings.append(msg)
            log.warning(msg)

    def _check_scale(self, weight_name: str, t: StoredTensor) -> None:
        scale_name = weight_name[: -len(".weight")] + SCALE_SUFFIX
        if scale_name not in self.stored:
            raise IdeoquantError(f"{self.branch}: FP8 weight {weight_name} has no {scale_name}")
        shape = self.stored[scale_name].shape
        if shape not in ((), (1,), (t.shape[0],), (t.shape[0], 1)):
            raise IdeoquantError(
                f"{self.branch}: {scale_name} has shape {list(shape)}; expected [], [1], [{t.shape[0]}] or [{t.shape[0]}, 1]"
            )

    @property
    def source_dtype(self) -> str:
        """The dtype of the linear weights ("float8_e4m3fn", "bfloat16", ...)."""
        t = self.stored[to_layout_names("layers.0.feed_forward.w1.weight", self.layout)[0]]
        return str(t.dtype).replace("torch.", "")

    def stored_nbytes(self, canonical: str) -> int:
        """Bytes the source holds for a canonical tensor (with its FP8 scales)."""
        total = 0
        for n in to_layout_names(canonical, self.layout):
            total += self.stored[n].nbytes
            scale = n[: -len(".weight")] + SCALE_SUFFIX
            if n.endswith(".weight") and scale in self.stored:
                total += self.stored[scale].nbytes
        return total

    # --- reading -------------------------------------------------------------------------
    def iter_float32_rows(self, canonical: str, chunk_weights: int = 1 << 21) -> Iterator[torch.Tensor]:
        """A canonical tensor as float32 row chunks of bounded size (FP8 dequantized as
        w.float() * scale); NaN/Inf anywhere is an error naming the tensor."""
        for name in to_layout_names(canonical, self.layout):
            raw, scale = self.read_stored(name)
            if raw.dtype == torch.float8_e4m3fn and fp8_has_nan(raw):
                self._raise_not_finite(canonical)
            rows = raw.reshape(-1, raw.shape[-1]) if raw.dim() > 1 else raw.reshape(1, -1)
            step = max(1, chunk_weights // max(rows.shape[1], 1))
            for start in range(0, rows.shape[0], step):
                if scale is None:
                    chunk = rows[start : start + step].to(torch.float32)
                    if not torch.isfinite(chunk).all():
                        self._raise_not_finite(canonical)
                    yield chunk
                    continue
                chunk_scale = scale[start : start + step, None] if scale.dim() == 1 else scale
                if not torch.isfinite(chunk_scale).all():
                    self._raise_not_finite(canonical)
                yield fp8_to_float32(rows[start : start + step], chunk_scale)

    def read_float32(self, canonical: str) -> torch.Tensor:
        """A whole canonical tensor in float32 (see `iter_float32_rows`)."""
        return torch.cat(list(self.iter_float32_rows(canonical))).reshape(self.specs[canonical].shape)

    def read_stored(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A tensor as stored, by its layout name, and for FP8 its float32 scale ([rows] or a
        scalar); for callers that keep FP8 weights as FP8."""
        t = self.stored[name]
        w = t.file.read(t.name)
        if t.dtype != torch.float8_e4m3fn:
            return w, None
        s = self.stored[name[: -len(".weight")] + SCALE_SUFFIX]
        scale = s.file.read(s.name).to(torch.float32)
        return w, (scale.reshape(-1) if scale.numel() > 1 else scale.reshape(()))

    def _raise_not_finite(self, canonical: str) -> None:
        """Name the tensor and count its NaN/Inf values (read again: this is the error path)."""
        bad = 0
        for name in to_layout_names(canonical, self.layout):
            raw, scale = self.read_stored(name)
            if raw.dtype == torch.float8_e4m3fn:
                # e4m3fn has no infinities; NaN is the all-ones exponent and mantissa, either sign.
                bad += int(torch.count_nonzero((raw.view(torch.uint8) & 0x7F) == 0x7F))
                bad += int(torch.count_nonzero(~torch.isfinite(scale)))
            else:
                bad += int(torch.count_nonzero(~torch.isfinite(raw.float())))
        raise IdeoquantError(f"{self.branch}: tensor {canonical} has {bad} NaN/Inf values")

    def checksum(self) -> str:
        """sha256 over the branch's files, in order (streamed, bounded memory; computed once)."""
        with self._checksum_lock:
            if not self._checksum:
                h = hashlib.sha256()
                for f in self.files:
                    with open(f.path, "rb") as fh:
                        while chunk := fh.read(16 << 20):
                            h.update(chunk)
                self._checksum = h.hexdigest()
        return self._checksum

    @property
    def total_weights(self) -> int:
        return sum(s.numel for s in self.specs.values())


# --- locating the files of each branch -----------------------------------------------------

def _branch_files(folder: Path) -> list[Path]:
    """The safetensors files of a branch folder, honouring (or skipping a stale) index."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    singles = sorted(folder.glob("*.safetensors"))
    if indexes:
        index = indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise IdeoquantError(f"{index}: malformed safetensors index") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not missing:
            return [folder / s for s in shards]
        whole = [p for p in singles if p.name not in shards]
        if len(whole) == 1:
            log.warning("%s names missing files (%s); using %s", index.name, ", ".join(missing), whole[0].name)
            return whole
        raise IdeoquantError(f"{index}: shard {missing[0]} is missing")
    if not singles:
        raise IdeoquantError(f"{folder}: no .safetensors files")
    return singles


def _read_config(folder: Path) -> dict | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise IdeoquantError(f"{path}: config.json is not valid JSON") from None


def _guess_branch(path: Path) -> str:
    return "unconditional_transformer" if "uncond" in path.name.lower() else "transformer"


def _detect_prefix(files: list[SafetensorsFile]) -> str:
    """A common name prefix (e.g. `model.diffusion_model.`) that some exporters add."""
    for f in files:
        for name in f.tensors:
            if name.endswith(IDENTIFYING_TENSOR):
                return name[: -len(IDENTIFYING_TENSOR)]
    return ""


def _open_branch(branch: str, paths: list[Path], config: dict | None, origin: str) -> BranchSource:
    files = [SafetensorsFile(p) for p in paths]
    return BranchSource(branch, files, config=config, origin=origin, prefix=_detect_prefix(files))


def download_from_hub(repo_id: str, branches: tuple[str, ...]) -> Path:
    """Fetch only the branch folders (plus index, card, licence) of a Hub repo into the HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["model_index.json", "README.md", "LICENSE*"] + [f"{b}/*" for b in branches]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise IdeoquantError(f"{repo_id}: not in the local Hugging Face cache and offline mode is on") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise IdeoquantError(f"{repo_id}: download failed ({str(e).splitlines()[0]})") from None


@dataclass
class Source:
    """The branches selected from a source path or repo id."""

    origin: str
    root: Path
    branches: dict[str, BranchSource]
    repo_id: str | None = None

    @property
    def name(self) -> str:
        return self.repo_id or self.root.name


def open_source(src: str | Path, branches: str = "both") -> Source:
    """Resolve SRC (pipeline folder, branch folder, file, sharded folder or repo id) to branches."""
    try:
        wanted = BRANCH_ALIASES[branches]
    except KeyError:
        raise IdeoquantError(f"--branches must be cond, uncond or both, not {branches!r}") from None
    path = Path(src)
    repo_id = None
    if not path.exists():
        if isinstance(src, str) and HUB_REPO_RE.match(src) and not src.startswith((".", "/")):
            repo_id = src
            path = download_from_hub(src, wanted)
        else:
            raise IdeoquantError(f"{src}: no such file or folder")
    origin = str(src)
    found: dict[str, BranchSource] = {}
    # A lone branch is the one its name suggests, unless --branches names exactly one.
    lone_branch = wanted[0] if len(wanted) == 1 else _guess_branch(path)
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            raise IdeoquantError(f"{path}: not a .safetensors file")
        found[lone_branch] = _open_branch(lone_branch, [path], None, origin)
    elif (path / "model_index.json").is_file() or any((path / b).is_dir() for b in BRANCHES):
        for b in wanted:
            folder = path / b
            if not folder.is_dir():
                raise IdeoquantError(f"{path}: pipeline folder has no {b}/")
            found[b] = _open_branch(b, _branch_files(folder), _read_config(folder), origin)
    else:
        found[lone_branch] = _open_branch(lone_branch, _branch_files(path), _read_config(path), origin)
    if not found:
        raise IdeoquantError(f"{src}: none of the requested branches ({branches}) is in this source")
    for bs in found.values():
        bs.validate()
    return Source(origin=origin, root=path, branches=found, repo_id=repo_id)


__all__ = [
    "BranchSource",
    "SafetensorsFile",
    "Source",
    "open_source",
    "to_canonical_name",
]
