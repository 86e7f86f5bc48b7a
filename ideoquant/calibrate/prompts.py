"""Prompt files for calibration and evaluation.

A prompt file is JSON Lines, one object per line:

``id``           unique string without whitespace (``cal-0001``, ``evq-0001``, ...)
``category``     one of :data:`CATEGORIES`
``prompt``       the structured JSON caption Ideogram 4 is trained on, as a
                 JSON-encoded string: ``{"high_level_description": ...,
                 "compositional_deconstruction": {"background": ...,
                 "elements": [{"type": "obj", "desc": ...},
                 {"type": "text", "text": ..., "desc": ...}]}}``
``target_text``  optional; the exact string the image must show (OCR scoring).
                 It must occur in the ``text`` of one of the caption's text
                 elements.
``width``, ``height``  optional, together; positive multiples of 16
``seed``         optional non-negative integer

Blank lines are ignored; unknown fields are rejected. The three packaged sets
live in ``calibration_prompts/`` at the repository root (see its README) and are
found with :func:`default_prompt_file`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ideoquant import data_dir
from ideoquant.errors import IdeoquantError
from ideoquant.io.input_files import MAX_JSON_BYTES, read_limited, show

__all__ = [
    "CATEGORIES",
    "PROMPTS_DIR",
    "PROMPT_SET_NAMES",
    "PromptRecord",
    "default_prompt_file",
    "load_prompts",
    "parse_caption",
]

CATEGORIES = (
    "photography",
    "illustration",
    "typography",
    "poster",
    "logo",
    "multilingual_text",
    "ui",
    "people",
    "product",
    "scene",
    "abstract",
    "architecture",
    "food",
    "nature",
)

#: The packaged prompt sets, by file stem.
PROMPT_SET_NAMES = ("calibration", "evaluation_quality", "evaluation_text")

#: ``calibration_prompts/`` at the top of the checkout (inside the package in a wheel).
PROMPTS_DIR = data_dir("calibration_prompts")

_REQUIRED = ("id", "category", "prompt")
_OPTIONAL = ("target_text", "width", "height", "seed")
_SIZE_MULTIPLE = 16
_MAX_SEED = 2**64


@dataclass(frozen=True)
class PromptRecord:
    """One line of a prompt file."""

    id: str
    category: str
    prompt: str
    target_text: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None

    def caption(self) -> dict[str, Any]:
        """The decoded structured caption (raises ValueError for a free-form prompt)."""
        return parse_caption(self.prompt)

    def text_elements(self) -> list[str]:
        """The verbatim ``text`` of every text element of the caption, in order."""
        elements = self.caption()["compositional_deconstruction"]["elements"]
        return [e["text"] for e in elements if e["type"] == "text"]


def _require_str(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}{key!r} must be a non-empty string")
    return value


def _check_keys(obj: dict, allowed: tuple[str, ...], where: str) -> None:
    extra = [k for k in obj if k not in allowed]
    if extra:
        raise ValueError(f"{where}unexpected key(s) {', '.join(map(repr, extra))}")
    missing = [k for k in allowed if k not in obj]
    if missing:
        raise ValueError(f"{where}missing key(s) {', '.join(map(repr, missing))}")


def parse_caption(prompt: str) -> dict[str, Any]:
    """Decode and validate a structured Ideogram 4 caption.

    Raises ValueError with a one-line reason when ``prompt`` is not a JSON
    object of the caption schema (high_level_description plus a
    compositional_deconstruction of background and typed elements).
    """
    try:
        caption = json.loads(prompt)
    except json.JSONDecodeError as exc:
        raise ValueError(f"prompt is not a JSON caption ({exc.msg} at char {exc.pos})") from None
    except (RecursionError, ValueError):  # nesting past the stack, integers of thousands of digits
        raise ValueError("prompt is not a JSON caption (nested too deeply or a number too long)") from None
    if not isinstance(caption, dict):
        raise ValueError("prompt caption must be a JSON object")
    _check_keys(caption, ("high_level_description", "compositional_deconstruction"), "caption: ")
    _require_str(caption, "high_level_description", "caption: ")
    comp = caption["compositional_deconstruction"]
    if not isinstance(comp, dict):
        raise ValueError("caption: 'compositional_deconstruction' must be an object")
    _check_keys(comp, ("background", "elements"), "caption composition: ")
    _require_str(comp, "background", "caption composition: ")
    elements = comp["elements"]
    if not isinstance(elements, list) or not elements:
        raise ValueError("caption: 'elements' must be a non-empty list")
    for i, element in enumerate(elements):
        where = f"caption element {i}: "
        if not isinstance(element, dict):
            raise ValueError(f"{where}must be an object")
        kind = element.get("type")
        if kind == "obj":
            _check_keys(element, ("type", "desc"), where)
        elif kind == "text":
            _check_keys(element, ("type", "text", "desc"), where)
            _require_str(element, "text", where)
        else:
            raise ValueError(f"{where}'type' must be 'obj' or 'text', got {kind!r}")
        _require_str(element, "desc", where)
    return caption


def _int_field(obj: dict, key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key!r} must be an integer, got {value!r}")
    return value


def _record_from(obj: Any, require_caption: bool) -> PromptRecord:
    if not isinstance(obj, dict):
        raise ValueError("line is not a JSON object")
    unknown = [k for k in obj if k not in _REQUIRED + _OPTIONAL]
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}")
    for key in _REQUIRED:
        if key not in obj:
            raise ValueError(f"missing field {key!r}")
    record_id = obj["id"]
    if not isinstance(record_id, str) or not record_id or any(ch.isspace() for ch in record_id):
        raise ValueError(f"'id' must be a non-empty string without whitespace, got {record_id!r}")
    category = obj["category"]
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}")
    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' must be a non-empty string")

    texts: list[str] | None = None
    if require_caption or prompt.lstrip().startswith("{"):
        caption = parse_caption(prompt)
        texts = [e["text"] for e in caption["compositional_deconstruction"]["elements"] if e["type"] == "text"]

    target = obj.get("target_text")
    if target is not None:
        if not isinstance(target, str) or not target.strip():
            raise ValueError("'target_text' must be a non-empty string")
        if texts is not None:
            if not any(target in t for t in texts):
                raise ValueError(f"target_text {target!r} is not in any text element of the caption")
        elif target not in prompt:
            raise ValueError(f"target_text {target!r} does not occur in the prompt")

    width, height = _int_field(obj, "width"), _int_field(obj, "height")
    if (width is None) != (height is None):
        raise ValueError("'width' and 'height' must be given together")
    for key, value in (("width", width), ("height", height)):
        if value is not None and (value <= 0 or value % _SIZE_MULTIPLE):
            raise ValueError(f"{key!r} must be a positive multiple of {_SIZE_MULTIPLE}, got {value}")
    seed = _int_field(obj, "seed")
    if seed is not None and not 0 <= seed < _MAX_SEED:
        raise ValueError(f"'seed' must lie in [0, 2**64), got {seed}")
    return PromptRecord(record_id, category, prompt, target, width, height, seed)


def load_prompts(path: str | Path, *, require_caption: bool = True) -> list[PromptRecord]:
    """Read and validate a JSON Lines prompt file.

    With ``require_caption`` (the default) every prompt must be a structured
    caption; without it free-form prompts are accepted too, and prompts that
    look like JSON are still validated. Raises IdeoquantError naming the file
    and line on the first problem, for a duplicate id, or for a file without
    records.
    """
    path = Path(path)
    if not path.exists():
        raise IdeoquantError(f"{show(path)}: no such prompt file")
    try:
        # A regular file of bounded size: a FIFO or device here would block or never end.
        text = read_limited(path, MAX_JSON_BYTES, "prompt file").decode("utf-8")
    except UnicodeDecodeError:
        raise IdeoquantError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise IdeoquantError(f"{path}: cannot read prompt file ({exc.strerror or exc})") from None

    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise IdeoquantError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        except (RecursionError, ValueError):  # nesting past the stack, integers of thousands of digits
            raise IdeoquantError(f"{path}:{lineno}: invalid JSON (nested too deeply or a number too long)") from None
        try:
            record = _record_from(obj, require_caption)
        except ValueError as exc:
            raise IdeoquantError(f"{path}:{lineno}: {exc}") from None
        if record.id in seen:
            raise IdeoquantError(f"{path}:{lineno}: duplicate id {record.id!r} (first on line {seen[record.id]})")
        seen[record.id] = lineno
        records.append(record)
    if not records:
        raise IdeoquantError(f"{path}: no prompts in file")
    return records


def default_prompt_file(name: str) -> Path:
    """Path of a packaged prompt set: ``calibration``, ``evaluation_quality`` or ``evaluation_text``.

    The ``.jsonl`` suffix is optional. Raises IdeoquantError for an unknown
    name or a missing file.
    """
    stem = name.removesuffix(".jsonl")
    if stem not in PROMPT_SET_NAMES:
        raise IdeoquantError(f"unknown prompt set {name!r}; expected one of: {', '.join(PROMPT_SET_NAMES)}")
    path = PROMPTS_DIR / f"{stem}.jsonl"
    if not path.is_file():
        raise IdeoquantError(f"packaged prompt set {stem!r} is missing: {path}")
    return path
