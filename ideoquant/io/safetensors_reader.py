"""One safetensors file, read through its header and memory-mapped without copying."""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import IdeoquantError

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


MAX_HEADER_BYTES = 100 * 1024 * 1024


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


class SafetensorsFile:
    """A safetensors file's header, and reads of single tensors through a memory map."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise IdeoquantError(f"{self.path}: not a safetensors file (too short)")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                    raise IdeoquantError(f"{self.path}: not a safetensors file (bad header length)")
                header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise IdeoquantError(f"{self.path}: not a safetensors file (header is not JSON)") from None
        except OSError as e:
            raise IdeoquantError(f"{self.path}: cannot read ({e.strerror})") from None
        if not isinstance(header, dict):
            raise IdeoquantError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.tensors: dict[str, StoredTensor] = {}
        data_end = 0
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                begin, end = (int(v) for v in info["data_offsets"])
                shape = tuple(int(s) for s in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise IdeoquantError(f"{self.path}: unsupported or malformed entry for tensor {name!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize:
                raise IdeoquantError(f"{self.path}: tensor {name!r} byte range does not match its shape")
            self.tensors[name] = StoredTensor(self, name, dtype, shape, self.data_start + begin, self.data_start + end)
            data_end = max(data_end, end)
        if self.data_start + data_end > size:
            raise IdeoquantError(
                f"{self.path}: truncated file ({size} bytes, header needs {self.data_start + data_end})"
            )

    def read(self, name: str) -> torch.Tensor:
        """One tensor, backed by a private (copy-on-write) memory map of just its bytes: no
        copy is made, writes never reach the file, and the pages are released when the
        tensor is freed."""
        t = self.tensors[name]
        if t.nbytes == 0:
            return torch.empty(t.shape, dtype=t.dtype)
        page = mmap.ALLOCATIONGRANULARITY
        offset = t.start - t.start % page
        with open(self.path, "rb") as f:
            # MAP_PRIVATE is copy-on-write; MAP_POPULATE faults the range in with one call
            # instead of one page fault per 4 KiB on first touch.
            flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(f.fileno(), t.end - offset, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        # The tensor holds the only reference to the map; it is unmapped with the tensor.
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=t.nbytes, offset=t.start - offset)
        return raw.view(t.dtype).reshape(t.shape)
