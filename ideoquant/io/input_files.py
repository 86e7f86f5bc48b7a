"""Reading files we did not write: regular files only, bounded sizes, strict JSON, checked fields.

Every JSON file the tool reads (configs, indexes, reports, safetensors headers) goes through
`parse_json`, which refuses what Python's `json` would turn into a traceback or a silent
surprise: nesting deep enough to exhaust the stack, integers of thousands of digits,
numbers that overflow to infinity, NaN/Infinity literals, and duplicate keys. The `json_*`
helpers then check each field's type, so a wrong type is one line naming the field.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import IdeoquantError, printable

# Larger than any config, index or report the tool writes or reads, by orders of magnitude.
MAX_JSON_BYTES = 64 << 20
# u64 has 20 digits; no field the tool reads needs more.
MAX_INT_DIGITS = 20
# Nesting the tool's own files never come near; far below Python's recursion limit.
MAX_JSON_DEPTH = 64


class _BadJSON(ValueError):
    """Raised from inside the JSON parser's hooks; turned into one line naming the file."""


def _special_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: Path, what: str = "") -> BinaryIO:
    """`path` opened for binary reading, refused (one line) unless it is a regular file.

    The open is non-blocking, so a FIFO cannot hang it, and the check is made on the opened
    descriptor, so the path cannot be swapped between check and open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise IdeoquantError(f"{show(path)}: cannot read {what + ' ' if what else ''}({e.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise IdeoquantError(f"{show(path)}: {_special_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(path: Path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file no larger than `max_bytes`."""
    with open_regular(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise IdeoquantError(f"{show(path)}: {what} is larger than {max_bytes} bytes")
    return data


def show(value: object) -> str:
    """A path or name as it may appear in a message: control characters escaped."""
    return printable(str(value))


# --- strict JSON -------------------------------------------------------------------------

def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _BadJSON(f"integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _BadJSON(f"number {text[:24]}{'...' if len(text) > 24 else ''} is out of range")
    return value


def _parse_constant(name: str) -> float:
    raise _BadJSON(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _BadJSON(f"duplicate key {printable(repr(key))}")
        out[key] = value
    return out


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _nesting_depth(text: str) -> int:
    """Deepest [ / { nesting outside strings (regex and numpy passes, before the recursive parser)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def parse_json(data: bytes | str, where: str) -> Any:
    """Strictly parsed JSON; any problem is an IdeoquantError `where: ...` on one line."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise IdeoquantError(f"{where}: not UTF-8 text") from None
    if _nesting_depth(text) > MAX_JSON_DEPTH:
        raise IdeoquantError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_parse_constant, object_pairs_hook=_no_duplicates)
    except _BadJSON as e:
        raise IdeoquantError(f"{where}: {e}") from None
    except RecursionError:
        raise IdeoquantError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:
        raise IdeoquantError(f"{where}: not valid JSON ({printable(str(e))})") from None


def load_json(path: Path, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file read strictly (regular file, bounded size; see `parse_json`)."""
    return parse_json(read_limited(path, max_bytes, what), show(path))


# --- field checks ------------------------------------------------------------------------

_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def json_object(value: Any, where: str) -> dict:
    """`value` if it is a JSON object."""
    if not isinstance(value, dict):
        raise IdeoquantError(f"{where} must be an object, not {_type_name(value)}")
    return value


def json_list(value: Any, where: str) -> list:
    """`value` if it is a JSON list."""
    if not isinstance(value, list):
        raise IdeoquantError(f"{where} must be a list, not {_type_name(value)}")
    return value


def json_str(value: Any, where: str) -> str:
    """`value` if it is a string."""
    if not isinstance(value, str):
        raise IdeoquantError(f"{where} must be a string, not {_type_name(value)}")
    return value


def json_int(value: Any, where: str, minimum: int | None = None) -> int:
    """`value` if it is an integer (true/false are not), at least `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise IdeoquantError(f"{where} must be an integer, not {_type_name(value)}")
    if minimum is not None and value < minimum:
        raise IdeoquantError(f"{where} must be at least {minimum}, not {value}")
    return value


def json_number(value: Any, where: str) -> float:
    """`value` as a float if it is a finite number (true/false are not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise IdeoquantError(f"{where} must be a number, not {_type_name(value)}")
    return float(value)


def json_str_map(value: Any, where: str) -> dict[str, str]:
    """`value` if it is an object whose values are all strings."""
    for key, item in json_object(value, where).items():
        json_str(item, f"{where}[{printable(repr(key))}]")
    return value


def confined(root: Path, name: str, where: str) -> Path:
    """`root / name` for a relative `name` that stays inside `root` (no `..`, no absolute path)."""
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name or "\x00" in name:
        raise IdeoquantError(f"{where}: {printable(repr(name))} is not a file name inside {show(root)}")
    return root / rel

