"""Streaming GGUF file writer on top of `gguf.GGUFWriter`: header, metadata and tensor infos
first, then each tensor's bytes in chunks, in tensor-info order, each padded to the alignment.

Bytes go to disk through a `HashedStream` (a background thread), so the next chunk is
encoded while the last one is written; the sha256 of the whole file is computed on the way.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.gguf_writer import WriterState

from .hashed_stream import HashedStream

ALIGNMENT = 32


class GGUFStreamWriter:
    """Writes one GGUF v3 file whose tensors are known up front and arrive chunk by chunk."""

    def __init__(self, fout: BinaryIO, arch: str, metadata: dict[str, str | int],
                 tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]]):
        """`fout`: a new, empty binary file opened for writing (and reading), e.g. a staged file."""
        w = GGUFWriter(None, arch=arch)
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
        for name, shape, qtype, nbytes in tensors:
            # A non-uint8 dtype keeps `shape` as the logical torch shape; gguf reverses it to ggml order.
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        # The file is the caller's (created exclusively, never reopened by name): gguf writes
        # into an output already open when no path is given.
        w.fout = [fout]
        w.state = WriterState.EMPTY
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.fout[0].flush()
        self._gguf = w
        header = os.pread(w.fout[0].fileno(), w.fout[0].tell(), 0)
        self._stream = HashedStream(w.fout[0], header)
        self.order = [t[0] for t in tensors]
        self.sizes = {t[0]: t[3] for t in tensors}
        self.index = -1
        self.written = 0

    def begin_tensor(self, name: str) -> None:
        """Start the next tensor (must follow tensor-info order)."""
        self.index += 1
        if self.index >= len(self.order) or self.order[self.index] != name:
            raise ValueError(f"GGUF tensors must be written in order; got {name!r}")
        self._pad()
        self.written = 0

    def write_chunk(self, data: np.ndarray) -> None:
        """Append raw bytes of the current tensor."""
        flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        self._stream.put(flat)
        self.written += flat.nbytes

    def end_tensor(self) -> None:
        """Finish the current tensor."""
        name = self.order[self.index]
        if self.written != self.sizes[name]:
            raise ValueError(f"{name}: wrote {self.written} bytes, planned {self.sizes[name]}")

    def _pad(self) -> None:
        pad = -self._stream.position % ALIGNMENT
        if pad:
            self._stream.put(bytes(pad))

    def finish(self) -> str:
        """Pad the last tensor, flush, close; returns the sha256 of the whole file."""
        if self.index != len(self.order) - 1:
            raise ValueError(f"GGUF file closed after {self.index + 1} of {len(self.order)} tensors")
        self._pad()
        digest = self._stream.finish()
        self._gguf.close()
        return digest

    def close(self) -> None:
        """Stop the writer thread and close the file (also on failure)."""
        try:
            self._stream.close()
        finally:
            self._gguf.close()
