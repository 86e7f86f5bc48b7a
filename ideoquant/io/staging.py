"""Output files that appear only when finished: `*.partial` staging, cleanup, disk checks."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import IdeoquantError

PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """Where a file is written until it is complete."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def ensure_free_space(folder: Path, needed_bytes: int, margin: float = 1.02) -> None:
    """Refuse to start when the disk under `folder` has less free space than the outputs need."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * margin:
        raise IdeoquantError(
            f"not enough free disk in {probe}: {free / 2**30:.2f} GiB free, outputs need {needed_bytes / 2**30:.2f} GiB"
        )


class OutputSet:
    """The files one command creates: refused if present, removed together if the command fails."""

    def __init__(self, overwrite: bool = False):
        self.overwrite = overwrite
        self.created: list[Path] = []

    def claim(self, path: Path) -> Path:
        """Register an output path; an existing file is refused unless overwriting."""
        path = Path(path)
        if path.exists() and not self.overwrite:
            raise IdeoquantError(f"{path} already exists (use --overwrite to replace it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def writing(self, path: Path) -> Iterator[Path]:
        """Yield a `.partial` path; on success it replaces `path`, on failure it is removed."""
        path = self.claim(path)
        tmp = partial_path(path)
        try:
            yield tmp
        except OSError as e:
            _remove(tmp)
            if e.errno == errno.ENOSPC:
                raise IdeoquantError(f"disk full while writing {path}") from None
            raise IdeoquantError(f"cannot write {path} ({e.strerror or e})") from None
        except BaseException:
            _remove(tmp)
            raise
        os.replace(tmp, path)
        self.created.append(path)

    def write_text(self, path: Path, text: str) -> None:
        """Write a small text file through the same partial-then-rename path."""
        with self.writing(path) as tmp:
            tmp.write_text(text)

    def discard(self) -> None:
        """Remove every file this set finished (called when a later step fails)."""
        for p in self.created:
            _remove(p)
        self.created.clear()


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    """sha256 of a file, read through a small buffer (a memory map would keep the whole
    file resident)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()
