"""Stage 6: the model card and quantization report of a converted folder, from the conversion's own numbers.

`write_model_card` writes two files next to the outputs: `quantization_report.json` (every
file with size and sha256, every tensor's type, size and error, the recipe) and `README.md`,
a Hugging Face model card rendered from that report with `ModelCard.from_template` and the
template in `model_cards/`. The card is built from the report alone, so the two never
disagree; `ideoquant verify` checks both against the files.

Recipe keys the card reads from `BranchResult.recipe` (all optional):
`types` ({tensor: {type, reason}}), `kept` / `ignore` (linears kept in higher precision: a
list, or a dict keyed by module), `protected` (those kept for their measured error),
`quantized` (a count), `alpha` (one SmoothQuant alpha) or `alphas` ({group: alpha or None}),
`calibration` (text or a dict); any other short entry is listed as it is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from .. import __version__, data_dir
from ..errors import IdeoquantError
from ..io.staging import sha256_file
from ..model.inventory import BRANCHES
from ..recipes.formats import gguf_file_tag, is_gguf_format
from .report import human_bytes

if TYPE_CHECKING:
    from ..io.source import Source
    from ..io.staging import OutputSet
    from .options import BranchResult, ConvertOptions

log = logging.getLogger("ideoquant")

CARD_NAME = "README.md"
REPORT_NAME = "quantization_report.json"
TEMPLATE_PATH = data_dir("model_cards") / "ideogram4-quantized.md"
# A licence name for sources whose card names none; the link then points at the base model.
FALLBACK_LICENSE_NAME = "base-model-license"
# Recipe keys naming the linears kept in higher precision (a list, or a dict keyed by module).
KEPT_KEYS = ("kept", "ignore")
# Recipe values with more entries than this stay in the report only.
MAX_DESCRIBED_ITEMS = 16
# Numbers inside reasons ("W8A8 error 0.0169 among the 2 worst") would split one reason into many.
_NUMBER_RE = re.compile(r"\d+\.\d+(?:e[-+]?\d+)?")
WORST_SHOWN = 5
BRANCH_LABELS = {"transformer": "conditional", "unconditional_transformer": "unconditional"}
# One file-table row as rendered by the template: | `path` | branch | size | bytes | `sha256` |
_FILE_ROW_RE = re.compile(r"^\|\s*`([^`]+)`\s*\|[^|]*\|[^|]*\|\s*(\d+)\s*\|\s*`([0-9a-f]{64})`\s*\|\s*$")


def format_family(fmt: str) -> str:
    """`gguf` for every GGUF type, else the format itself (`int8`, `nf4`)."""
    return "gguf" if is_gguf_format(fmt) else fmt


def quant_label(fmt: str) -> str:
    """The human name of a format: `Q4_K_M GGUF`, `INT8 W8A8`, `NF4`."""
    if is_gguf_format(fmt):
        return f"{gguf_file_tag(fmt)} GGUF"
    return {"int8": "INT8 W8A8", "nf4": "NF4"}.get(fmt, fmt.upper())


def card_tags(fmt: str) -> list[str]:
    """Hub tags: the model, the container format and the quant type."""
    family = format_family(fmt)
    extra = {"gguf": ["gguf", fmt], "int8": ["int8", "w8a8", "compressed-tensors"], "nf4": ["nf4", "bitsandbytes", "4-bit"]}
    return ["ideogram-4", *extra.get(family, [fmt]), "quantized"]


def file_entry(path: Path, root: Path, known_sha256: dict[str, str] | None = None) -> dict:
    """{path (relative, posix), size, sha256} of one output file (a digest the writer
    already computed and verified is reused rather than read again)."""
    digest = (known_sha256 or {}).get(str(path)) or sha256_file(path)
    return {"path": Path(path).relative_to(root).as_posix(), "size": Path(path).stat().st_size, "sha256": digest}


def report_files(report: dict) -> list[dict]:
    """Every file a report lists (each branch's, then the shared ones), with its branch."""
    rows = [{**f, "branch": b} for b, br in report.get("branches", {}).items() for f in br.get("files", [])]
    return rows + [{**f, "branch": ""} for f in report.get("files", [])]


def parse_file_table(card_text: str) -> dict[str, tuple[int, str]]:
    """The card's file table: {path: (bytes, sha256)}."""
    rows: dict[str, tuple[int, str]] = {}
    for line in card_text.splitlines():
        if m := _FILE_ROW_RE.match(line.strip()):
            rows[m.group(1)] = (int(m.group(2)), m.group(3))
    return rows


# --- licence -------------------------------------------------------------------------------

@dataclasses.dataclass
class LicenseInfo:
    """The licence fields carried into the card, and the licence files to copy."""

    license: str
    license_name: str | None
    license_link: str | None
    files: list[Path]


def check_repo_id(repo_id: str, what: str = "repo id") -> str:
    """A Hub repo id (`owner/name` or `name`), or a one-line error."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise IdeoquantError(f"{what} {repo_id!r} is not a Hugging Face repo id (owner/name)") from None
    return repo_id


def _source_folders(source: "Source") -> list[Path]:
    """Where a source's card and licence may lie: the pipeline folder (above a lone branch or file)."""
    root = source.root if source.root.is_dir() else source.root.parent
    folders = [root]
    if root.name in BRANCHES:
        folders.append(root.parent)
    return folders


def _source_extent(source: "Source", folder: Path) -> Path:
    """The folder a source file must really lie in: the folder itself, or for a Hub snapshot
    (whose files link into the repo's blob store) the repo's cache folder."""
    real = folder.resolve()
    if source.repo_id and real.parent.name == "snapshots":
        return real.parent.parent
    return real


def _open_source_file(source: "Source", path: Path):
    """An open binary file for `path` when it is a regular file that really lies inside the
    source (links are followed only within it); None otherwise."""
    if not os.path.lexists(path):
        return None
    folder = path.parent
    real = path.resolve()
    if not real.is_relative_to(_source_extent(source, folder)):
        log.warning("%s leads outside the source; not copied", path)
        return None
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        log.warning("%s is not a regular file; not copied", path)
        return None
    return os.fdopen(fd, "rb")


def read_source_card(source: "Source") -> ModelCard | None:
    """The source's own model card, when it has one with readable front matter."""
    for folder in _source_folders(source):
        fh = _open_source_file(source, folder / CARD_NAME)
        if fh is None:
            continue
        path = folder / CARD_NAME
        try:
            with fh:
                text = fh.read(MAX_SOURCE_CARD_BYTES).decode("utf-8", errors="replace")
            return ModelCard(text, ignore_metadata_errors=True)
        except Exception as e:  # YAML errors come in several types; a bad card only loses the licence fields
            log.warning("%s: unreadable front matter (%s); licence fields not carried", path, str(e).splitlines()[0])
            return None
    return None


def _license_files(source: "Source") -> list[Path]:
    """The nearest folder's LICENSE files that are regular files inside the source."""
    for folder in _source_folders(source):
        files = []
        for p in sorted(folder.glob("LICENSE*")):
            fh = _open_source_file(source, p)
            if fh is not None:
                fh.close()
                files.append(p)
        if files:  # the nearest folder's licence only, not also its parent's
            return files
    return []


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_URL_RE = re.compile(r"^https?://[^\s<>\"'`()\[\]{}\\|^]+$")
MAX_FIELD_CHARS = 200
MAX_SOURCE_CARD_BYTES = 1 << 20


def clean_field(value: Any) -> str | None:
    """A card field from a source as one line of plain text (control characters become spaces)."""
    if value is None:
        return None
    text = " ".join(_CONTROL_RE.sub(" ", str(value)).split())[:MAX_FIELD_CHARS]
    return text or None


def clean_link(value: Any, license_files: list[Path]) -> str | None:
    """A licence link kept only when it is an http(s) URL or the name of a copied LICENSE file."""
    text = clean_field(value)
    if text is None:
        return None
    if _URL_RE.match(text) or text in {p.name for p in license_files}:
        return text
    log.warning("licence link %r from the source card is not an http(s) URL or a LICENSE file; left out", text[:60])
    return None


def markdown_text(value: Any) -> str:
    """Plain text safe inside a Markdown paragraph: every punctuation mark that Markdown or
    HTML gives a meaning is backslash-escaped."""
    return re.sub(r"([\\`*_{}\[\]()<>#+\-.!|~&:\"'=@$%^])", r"\\\1", clean_field(value) or "")


_FILE_LINK_RE = re.compile(r"^[\w][\w.-]*$")


def markdown_link(link: str) -> str:
    """A checked licence link as Markdown: an autolink for a URL, a relative link for a file."""
    if _URL_RE.match(link):
        return f"<{link}>"
    if _FILE_LINK_RE.match(link):
        return f"[{markdown_text(link)}]({link})"
    return markdown_text(link)


def source_license(source: "Source", base_model: str | None) -> LicenseInfo:
    """Licence fields from the source's card, and its LICENSE files (Ideogram 4's licence is `other`)."""
    files = _license_files(source)
    card = read_source_card(source)
    data = card.data if card is not None else None
    license_id = clean_field(getattr(data, "license", None)) or "other"
    name = clean_field(getattr(data, "license_name", None))
    link = clean_link(getattr(data, "license_link", None), files)
    if license_id == "other":
        if card is None:
            log.warning("the source has no model card: licence fields point at the base model; check them before publishing")
        name = name or FALLBACK_LICENSE_NAME
        link = link or (files[0].name if files else None) or (f"https://huggingface.co/{base_model}" if base_model else None)
    return LicenseInfo(str(license_id), name, link, files)


# --- report --------------------------------------------------------------------------------

def _json_safe(value: Any) -> Any:
    """Recipe values as JSON: paths and unknown objects as text, tensors and arrays as lists."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def build_report(
    source: "Source",
    options: "ConvertOptions",
    results: list["BranchResult"],
    files: list[Path],
    base_model: str | None,
) -> dict:
    """The machine-readable record of a conversion: files, per-tensor results, recipes, sizes."""
    root = Path(options.out)
    owner = {p: r.branch for r in results for p in r.files}
    for p in files:
        rel = p.relative_to(root)
        if p not in owner and len(rel.parts) > 1 and rel.parts[0] in BRANCHES:
            owner[p] = rel.parts[0]  # config.json and index next to a branch's weights
    known = {k: v for r in results for k, v in r.file_sha256.items()}
    entries = {p: file_entry(p, root, known) for p in sorted(set(files))}
    branches = {}
    for r in results:
        branch_files = [entries[p] for p in entries if owner.get(p) == r.branch]
        branches[r.branch] = {
            "files": branch_files,
            "source_checksum": r.source_checksum,
            "source_bytes": r.source_bytes,
            "output_bytes": sum(f["size"] for f in branch_files),
            "weights": r.weights,
            "seconds": round(r.seconds, 3),
            "recipe": _json_safe(r.recipe),
            "error_summary": r.error_summary(),
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "out_type": t.out_type, "nbytes": t.nbytes,
                 "rel_error": t.rel_error, "note": t.note}
                for t in r.tensors
            ],
        }
    first = next(iter(source.branches.values()), None)
    options_record = {k: v for k, v in dataclasses.asdict(options).items() if k not in ("out", "overwrite", "quiet")}
    return {
        "ideoquant_version": __version__,
        "format": options.fmt,
        "family": format_family(options.fmt),
        "source": {
            "name": source.name,
            "repo_id": source.repo_id,
            "base_model": base_model,
            "dtype": first.source_dtype if first is not None else None,
            "bytes": sum(r.source_bytes for r in results),
            "weights": sum(r.weights for r in results),
        },
        "options": _json_safe(options_record),
        "files": [entries[p] for p in entries if p not in owner],
        "branches": branches,
    }


# --- card ----------------------------------------------------------------------------------

def _error(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3e}"


def _ratio(output: int, source: int) -> str:
    return f"{100 * output / source:.1f}%" if source else "n/a"


def _bpw(output: int, weights: int) -> str:
    return f"{8 * output / weights:.2f}" if weights else "n/a"


def compact_modules(names: list[str]) -> str:
    """`layers.0.feed_forward.w2, layers.1.feed_forward.w2, x` -> `layers.{0-1}.feed_forward.w2, x`."""
    blocks: dict[str, list[int]] = {}  # name with `{}` for the block number -> block numbers, first-seen order
    for name in names:
        m = re.match(r"^(.*?layers\.)(\d+)(\..*)?$", name)
        key = f"{m.group(1)}{{}}{m.group(3) or ''}" if m else name
        blocks.setdefault(key, [])
        if m:
            blocks[key].append(int(m.group(2)))
    parts = []
    for key, numbers in blocks.items():
        nums = sorted(set(numbers))
        if not nums:
            parts.append(f"`{key}`")
        elif len(nums) == 1:
            parts.append(f"`{key.format(nums[0])}`")
        else:
            spans, start = [], nums[0]
            for prev, cur in zip(nums, nums[1:] + [None]):
                if cur != prev + 1:
                    spans.append(f"{start}" if start == prev else f"{start}-{prev}")
                    start = cur
            parts.append(f"`{key.format('{' + ','.join(spans) + '}')}`")
    return ", ".join(parts)


def _modules(value: Any) -> list[str]:
    """Module names from a list (of names or {name: ...} dicts) or from the keys of a dict."""
    if isinstance(value, dict):
        return [str(k) for k in value]
    if isinstance(value, (list, tuple)):
        return [str(v.get("name", v)) if isinstance(v, dict) else str(v) for v in value]
    return []


def _describe(value: Any, depth: int = 0) -> str:
    """Short text of a recipe value; empty for values too large for a card (the report keeps them)."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (bool, int, str)):
        return str(value)
    if isinstance(value, (list, tuple)) and len(value) <= MAX_DESCRIBED_ITEMS:
        if all(isinstance(v, (int, float, str)) for v in value):
            return "/".join(_describe(v) for v in value)
        if depth < 2 and all(isinstance(v, dict) for v in value):
            return "[" + "; ".join(_describe(v, depth + 1) for v in value) + "]"
    if isinstance(value, dict) and depth < 3 and len(value) <= MAX_DESCRIBED_ITEMS:
        return ", ".join(f"{k} {text}" for k, v in value.items() if v is not None and (text := _describe(v, depth + 1)))
    return ""


def _alphas(recipe: dict) -> str:
    alphas = recipe.get("alphas")
    if isinstance(alphas, dict) and alphas:
        values = sorted(float(v) for v in alphas.values() if isinstance(v, (int, float)) and not isinstance(v, bool))
        if values:
            return (f"alpha searched per input group, {len(values)} of {len(alphas)} groups smoothed: "
                    f"min {values[0]:.2f}, median {values[len(values) // 2]:.2f}, max {values[-1]:.2f}")
        return f"no group smoothed (of {len(alphas)})"
    alpha = recipe.get("alpha")
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        return f"alpha = {alpha:g} for every smoothed group"
    return ""


def protection_lines(protection: Any) -> list[str]:
    """What the INT8 protection budget was, what it bought, and each protected linear's measured gain."""
    if not isinstance(protection, dict) or "describe" not in protection:
        return []
    chosen = protection.get("linears") or {}
    line = f"Protection: {protection['describe']}"
    if isinstance(protection.get("spent_bytes"), int):
        line += f"; spent {human_bytes(protection['spent_bytes'])} on {len(chosen)} linears"
    if isinstance(protection.get("impact_rss_before"), (int, float)) and isinstance(protection.get("impact_rss_after"), (int, float)):
        line += (f"; measured W8A8 impact (root sum of squares over the measured linears) "
                 f"{protection['impact_rss_before']:.4g} -> {protection['impact_rss_after']:.4g}")
    lines = [line]
    if chosen:
        gains = [f"`{m}` {c['impact']:.3g} ({human_bytes(c['bytes'])})" for m, c in chosen.items()
                 if isinstance(c, dict) and isinstance(c.get("impact"), (int, float)) and isinstance(c.get("bytes"), int)]
        lines.append("Measured gain of each protected linear (impact removed, bf16 bytes): " + ", ".join(gains))
    if protection.get("patterns"):
        lines.append(f"Kept by --protect-pattern, outside the budget: {compact_modules(protection['patterns'])}")
    return lines


def aware_line(calibration: dict) -> str:
    """The card line of an activation-aware GGUF branch: method and measured gain over round-to-nearest."""
    line = f"Activation-aware codes ({calibration['method']})"
    aware, plain = calibration.get("mean_output_error"), calibration.get("mean_output_error_round_to_nearest")
    if isinstance(aware, (int, float)) and isinstance(plain, (int, float)) and plain > 0:
        line += (f": mean output error of {calibration.get('linears')} linears on the calibration rows "
                 f"{aware:.4g}, round-to-nearest {plain:.4g} ({aware / plain:.2f}x). This gain is in sample, "
                 f"per linear, on the rows the codes were fitted to; the conversion does not measure the "
                 f"end-to-end gain on other inputs, which is smaller")
    return line


def recipe_lines(recipe: dict) -> list[str]:
    """The bullet lines that summarise a branch's recipe: kept and protected linears, SmoothQuant,
    calibration, then any other short setting."""
    lines = []
    kept = next((m for key in KEPT_KEYS if (m := _modules(recipe.get(key)))), [])
    if kept:
        lines.append(f"Kept in higher precision ({len(kept)}): {compact_modules(kept)}")
    protected = _modules(recipe.get("protected"))
    if protected:
        lines.append(f"Protected for their measured error ({len(protected)}): {compact_modules(protected)}")
    lines += protection_lines(recipe.get("protection"))
    if isinstance(recipe.get("quantized"), int) and not isinstance(recipe.get("quantized"), bool):
        lines.append(f"Quantized linears: {recipe['quantized']}")
    if alphas := _alphas(recipe):
        lines.append(f"SmoothQuant: {alphas}")
    calibration = recipe.get("calibration")
    if isinstance(calibration, dict) and isinstance(calibration.get("method"), str):
        lines.append(aware_line(calibration))
    elif calibration not in (None, "", "none") and (text := _describe(calibration)):
        lines.append(f"Calibration: {text}")
    handled = {"types", "alpha", "alphas", "calibration", "protected", "protection", "quantized", *KEPT_KEYS}
    for key, value in recipe.items():
        if key not in handled and value is not None and (text := _describe(value)):
            lines.append(f"{key}: {text}")
    return lines


def _policy(branch: dict) -> list[dict]:
    """Tensors grouped by stored type, with their bytes and the reasons the recipe gives."""
    types = branch["recipe"].get("types") if isinstance(branch["recipe"].get("types"), dict) else {}
    groups: dict[str, dict] = {}
    for t in branch["tensors"]:
        g = groups.setdefault(t["out_type"], {"out_type": t["out_type"], "count": 0, "bytes": 0, "reasons": {}})
        g["count"] += 1
        g["bytes"] += t["nbytes"]
        entry = types.get(t["name"])
        reason = entry.get("reason") if isinstance(entry, dict) else None
        reason = _NUMBER_RE.sub("…", reason or t.get("note") or "").replace("|", "\\|")
        if reason:
            g["reasons"][reason] = g["reasons"].get(reason, 0) + 1
    rows = []
    for g in sorted(groups.values(), key=lambda g: -g["bytes"]):
        reasons = "; ".join(r if n == g["count"] else f"{r} ({n})" for r, n in g["reasons"].items())
        rows.append({**g, "bytes_h": human_bytes(g["bytes"]), "reasons": reasons})
    return rows


def _branch_view(name: str, branch: dict) -> dict:
    summary = branch["error_summary"]
    errors = {t["name"]: t["rel_error"] for t in branch["tensors"]}
    return {
        "branch": name,
        "label": BRANCH_LABELS.get(name, name),
        "files": [Path(f["path"]).name for f in branch["files"]],
        "source_h": human_bytes(branch["source_bytes"]),
        "output_h": human_bytes(branch["output_bytes"]),
        "ratio": _ratio(branch["output_bytes"], branch["source_bytes"]),
        "bpw": _bpw(branch["output_bytes"], branch["weights"]),
        "policy": _policy(branch),
        "recipe_lines": recipe_lines(branch["recipe"]),
        "quantized_count": sum(1 for t in branch["tensors"] if t["rel_error"] and t["out_type"] != "F32"),
        "mean": _error(summary["mean"]),
        "max": _error(summary["max"]),
        "worst": [{"name": n, "error": _error(errors.get(n))} for n in summary["worst"][:WORST_SHOWN]],
        "source_checksum": branch["source_checksum"],
    }


def render_card(report: dict, license_info: LicenseInfo) -> ModelCard:
    """The model card of a report: front matter from ModelCardData, body from the template."""
    fmt = report["format"]
    family = report["family"]
    base_model = report["source"]["base_model"]
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="quantized",
        license=license_info.license,
        license_name=license_info.license_name,
        license_link=license_info.license_link,
        pipeline_tag="text-to-image",
        library_name="gguf" if family == "gguf" else "diffusers",
        tags=card_tags(fmt),
    )
    branches = [_branch_view(name, b) for name, b in report["branches"].items()]
    source_bytes = sum(b["source_bytes"] for b in report["branches"].values())
    output_bytes = sum(b["output_bytes"] for b in report["branches"].values())
    weights = sum(b["weights"] for b in report["branches"].values())
    gguf = {b["branch"]: b["files"][0] for b in branches if b["files"]}
    if not TEMPLATE_PATH.is_file():
        raise IdeoquantError(f"model card template {TEMPLATE_PATH} is missing from this installation")
    card = ModelCard.from_template(
        data,
        template_path=str(TEMPLATE_PATH),
        title=f"Ideogram 4 {quant_label(fmt)}",
        quant_label=quant_label(fmt),
        family=family,
        fmt=fmt,
        version=report["ideoquant_version"],
        source_name=report["source"]["name"],
        source_dtype=report["source"].get("dtype"),
        files=[{**f, "size_h": human_bytes(f["size"]), "branch": f["branch"] or "-"} for f in report_files(report)],
        branches=branches,
        total={
            "source_h": human_bytes(source_bytes),
            "output_h": human_bytes(output_bytes),
            "ratio": _ratio(output_bytes, source_bytes),
            "bpw": _bpw(output_bytes, weights),
        },
        gguf_cond=gguf.get("transformer", "<conditional .gguf>"),
        gguf_uncond=gguf.get("unconditional_transformer", "<unconditional .gguf>"),
        # Text from the source goes into the Markdown body escaped (the front matter is YAML-quoted).
        license_name_md=markdown_text(license_info.license_name) if license_info.license_name else "",
        license_link_md=markdown_link(license_info.license_link) if license_info.license_link else "",
        license_md=markdown_text(license_info.license),
        source_name_md=markdown_text(report["source"]["name"]),
    )
    # Jinja leaves runs of blank lines around skipped blocks; Markdown needs at most one.
    card.text = "\n" + re.sub(r"\n{3,}", "\n\n", card.text).strip() + "\n"
    return card


def write_model_card(source: "Source", options: "ConvertOptions", results: list["BranchResult"], outputs: "OutputSet") -> None:
    """Write DIR/quantization_report.json and DIR/README.md (plus the source's LICENSE files) for a conversion."""
    out = Path(options.out)
    base_model = source.repo_id or options.base_model
    if base_model is None:
        log.warning("no base model id for the card (local source): pass --base-model to name the Hub repo it came from")
    license_info = source_license(source, base_model)
    for lic in license_info.files:
        fh = _open_source_file(source, lic)
        if fh is None:
            raise IdeoquantError(f"{lic} changed while converting; not copied")
        with fh, outputs.writing(out / lic.name) as staged:
            shutil.copyfileobj(fh, staged.file)
    out_root = out.resolve()
    files = [p for p in outputs.created if p.name not in (CARD_NAME, REPORT_NAME) and p.resolve().is_relative_to(out_root)]
    report = build_report(source, options, results, files, base_model)
    report["license"] = dataclasses.asdict(license_info) | {"files": [p.name for p in license_info.files]}
    card = render_card(report, license_info)
    outputs.write_text(out / REPORT_NAME, json.dumps(report, indent=1) + "\n")
    outputs.write_text(out / CARD_NAME, str(card))
