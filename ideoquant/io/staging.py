"""Output files that appear only when finished: `*.partial` staging, cleanup, disk checks, a
lock on the output folder.

Staging files are created exclusively (never through an existing path or a symbolic link)
and written through the descriptor that created them; a file is renamed into place only if
the staging name still holds that same file. While a run holds its output folder's lock, a
second run into the same folder is refused.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import IdeoquantError

PARTIAL_SUFFIX = ".partial"
LOCK_NAME = ".ideoquant.lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def partial_path(path: Path) -> Path:
    """Where a file is written until it is complete."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def size_text(nbytes: float) -> str:
    """A byte count for messages, in the largest unit that keeps it at 1 or more."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} bytes"


def ensure_free_space(folder: Path, needed_bytes: int, margin: float = 1.02) -> None:
    """Refuse to start when the disk under `folder` has less free space than the outputs need."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * margin:
        raise IdeoquantError(
            f"not enough free disk in {probe}: {size_text(free)} free, outputs need {size_text(needed_bytes * margin)}"
        )


def check_apart(out: Path, source_root: Path, source_files: list[Path]) -> None:
    """Refuse an output folder that is the source, lies inside it, or holds any source file."""
    out_real = Path(out).resolve()
    root_real = Path(source_root).resolve()
    if root_real.is_dir() and (out_real == root_real or out_real.is_relative_to(root_real)):
        raise IdeoquantError(f"--out {out} is inside the source {source_root}; choose a folder outside it")
    for f in [root_real, *source_files]:
        if Path(f).resolve().is_relative_to(out_real):
            raise IdeoquantError(f"the source file {f} lies inside --out {out}; choose a folder outside the source")


@dataclass
class StagedFile:
    """A `.partial` file created for one output: its path, and the file object to write it through."""

    path: Path
    file: BinaryIO


class OutputSet:
    """The files one command creates: refused if present, removed together if the command fails.

    Inside `locked(root)` every output must lie in `root` (no symbolic link leads out of it),
    and folders the set made are removed again if the command fails."""

    def __init__(self, overwrite: bool = False):
        self.overwrite = overwrite
        self.created: list[Path] = []
        self.made_dirs: list[Path] = []
        self.root: Path | None = None
        self._lock: tuple[int, Path] | None = None

    # --- the output folder ---------------------------------------------------------------
    @contextmanager
    def locked(self, root: Path) -> Iterator["OutputSet"]:
        """Hold `root` for the whole command: a second command into it is refused while this
        one runs; on failure every finished file and every folder made is removed."""
        root = Path(root)
        self._make_dirs(root)
        try:
            self.root = root.resolve()
            self._acquire_lock(root)
        except BaseException:
            self._remove_made_dirs()
            raise
        try:
            yield self
        except BaseException:
            self.discard()
            raise
        finally:
            self._release_lock()

    def _acquire_lock(self, root: Path) -> None:
        path = root / LOCK_NAME
        for _ in range(8):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise IdeoquantError(f"{path} is a symbolic link; remove it before writing into {root}") from None
                raise IdeoquantError(f"cannot lock {root} ({e.strerror or e})") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    raise IdeoquantError(f"{path} is not a plain lock file; remove it before writing into {root}")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    who = f" (pid {holder})" if holder.isdigit() else ""
                    raise IdeoquantError(
                        f"{root} is in use by another ideoquant run{who}; wait for it to finish or choose another --out"
                    ) from None
                # A run that just finished unlinks its lock file: hold the one on disk, not a stale inode.
                try:
                    now = os.lstat(path)
                except FileNotFoundError:
                    os.close(fd)
                    continue
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self._lock = (fd, path)
            return
        raise IdeoquantError(f"cannot lock {root}: its lock file keeps changing")

    def _release_lock(self) -> None:
        if self._lock is None:
            return
        fd, path = self._lock
        self._lock = None
        try:
            os.unlink(path)  # while still locked, so no other run holds a stale inode
        except FileNotFoundError:
            pass
        os.close(fd)
        self._remove_made_dirs()

    def _make_dirs(self, folder: Path) -> None:
        """Create `folder` and missing parents, remembering which this set made."""
        missing = []
        probe = Path(folder)
        while not os.path.lexists(probe):
            missing.append(probe)
            probe = probe.parent
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            except OSError as e:
                raise IdeoquantError(f"cannot create {d} ({e.strerror or e})") from None
            self.made_dirs.append(d)
        if not Path(folder).is_dir():
            raise IdeoquantError(f"{folder} is not a folder")

    def _remove_made_dirs(self) -> None:
        """Remove the folders this set made that are empty (deepest first)."""
        for d in sorted(self.made_dirs, key=lambda p: len(p.parts), reverse=True):
            try:
                os.rmdir(d)
            except OSError:
                pass
        self.made_dirs.clear()

    def _check_inside(self, path: Path) -> None:
        if self.root is not None and not path.parent.resolve().is_relative_to(self.root):
            raise IdeoquantError(f"{path} leads outside {self.root} (through a symbolic link); refusing to write there")

    # --- files ---------------------------------------------------------------------------
    def claim(self, path: Path) -> Path:
        """Register an output path; an existing file is refused unless overwriting."""
        path = Path(path)
        self._check_inside(path)
        if os.path.lexists(path) and not self.overwrite:
            raise IdeoquantError(f"{path} already exists (use --overwrite to replace it)")
        if path.is_dir() and not path.is_symlink():
            raise IdeoquantError(f"{path} is a folder; an output file belongs there")
        self._make_dirs(path.parent)
        self._check_inside(path)
        return path

    @contextmanager
    def writing(self, path: Path) -> Iterator[StagedFile]:
        """Yield a `.partial` file created for `path`; on success it replaces `path`, on
        failure it is removed."""
        path = self.claim(path)
        tmp = partial_path(path)
        fd, identity = _create_exclusive(tmp)
        staged = StagedFile(tmp, os.fdopen(fd, "wb"))
        try:
            try:
                yield staged
                staged.file.close()
                _check_identity(tmp, identity)
                # Registered first: a signal right after the rename still finds the file to discard.
                self.created.append(path)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    self.created.pop()
                    raise
            finally:
                staged.file.close()
        except OSError as e:
            _remove_own(tmp, identity)
            if e.errno == errno.ENOSPC:
                raise IdeoquantError(f"disk full while writing {path}") from None
            raise IdeoquantError(f"cannot write {path} ({e.strerror or e})") from None
        except BaseException:
            _remove_own(tmp, identity)
            raise

    def write_text(self, path: Path, text: str) -> None:
        """Write a small text file through the same partial-then-rename path."""
        with self.writing(path) as staged:
            staged.file.write(text.encode("utf-8"))

    def discard(self) -> None:
        """Remove every file this set finished (called when a later step fails)."""
        for p in self.created:
            _remove(p)
        self.created.clear()
        if self._lock is None:
            self._remove_made_dirs()


def _create_exclusive(tmp: Path) -> tuple[int, tuple[int, int]]:
    """Create `tmp` as a new file (a leftover staging file of a killed run is removed first;
    a link or anything else at the name is refused); returns its descriptor and identity."""
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise IdeoquantError(f"{tmp} is a symbolic link; refusing to write through it (remove it)")
        if not stat.S_ISREG(st.st_mode):
            raise IdeoquantError(f"{tmp} is not a regular file; refusing to write there (remove it)")
        _remove(tmp)  # unlinking a name never touches another name of the same file
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)
    except FileExistsError:
        raise IdeoquantError(f"{tmp} appeared while starting to write it; is another program writing there?") from None
    except OSError as e:
        raise IdeoquantError(f"cannot create {tmp} ({e.strerror or e})") from None
    st = os.fstat(fd)
    return fd, (st.st_dev, st.st_ino)


def _check_identity(tmp: Path, identity: tuple[int, int]) -> None:
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        raise IdeoquantError(f"{tmp} was removed while it was being written") from None
    if (st.st_dev, st.st_ino) != identity:
        raise IdeoquantError(f"{tmp} was replaced while it was being written; output not kept")


def _remove_own(tmp: Path, identity: tuple[int, int]) -> None:
    """Remove the staging file if the name still holds the file this run created."""
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == identity:
        _remove(tmp)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
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
