"""The fields of `quantization_report.json` that verify and publish read, type-checked.

A report is read back from a folder anyone may have edited: every field is checked before
use, so a malformed report is one line naming the field, and every file path it lists is a
relative path inside the folder (no `..`, no absolute path, no branch name that is not one
of the model's two branches).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import IdeoquantError
from ..io.input_files import confined, json_int, json_list, json_number, json_object, json_str
from ..model.inventory import BRANCHES


def _optional(value: dict, key: str, check, prefix: str) -> None:
    """Check `value[key]` where it is present and not null; `prefix + key` names it."""
    if key in value and value[key] is not None:
        check(value[key], prefix + key)


def _check_file_entry(entry: object, folder: Path, where: str) -> None:
    entry = json_object(entry, where)
    for key in ("path", "size", "sha256"):
        if key not in entry:
            raise IdeoquantError(f"{where} has no {key}")
    path = json_str(entry["path"], f"{where}.path")
    confined(folder, path, f"{where}.path")
    json_int(entry["size"], f"{where}.size", minimum=0)
    json_str(entry["sha256"], f"{where}.sha256")


def _check_tensor_entry(entry: object, where: str) -> None:
    entry = json_object(entry, where)
    for key in ("name", "shape", "out_type", "nbytes"):
        if key not in entry:
            raise IdeoquantError(f"{where} has no {key}")
    json_str(entry["name"], f"{where}.name")
    for i, dim in enumerate(json_list(entry["shape"], f"{where}.shape")):
        json_int(dim, f"{where}.shape[{i}]", minimum=0)
    json_str(entry["out_type"], f"{where}.out_type")
    json_int(entry["nbytes"], f"{where}.nbytes", minimum=0)
    _optional(entry, "rel_error", json_number, f"{where}.")


def check_report(report: object, folder: Path, where: str) -> dict:
    """`report` if every field verify and publish read has its type; else one line naming it."""
    report = json_object(report, where)
    if "format" not in report or "branches" not in report:
        raise IdeoquantError(f"{where}: not a quantization report (no format or branches)")
    json_str(report["format"], f"{where}: format")
    _optional(report, "family", json_str, f"{where}: ")
    branches = json_object(report["branches"], f"{where}: branches")
    for branch, br in branches.items():
        if branch not in BRANCHES:
            raise IdeoquantError(f"{where}: unknown branch {branch!r} (expected {' or '.join(BRANCHES)})")
        at = f"{where}: branches.{branch}"
        br = json_object(br, at)
        for i, entry in enumerate(json_list(br.get("files", []), f"{at}.files")):
            _check_file_entry(entry, folder, f"{at}.files[{i}]")
        for i, entry in enumerate(json_list(br.get("tensors", []), f"{at}.tensors")):
            _check_tensor_entry(entry, f"{at}.tensors[{i}]")
        _optional(br, "source_checksum", json_str, f"{at}.")
        _optional(br, "recipe", json_object, f"{at}.")
        if isinstance(br.get("recipe"), dict):
            _optional(br["recipe"], "alphas", json_object, f"{at}.recipe.")
    for i, entry in enumerate(json_list(report.get("files", []), f"{where}: files")):
        _check_file_entry(entry, folder, f"{where}: files[{i}]")
    if "source" in report:
        source = json_object(report["source"], f"{where}: source")
        _optional(source, "name", json_str, f"{where}: source.")
        _optional(source, "base_model", json_str, f"{where}: source.")
    return report


def inside(folder: Path, path: Path) -> bool:
    """Whether `path`, with every symbolic link resolved, lies inside `folder`."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False
