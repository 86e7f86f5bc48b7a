"""`ideoquant verify`: reopen a converted folder and check it against its card, its report and its source.

Three layers, each one line and a non-zero exit when it fails:
1. files: the model card's file table and `quantization_report.json` list the same files, and
   every file on disk has the listed size and sha256;
2. structure: GGUF files reopen with the expected names, shapes and types (`verify_gguf_file`);
   diffusers folders have a `config.json` with `quantization_config`, safetensors headers that
   parse, an index whose every key exists, and every tensor of the inventory;
3. fidelity (with the source): every output tensor, dequantized with the project's decoders,
   gives the relative error against the source tensor that the report states.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from .. import __version__
from ..codecs.ggml.registry import ggml_type
from ..errors import IdeoquantError
from ..io.input_files import load_json, show
from ..io.safetensors_reader import SafetensorsFile
from ..io.source import BranchSource, open_source
from ..io.staging import PARTIAL_SUFFIX, OutputSet, sha256_file
from ..io.tensor_folder import TensorFolder, read_config
from ..model.inventory import (
    BRANCH_ALIASES,
    ModelDims,
    check_inventory,
    infer_dims,
    layout_of,
    to_canonical_name,
    to_layout_names,
)
from ..recipes.gguf_policy import TensorChoice
from .error_meter import ErrorMeter, relative_error
from .gguf_branch import verify_gguf_file
from .model_card import CARD_NAME, REPORT_NAME, parse_file_table, report_files
from .options import BranchResult, TensorReport
from .report_schema import check_report, inside

if TYPE_CHECKING:  # the smoothing module is imported only where an INT8 folder needs it
    from .smoothing import Int8Recipe

log = logging.getLogger("ideoquant")

# quantization_config.quant_method each folder format must declare.
QUANT_METHODS = {"int8": "compressed-tensors", "nf4": "bitsandbytes"}
NF4_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
# Tensors a report may list next to a weight (scales, NF4 state); they have no source twin.
COMPANION_SUFFIXES = (
    ".weight_scale", ".input_scale", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", NF4_STATE_SUFFIX,
)
# A recomputed error may differ from the reported one by float rounding only.
ERROR_RTOL = 1e-3
ERROR_ATOL = 1e-7


def load_report(folder: Path) -> dict:
    """The folder's quantization_report.json."""
    path = folder / REPORT_NAME
    if not path.is_file():
        raise IdeoquantError(f"{path}: missing (not a folder written by `ideoquant convert`)")
    # Strict JSON, then every field verify and publish read type-checked, file paths confined.
    return check_report(load_json(path, REPORT_NAME), folder, show(path))


def load_card_table(folder: Path) -> dict[str, tuple[int, str]]:
    """The file table of the folder's model card: {path: (bytes, sha256)}."""
    path = folder / CARD_NAME
    if not path.is_file():
        raise IdeoquantError(f"{path}: no model card")
    table = parse_file_table(path.read_text(encoding="utf-8"))
    if not table:
        raise IdeoquantError(f"{path}: the model card has no file table")
    return table


# --- 1. files ----------------------------------------------------------------------------------

def check_files(folder: Path, report: dict, card_table: dict[str, tuple[int, str]]) -> list[dict]:
    """Card and report agree; every listed file exists with its size and sha256. Returns the entries."""
    entries = report_files(report)
    listed = {e["path"]: (int(e["size"]), e["sha256"]) for e in entries}
    if only_card := sorted(set(card_table) - set(listed)):
        raise IdeoquantError(f"{folder / CARD_NAME}: lists {only_card[0]}, which {REPORT_NAME} does not")
    if only_report := sorted(set(listed) - set(card_table)):
        raise IdeoquantError(f"{folder / CARD_NAME}: does not list {only_report[0]} ({REPORT_NAME} does)")
    for path, (size, digest) in listed.items():
        if card_table[path] != (size, digest):
            raise IdeoquantError(f"{folder / CARD_NAME}: the size or sha256 of {path} differs from {REPORT_NAME}")
    if partials := sorted(folder.rglob(f"*{PARTIAL_SUFFIX}")):
        raise IdeoquantError(f"{partials[0]}: unfinished write left in the folder")
    for path, (size, digest) in listed.items():
        file = folder / path
        if not inside(folder, file):
            raise IdeoquantError(f"{show(file)}: leads outside {show(folder)} (through a symbolic link)")
        if not file.is_file():
            raise IdeoquantError(f"{file}: missing (listed in the model card)")
        if file.stat().st_size != size:
            raise IdeoquantError(f"{file}: {file.stat().st_size} bytes, the model card says {size}")
        if sha256_file(file) != digest:
            raise IdeoquantError(f"{file}: sha256 differs from the model card")
    known = set(listed) | {CARD_NAME, REPORT_NAME}
    for extra in sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in known):
        if ".cache" not in extra.relative_to(folder).parts:
            log.warning("%s is not in the model card's file table (publish leaves it out)", extra)
    return entries


# --- 2. structure --------------------------------------------------------------------------------

def _canonical_shapes(tensors: list[dict]) -> dict[str, tuple[int, ...]]:
    """Report tensors under canonical names (split q/k/v rows summed); companions such as
    `.weight_scale` are left out."""
    shapes: dict[str, tuple[int, ...]] = {}
    for t in tensors:
        canonical, part = to_canonical_name(t["name"])
        if canonical.endswith(COMPANION_SUFFIXES):
            continue
        shape = tuple(int(s) for s in t["shape"])
        if part is not None and canonical in shapes:
            shape = (shapes[canonical][0] + shape[0],) + shape[1:]
        shapes[canonical] = shape
    return shapes


def check_report_inventory(branch: str, tensors: list[dict]) -> None:
    """The report lists exactly the tensors of an Ideogram 4 branch, with their shapes."""
    shapes = _canonical_shapes(tensors)
    origin = f"{REPORT_NAME}: {branch}"
    dims = infer_dims(shapes, "fused", origin)
    extra = check_inventory(shapes, "fused", dims, origin)
    if extra:
        raise IdeoquantError(f"{origin} lists unknown tensor {sorted(extra)[0]}")


def smoothed_groups(recipe: dict) -> set[str]:
    """The smoothing groups an INT8 recipe smoothed (those with an alpha)."""
    alphas = recipe.get("alphas")
    if not isinstance(alphas, dict):
        return set()
    return {g for g, a in alphas.items() if a is not None}


def smoothed_tensors(recipe: dict, dims: ModelDims) -> set[str]:
    """Canonical tensors a SmoothQuant fold changed before quantizing (INT8 recipes with active alphas).

    Their reference is the smoothed source weight, rebuilt from the factors the folder keeps
    (`smoothquant/<branch>.safetensors`); without that file they are left out."""
    active = smoothed_groups(recipe)
    if not active:
        return set()
    from ..recipes.smoothquant_map import smoothing_groups

    touched: set[str] = set()
    for group in smoothing_groups(dims):
        if group.name in active:
            touched.update(m + ".weight" for m in group.linears)
            touched.add(group.fold.tensor)
    return touched


def load_smoothing(folder: Path, branch: str, dims: ModelDims, groups: set[str]) -> Int8Recipe | None:
    """The stored SmoothQuant factors of a branch as a recipe that re-applies them, or None
    for a folder written without them; they must cover exactly the groups the report smoothed."""
    from .smoothing import factors_path, recipe_from_factors

    path = factors_path(folder, branch)
    if not path.is_file():
        return None
    f = SafetensorsFile(path)
    factors = {name: f.read(name) for name in f.tensors}
    if set(factors) != groups:
        odd = sorted(set(factors) ^ groups)[0]
        raise IdeoquantError(f"{path}: the factors of {odd} do not match the report's recipe")
    return recipe_from_factors(dims, factors, str(path))


class GGUFTensors:
    """The tensors of one GGUF output, decoded with the project's ggml decoders."""

    def __init__(self, path: Path, tensors: list[dict]):
        try:
            choices = [TensorChoice(t["name"], tuple(t["shape"]), GGMLQuantizationType[t["out_type"]], "") for t in tensors]
        except KeyError as e:
            raise IdeoquantError(f"{REPORT_NAME}: unknown GGUF type {e} for {path.name}") from None
        verify_gguf_file(path, choices)
        self.path = path
        self.reader = GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in torch order."""
        return tuple(int(x) for x in reversed(self.tensors[name].shape.tolist()))

    def relative_error(self, name: str, exact: torch.Tensor) -> float:
        """The tensor's relative error against `exact` (of its shape), measured from its blocks
        as the conversion measured it."""
        shape = self.shape(name)
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        raw = torch.from_numpy(np.asarray(self.tensors[name].data).reshape(-1).view(np.uint8).reshape(rows, -1).copy())
        cls = ggml_type(self.tensors[name].tensor_type)
        return ErrorMeter().add_encoded(cls, raw, exact.reshape(rows, -1).to(torch.float32)).relative()


class FolderTensors:
    """The tensors of one diffusers branch folder (INT8 W8A8 or NF4), dequantized to float32."""

    def __init__(self, folder: Path, fmt: str):
        self.folder = folder
        self._check_config(fmt)
        # An output folder must hold exactly the shards its index names (no stale-index fallback).
        self.stored = TensorFolder.open(folder, strict=True, prefix="")
        self.layout = layout_of(self.stored, str(folder))

    def _check_config(self, fmt: str) -> None:
        path = self.folder / "config.json"
        if not path.is_file():
            raise IdeoquantError(f"{path}: missing")
        qc = read_config(self.folder).get("quantization_config")
        if not isinstance(qc, dict):
            raise IdeoquantError(f"{path}: no quantization_config")
        wanted = QUANT_METHODS.get(fmt)
        if wanted and qc.get("quant_method") != wanted:
            raise IdeoquantError(f"{path}: quant_method is {qc.get('quant_method')!r}, expected {wanted!r} for {fmt}")

    def _keys(self, name: str) -> list[str]:
        """The stored key(s) of a report tensor: itself, or its split q/k/v parts."""
        return [name] if name in self.stored else to_layout_names(name, self.layout)

    def _nf4_parts(self, key: str) -> dict[str, torch.Tensor]:
        prefix = key + "."
        return {k: t.file.read(k) for k, t in self.stored.items() if k == key or k.startswith(prefix)}

    def _logical_shape(self, key: str) -> tuple[int, ...]:
        if key + NF4_STATE_SUFFIX in self.stored:
            state = self.stored[key + NF4_STATE_SUFFIX]
            try:
                return tuple(int(s) for s in json.loads(bytes(state.file.read(state.name).numpy()))["shape"])
            except (ValueError, KeyError, TypeError, RecursionError):
                raise IdeoquantError(f"{state.file.path}: unreadable NF4 quant state of {key}") from None
        return self.stored[key].shape

    def check(self, tensors: list[dict]) -> None:
        """Every report tensor is stored with its shape."""
        for t in tensors:
            keys = self._keys(t["name"])
            shape = tuple(t["shape"])
            if len(keys) > 1:
                shape = (shape[0] // len(keys),) + shape[1:]
            for key in keys:
                if key not in self.stored:
                    raise IdeoquantError(f"{self.folder}: tensor {key} is missing")
                if self._logical_shape(key) != shape:
                    raise IdeoquantError(
                        f"{self.folder}: tensor {key} has shape {list(self._logical_shape(key))}, the report says {list(shape)}"
                    )

    def _dequantize_key(self, key: str) -> torch.Tensor:
        stored = self.stored[key]
        if key + NF4_STATE_SUFFIX in self.stored:
            from ..codecs.nf4 import dequantize_nf4, parse_nf4_serialized

            nf4 = parse_nf4_serialized(self._nf4_parts(key), key[: -len(".weight")])
            return dequantize_nf4(nf4.packed, nf4.absmax, nf4.shape)
        w = stored.file.read(key)
        if w.dtype != torch.int8:
            return w.to(torch.float32)
        scale_key = key[: -len(".weight")] + ".weight_scale"
        if scale_key not in self.stored:
            raise IdeoquantError(f"{self.folder}: int8 weight {key} has no {scale_key}")
        scale = self.stored[scale_key].file.read(scale_key).to(torch.float32)
        return w.to(torch.float32) * (scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()))

    def dequantize(self, name: str) -> torch.Tensor:
        """A report tensor in float32 (int8 * scale, NF4 decoded, others as stored)."""
        parts = [self._dequantize_key(k) for k in self._keys(name)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def shape(self, name: str) -> tuple[int, ...]:
        """A report tensor's shape (split parts stacked along the first dimension)."""
        shapes = [tuple(self._logical_shape(k)) for k in self._keys(name)]
        return shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes), *shapes[0][1:])

    def relative_error(self, name: str, exact: torch.Tensor) -> float:
        """The tensor's relative error against `exact` (of its shape), decoded."""
        return relative_error(self.dequantize(name), exact)


def open_outputs(folder: Path, report: dict, branch: str) -> GGUFTensors | FolderTensors:
    """Check one branch's structure and return a reader of its tensors."""
    br = report["branches"][branch]
    if report.get("family") == "gguf":
        ggufs = [f["path"] for f in br.get("files", []) if f["path"].endswith(".gguf")]
        if len(ggufs) != 1:
            raise IdeoquantError(f"{REPORT_NAME}: {branch} should have one .gguf file, lists {len(ggufs)}")
        if (branch == "unconditional_transformer") != ("uncond" in Path(ggufs[0]).name.lower()):
            raise IdeoquantError(f"{folder / ggufs[0]}: only the unconditional file's name may contain 'uncond'")
        return GGUFTensors(folder / ggufs[0], br["tensors"])
    tensors = FolderTensors(folder / branch, report["format"])
    tensors.check(br["tensors"])
    return tensors


# --- 3. fidelity ---------------------------------------------------------------------------------

class _SourceTensors:
    """The source tensors report names stand for (a q/k/v part is its row slice of qkv),
    smoothed with the stored SmoothQuant factors when given; the last canonical tensor is
    kept, so the three parts of qkv read and smooth it once."""

    def __init__(self, bs: BranchSource, smoothing: Int8Recipe | None):
        self.bs, self.smoothing = bs, smoothing
        self.last: tuple[str, torch.Tensor] | None = None

    def get(self, name: str) -> torch.Tensor:
        canonical, part = to_canonical_name(name)
        if self.last is None or self.last[0] != canonical:
            exact = self.bs.read_float32(canonical)
            if self.smoothing is not None:
                exact = self.smoothing.smooth_tensor(canonical, exact)
            self.last = (canonical, exact)
        exact = self.last[1]
        if part is None:
            return exact
        rows = exact.shape[0] // 3
        return exact[part * rows : (part + 1) * rows]


def _close(measured: float, reported: float) -> bool:
    if math.isinf(measured) or math.isinf(reported):
        return measured == reported
    return abs(measured - reported) <= ERROR_ATOL + ERROR_RTOL * max(abs(measured), abs(reported))


def compare_with_source(folder: Path, report: dict, readers: dict, src: str) -> dict:
    """Recompute every tensor's relative error against the source; a mismatch with the report fails."""
    wanted = set(report["branches"])
    selector = next((k for k, v in BRANCH_ALIASES.items() if set(v) == wanted), "both")
    source = open_source(src, selector)
    stats = {}
    for branch, br in report["branches"].items():
        bs = source.branches[branch]
        if br.get("source_checksum") and bs.checksum() != br["source_checksum"]:
            raise IdeoquantError(f"{src}: {branch} is not the source this folder was converted from (sha256 differs)")
        recipe = br.get("recipe", {})
        smoothed = smoothed_tensors(recipe, bs.dims)
        smoothing = load_smoothing(folder, branch, bs.dims, smoothed_groups(recipe)) if smoothed else None
        sources = _SourceTensors(bs, smoothing)
        measured: list[TensorReport] = []
        skipped = 0
        deviation = 0.0
        for t in br["tensors"]:
            canonical = to_canonical_name(t["name"])[0]
            if canonical not in bs.specs:
                continue  # a companion (scale, quant state): checked through its weight
            if canonical in smoothed and smoothing is None:
                skipped += 1
                continue
            exact = sources.get(t["name"])
            stored_shape = readers[branch].shape(t["name"])
            if stored_shape != tuple(exact.shape):
                raise IdeoquantError(
                    f"{folder}: {branch} tensor {t['name']} has shape {list(stored_shape)}, the source {list(exact.shape)}"
                )
            err = readers[branch].relative_error(t["name"], exact)
            reported = t.get("rel_error")
            if reported is not None:
                if not _close(err, reported):
                    raise IdeoquantError(
                        f"{folder}: {branch} tensor {t['name']} has relative error {err:.4e} against the source, "
                        f"the report says {reported:.4e}"
                    )
                if not math.isinf(err):
                    deviation = max(deviation, abs(err - reported))
            # Summarised like the conversion's own numbers: only tensors the report gives an error for.
            kept_error = err if reported is not None else None
            measured.append(TensorReport(t["name"], tuple(t["shape"]), t["out_type"], t["nbytes"], kept_error))
        summary = BranchResult(branch, [], measured).error_summary()
        stats[branch] = {
            "tensors_compared": len(measured),
            "tensors_skipped_smoothed": skipped,
            **summary,
            "max_deviation_from_report": deviation,
        }
    return stats


# --- the command ---------------------------------------------------------------------------------

def verify_folder(folder: str | Path, source: str | None = None) -> dict:
    """Check a converted folder (files, structure, and with `source` the errors); returns the `verified` record."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IdeoquantError(f"{folder}: no such folder")
    report = load_report(folder)
    entries = check_files(folder, report, load_card_table(folder))
    for branch, br in report["branches"].items():
        check_report_inventory(branch, br.get("tensors", []))
    readers = {branch: open_outputs(folder, report, branch) for branch in report["branches"]}
    section = {
        "ideoquant_version": __version__,
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": len(entries),
        "bytes": sum(int(e["size"]) for e in entries),
        "source": None,
    }
    if source is not None:
        section["source"] = str(source)
        section["branches"] = compare_with_source(folder, report, readers, source)
    return section


def record_verification(folder: str | Path, section: dict) -> None:
    """Store a passed verification as the `verified` section of the folder's report."""
    folder = Path(folder)
    report = load_report(folder)
    report["verified"] = section
    OutputSet(overwrite=True).write_text(folder / REPORT_NAME, json.dumps(report, indent=1) + "\n")
