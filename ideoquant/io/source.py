"""Stage 1: read the source weights, one tensor at a time, from safetensors files.

One reader serves every output format. It accepts a pipeline folder, a branch folder, a
single `.safetensors` file, a sharded checkpoint with its index, or a Hub repo id; detects
the fused or diffusers layout and FP8 weight scales; validates the whole inventory before
anything is written; and hands out canonical (fused) tensors in float32.
"""

from __future__ import annotations

import hashlib
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
    Layout,
    check_inventory,
    expected_tensors,
    infer_dims,
    layout_of,
    to_canonical_name,
    to_layout_names,
)
from .input_files import open_regular, show
from .safetensors_reader import SafetensorsFile, StoredTensor
from .tensor_folder import TensorFolder, find_safetensors, read_config

log = logging.getLogger("ideoquant")

FLOAT_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)
SCALE_SUFFIX = ".weight_scale"
# Companion tensors other FP8 exporters add; read past, never reported as unknown.
KNOWN_COMPANIONS = (SCALE_SUFFIX, ".input_scale")
HUB_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class BranchSource:
    """One branch of a checkpoint: its tensors, layout and dims; tensors out by canonical name."""

    branch: str
    stored: TensorFolder
    config: dict | None = None
    origin: str = ""
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._checksum = ""
        self._checksum_lock = threading.Lock()
        self.files = self.stored.files
        self.layout: Layout = layout_of(self.stored, self.origin)
        self.dims = infer_dims(self.stored.shapes(), self.layout, self.branch, self.config)
        self.specs = {s.name: s for s in expected_tensors(self.dims)}

    def validate(self) -> None:
        """Check every expected tensor is present with its exact shape; FP8 weights need scales."""
        extra = set(check_inventory(self.stored.shapes(), self.layout, self.dims, self.branch))
        for name, t in self.stored.items():
            if name in extra:
                continue
            if t.dtype not in FLOAT_WEIGHT_DTYPES:
                raise IdeoquantError(f"{self.branch}: tensor {name} has unsupported dtype {t.dtype}")
            if t.dtype == torch.float8_e4m3fn:
                self._check_scale(name, t)
        for n in self.stored:
            if n not in extra or n.endswith(KNOWN_COMPANIONS):
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
                    with open_regular(f.path) as fh:
                        while chunk := fh.read(16 << 20):
                            h.update(chunk)
                self._checksum = h.hexdigest()
        return self._checksum

    @property
    def total_weights(self) -> int:
        return sum(s.numel for s in self.specs.values())


def _lone_branch(path: Path, wanted: tuple[str, ...], config: dict | None) -> str:
    """The branch a lone branch folder or file holds: what --branches names when it names one,
    else what its folder's name (or config.json `_name_or_path`) says, else the conditional one.
    The file name alone is never trusted: one that suggests `uncond` without its folder or
    config saying so is refused until --branches says which."""
    folder = path.parent if path.is_file() else path
    said = folder.name if folder.name in BRANCHES else None
    named = config.get("_name_or_path") if config else None
    if said is None and isinstance(named, str) and Path(named).name in BRANCHES:
        said = Path(named).name
    if len(wanted) == 1:
        if said is not None and said != wanted[0]:
            log.warning("%s is in a %s folder; reading it as %s, as --branches says", show(path), said, wanted[0])
        return wanted[0]
    if said is not None:
        return said
    if "uncond" in path.name.lower():
        raise IdeoquantError(
            f"{show(path)}: cannot tell which branch this is (its folder and config.json do not say; "
            "the name alone is not trusted): pass --branches uncond or --branches cond"
        )
    return "transformer"


def _open_branch(branch: str, paths: list[Path], config: dict | None, origin: str) -> BranchSource:
    return BranchSource(branch, TensorFolder([SafetensorsFile(p) for p in paths], origin), config=config, origin=origin)


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
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            raise IdeoquantError(f"{path}: not a .safetensors file")
        branch = _lone_branch(path, wanted, read_config(path.parent))
        found[branch] = _open_branch(branch, [path], None, origin)
    elif (path / "model_index.json").is_file() or any((path / b).is_dir() for b in BRANCHES):
        for b in wanted:
            folder = path / b
            if not folder.is_dir():
                raise IdeoquantError(f"{path}: pipeline folder has no {b}/")
            found[b] = _open_branch(b, find_safetensors(folder), read_config(folder), origin)
    else:
        config = read_config(path)
        branch = _lone_branch(path, wanted, config)
        found[branch] = _open_branch(branch, find_safetensors(path), config, origin)
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
