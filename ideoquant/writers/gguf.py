"""Streaming GGUF file writer on top of `gguf.GGUFWriter`: header, metadata and tensor infos
first, then each tensor's bytes in chunks, in tensor-info order, each padded to the alignment."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

ALIGNMENT = 32


class GGUFStreamWriter:
    """Writes one GGUF v3 file whose tensors are known up front and arrive chunk by chunk."""

    def __init__(self, path: Path, arch: str, metadata: dict[str, str | int], tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]]):
        self.writer = GGUFWriter(path, arch=arch)
        w = self.writer
        for key, value in metadata.items():
            if key in ("general.file_type", "general.quantization_version"):
                continue
            if isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, int):
                w.add_uint32(key, value)
            else:
                w.add_string(key, str(value))
        if "general.file_type" in metadata:
            w.add_file_type(int(metadata["general.file_type"]))
        if "general.quantization_version" in metadata:
            w.add_quantization_version(int(metadata["general.quantization_version"]))
        w.add_custom_alignment(ALIGNMENT)
        self.expected = {}
        for name, shape, qtype, nbytes in tensors:
            # A non-uint8 dtype keeps `shape` as the logical torch shape; gguf reverses it to ggml order.
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            self.expected[name] = nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        self.fout = w.fout[0]
        self.order = [t[0] for t in tensors]
        self.index = 0
        self.written = 0
        self.digest = None

    def begin_tensor(self, name: str) -> None:
        """Start the next tensor (must follow tensor-info order)."""
        if self.index >= len(self.order) or self.order[self.index] != name:
            raise ValueError(f"GGUF tensors must be written in order; expected {self.order[self.index]!r}, got {name!r}")
        self.writer.write_padding(self.fout, self.fout.tell())
        self.written = 0
        self.digest = hashlib.sha256()

    def write_chunk(self, data: np.ndarray) -> None:
        """Append raw bytes of the current tensor."""
        view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        self.fout.write(view)
        self.digest.update(view)
        self.written += view.nbytes

    def end_tensor(self) -> str:
        """Finish the current tensor; returns the sha256 of its bytes."""
        name = self.order[self.index]
        if self.written != self.expected[name]:
            raise ValueError(f"{name}: wrote {self.written} bytes, planned {self.expected[name]}")
        self.writer.write_padding(self.fout, self.written)
        self.writer.tensors[0].pop(name)
        self.index += 1
        return self.digest.hexdigest()

    def close(self) -> None:
        """Flush and close the file."""
        self.writer.close()
