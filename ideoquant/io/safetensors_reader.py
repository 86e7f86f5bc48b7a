"""One safetensors file: its header validated strictly, and single tensors read on demand."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import IdeoquantError, printable
from .input_files import open_regular, parse_json, show

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# The safetensors library's own limit on the header (bytes).
MAX_HEADER_BYTES = 100_000_000
# Offsets and dims are u64 in the format.
U64_MAX = (1 << 64) - 1
# Bytes read per call when filling a tensor (a short read is a file that shrank).
READ_CHUNK = 64 << 20


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    file: "SafetensorsFile"
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _u64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SafetensorsFile:
    """A safetensors file's header, and reads of single tensors.

    The header is held to the rules the `safetensors` library enforces: a JSON object of
    `{dtype, shape, data_offsets}` entries plus an optional string-to-string `__metadata__`;
    known dtypes; non-negative integer dims; byte ranges that match the shapes and tile the
    data area from 0 to the end of the file with no gap, overlap or alias; no duplicate
    names. Tensors are read with plain reads, not a memory map, so a file truncated while it
    is being converted gives a one-line error instead of a SIGBUS.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        where = show(self.path)
        try:
            with open_regular(self.path) as f:
                st = os.fstat(f.fileno())
                head = f.read(8)
                if len(head) < 8:
                    raise IdeoquantError(f"{where}: not a safetensors file (too short)")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > MAX_HEADER_BYTES or 8 + header_len > st.st_size:
                    raise IdeoquantError(f"{where}: not a safetensors file (bad header length)")
                raw = f.read(header_len)
        except OSError as e:
            raise IdeoquantError(f"{where}: cannot read ({e.strerror})") from None
        if len(raw) != header_len:
            raise IdeoquantError(f"{where}: file shrank while its header was read")
        if not raw.lstrip(b" \t\r\n").startswith(b"{"):
            raise IdeoquantError(f"{where}: not a safetensors file (header is not a JSON object)")
        header = parse_json(raw, f"{where}: safetensors header")
        if not isinstance(header, dict):
            raise IdeoquantError(f"{where}: not a safetensors file (header is not a JSON object)")
        self._identity = _identity(st)
        self.metadata: dict[str, str] = self._metadata(header.pop("__metadata__", None))
        self.data_start = 8 + header_len
        self.tensors: dict[str, StoredTensor] = {}
        ranges: list[tuple[int, int, str]] = []
        for name, info in header.items():
            dtype, shape, begin, end = self._entry(name, info)
            self.tensors[name] = StoredTensor(self, name, dtype, shape, self.data_start + begin, self.data_start + end)
            ranges.append((begin, end, name))
        data_end = self._check_tiling(ranges)
        if self.data_start + data_end > st.st_size:
            raise IdeoquantError(f"{where}: truncated file ({st.st_size} bytes, header needs {self.data_start + data_end})")
        if self.data_start + data_end < st.st_size:
            raise IdeoquantError(
                f"{where}: {st.st_size - self.data_start - data_end} bytes after the last tensor that no header entry covers"
            )

    def _metadata(self, value: object) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise IdeoquantError(f"{show(self.path)}: __metadata__ must be an object of strings")
        for key, item in value.items():
            if not isinstance(item, str):
                raise IdeoquantError(f"{show(self.path)}: __metadata__ value for {printable(repr(key))} is not a string")
        return value

    def _entry(self, name: str, info: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, begin, end) of one header entry, every field checked."""
        bad = f"{show(self.path)}: tensor {printable(repr(name))}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise IdeoquantError(f"{bad}: entry must be an object with dtype, shape and data_offsets")
        dtype_name = info["dtype"]
        if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
            raise IdeoquantError(f"{bad}: unsupported or malformed dtype {printable(repr(dtype_name))[:40]}")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(_u64(s) for s in shape):
            raise IdeoquantError(f"{bad}: shape must be a list of non-negative integers, not {printable(str(shape))[:60]}")
        offsets = info["data_offsets"]
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_u64(v) for v in offsets):
            raise IdeoquantError(f"{bad}: data_offsets must be two non-negative integers, not {printable(str(offsets))[:60]}")
        begin, end = offsets
        dtype = SAFETENSORS_DTYPES[dtype_name]
        numel = 1
        for s in shape:
            numel *= s
        if end < begin or end - begin != numel * dtype.itemsize:
            raise IdeoquantError(f"{bad}: byte range {begin}-{end} does not match its shape {shape} and dtype {dtype_name}")
        return dtype, tuple(shape), begin, end

    def _check_tiling(self, ranges: list[tuple[int, int, str]]) -> int:
        """The tensors' byte ranges, in order, must follow one another from 0 with no gap or
        overlap (two names on the same bytes, or one range inside another, are refused):
        the end of the data area."""
        position = 0
        previous = ""
        for begin, end, name in sorted(ranges):
            if begin != position:
                what = "overlaps" if begin < position else "leaves a gap after"
                other = printable(repr(previous)) if previous else "the start of the data"
                raise IdeoquantError(
                    f"{show(self.path)}: tensor {printable(repr(name))} (bytes {begin}-{end}) {what} {other}"
                )
            position, previous = end, name
        return position

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read into its own memory (the file may be changed or truncated meanwhile:
        that is a one-line error, never a fault)."""
        t = self.tensors[name]
        out = torch.empty(t.nbytes, dtype=torch.uint8)
        if t.nbytes:
            where = show(self.path)
            try:
                with open_regular(self.path) as f:
                    now = _identity(os.fstat(f.fileno()))
                    if now != self._identity:
                        raise IdeoquantError(
                            f"{where}: changed since it was opened (now {now[2]} bytes, was {self._identity[2]}); "
                            "was it replaced or truncated?"
                        )
                    f.seek(t.start)
                    view = memoryview(out.numpy())
                    filled = 0
                    while filled < t.nbytes:
                        got = f.readinto(view[filled : filled + READ_CHUNK])
                        if not got:
                            raise IdeoquantError(f"{where}: file shrank while tensor {printable(repr(name))} was read")
                        filled += got
            except OSError as e:
                raise IdeoquantError(f"{where}: cannot read ({e.strerror})") from None
        return out.view(t.dtype).reshape(t.shape)
