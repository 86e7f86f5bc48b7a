"""Bytes to an output file from a background thread, hashed on the way: what both output
writers (GGUF and safetensors) stream through, so that the next tensor is encoded while the
last one is written (file writes and hashing release the GIL).

The sha256 of the whole file as written goes into the model card; a blake2b of each named
item lets the safetensors writer check what reads back. A write error (a full disk, say)
is raised on the caller's thread at its next call.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import BinaryIO

import numpy as np
import torch

# Items queued before `put` waits for the writer: bounds the memory held by pending bytes.
QUEUED_ITEMS = 3


class HashedStream:
    """Appends byte items to an open file on a background thread, hashing them."""

    def __init__(self, fout: BinaryIO, written: bytes = b""):
        """`fout`: a file positioned just after `written`, the bytes already in it (a header),
        with which the sha256 starts."""
        self.fout = fout
        self.sha256 = hashlib.sha256(written)
        self.position = len(written)
        self.digests: dict[str, str] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUED_ITEMS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            data, name = item
            try:
                view = memoryview(data.numpy() if isinstance(data, torch.Tensor) else data)
                self.fout.write(view)
                self.sha256.update(view)
                if name is not None:
                    self.digests[name] = hashlib.blake2b(view, digest_size=16).hexdigest()
            except BaseException as e:  # surfaced on the caller's thread
                self._error = e

    def put(self, data: torch.Tensor | np.ndarray | bytes, name: str | None = None) -> None:
        """Queue flat bytes (a uint8 tensor or array, or bytes), which must not change until
        written; with `name`, their blake2b is recorded in `digests[name]`."""
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise ValueError("stream already finished")
        self._queue.put((data, name))
        self.position += len(data) if isinstance(data, bytes) else data.nbytes

    def finish(self) -> str:
        """Wait until everything queued is written; the sha256 of the whole file."""
        self.close()
        return self.sha256.hexdigest()

    def close(self) -> None:
        """Stop the thread (also on failure), then raise a write error that happened."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
