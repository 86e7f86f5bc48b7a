"""Streaming safetensors writer: header from a plan, then tensors one by one, optional shards."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import IdeoquantError
from .hashed_stream import HashedStream
from .safetensors_reader import SafetensorsFile
from .staging import OutputSet

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor a writer will receive: its name, dtype and shape are known before any data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def _header_bytes(plan: list[PlannedTensor], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    offset = 0
    for t in plan:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw


def tensor_digest(t: torch.Tensor) -> str:
    """A digest of a tensor's bytes, to compare what was written with what reads back."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()


class SafetensorsWriter:
    """Writes one safetensors file; tensors must arrive in plan order. Their bytes go to disk
    through a `HashedStream` (a background thread): `digests` records each tensor's bytes
    once written, `finish` returns the sha256 of the whole file."""

    def __init__(self, fh, plan: list[PlannedTensor], metadata: dict[str, str] | None = None):
        self.plan = plan
        self.next = 0
        header = _header_bytes(plan, metadata)
        fh.write(header)
        self._stream = HashedStream(fh, header)

    @property
    def digests(self) -> dict[str, str]:
        return self._stream.digests

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (not to be modified afterwards: it may still be queued)."""
        expected = self.plan[self.next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise ValueError(
                f"writer expected {expected.name} {expected.dtype} {list(expected.shape)}, "
                f"got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        self._stream.put(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8), name)
        self.next += 1

    def finished(self) -> bool:
        return self.next == len(self.plan)

    def finish(self) -> str:
        """Wait until every tensor is written; the sha256 of the whole file."""
        return self._stream.finish()

    def close(self) -> None:
        """Stop the writer thread (also on failure)."""
        self._stream.close()


def weight_group(name: str) -> str:
    """The weight a tensor belongs with: `x.weight` for `x.weight_scale` or `x.weight.absmax`."""
    cut = name.find(".weight")
    return name[: cut + len(".weight")] if cut >= 0 else name


def shard_plan(plan: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split a plan into consecutive shards of at most `max_shard_bytes` (one tensor group may
    exceed it). A weight and its companions (scales, quant state) never straddle shards:
    diffusers loads quantized checkpoints shard by shard."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan:
        same_group = bool(shards[-1]) and weight_group(shards[-1][-1].name) == weight_group(t.name)
        if shards[-1] and not same_group and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


class ShardedSafetensorsOutput:
    """A diffusers weight folder: one file, or shards plus `*.safetensors.index.json`.

    Tensors are handed over one at a time in plan order; each shard is staged as
    `*.partial` and renamed when complete, the index is written last; `verify` reads it all
    back.
    """

    def __init__(
        self,
        outputs: OutputSet,
        folder: Path,
        plan: list[PlannedTensor],
        metadata: dict[str, str] | None = None,
        stem: str = "diffusion_pytorch_model",
        max_shard_bytes: int = 10 * 2**30,
    ):
        self.outputs = outputs
        self.folder = Path(folder)
        self.metadata = metadata
        self.shards = shard_plan(plan, max_shard_bytes)
        n = len(self.shards)
        if n == 1:
            self.paths = [self.folder / f"{stem}.safetensors"]
        else:
            self.paths = [self.folder / f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.index_path = self.folder / f"{stem}.safetensors.index.json" if n > 1 else None
        self.digests: dict[str, str] = {}
        # The sha256 of each file as written (for the model card).
        self.sha256: dict[str, str] = {}
        for p in self.paths + ([self.index_path] if self.index_path else []):
            outputs.claim(p)

    def write_all(self, tensors) -> None:
        """Consume an iterator of (name, tensor) in plan order and finish every file."""
        it = iter(tensors)
        for shard, path in zip(self.shards, self.paths):
            with self.outputs.writing(path) as staged:
                writer = SafetensorsWriter(staged.file, shard, self.metadata)
                try:
                    while not writer.finished():
                        try:
                            name, tensor = next(it)
                        except StopIteration:
                            raise IdeoquantError(f"{path}: ran out of tensors before {shard[writer.next].name}") from None
                        writer.write(name, tensor)
                    self.sha256[str(path)] = writer.finish()
                finally:
                    writer.close()
            self.digests.update(writer.digests)
        if next(it, None) is not None:
            raise IdeoquantError(f"{self.folder}: more tensors than planned")
        if self.index_path is not None:
            weight_map = {t.name: p.name for shard, p in zip(self.shards, self.paths) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            self.outputs.write_text(self.index_path, json.dumps(index, indent=2) + "\n")

    @property
    def files(self) -> list[Path]:
        return self.paths + ([self.index_path] if self.index_path else [])

    def verify(self) -> None:
        """Reopen the written files: every planned tensor once, with its dtype, shape and the
        bytes written; the index (when sharded) maps each tensor to the shard that holds it."""
        planned = {t.name: t for shard in self.shards for t in shard}
        where: dict[str, str] = {}
        for path in self.paths:
            f = SafetensorsFile(path)
            for name, stored in f.tensors.items():
                p = planned.get(name)
                if p is None or name in where:
                    raise IdeoquantError(f"{path}: unexpected or duplicate tensor {name} after writing")
                if stored.dtype != p.dtype or stored.shape != p.shape:
                    raise IdeoquantError(f"{path}: {name} reads back as {stored.dtype} {list(stored.shape)}")
                if tensor_digest(f.read(name)) != self.digests.get(name):
                    raise IdeoquantError(f"{path}: {name} reads back with different bytes")
                where[name] = path.name
        missing = set(planned) - set(where)
        if missing:
            raise IdeoquantError(f"written files lack {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        if self.index_path is not None:
            weight_map = json.loads(self.index_path.read_text())["weight_map"]
            if weight_map != where:
                wrong = min(set(weight_map.items()) ^ set(where.items()))[0]
                raise IdeoquantError(f"{self.index_path}: does not map {wrong} to the shard that holds it")


def save_safetensors(outputs: OutputSet, path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write a small dict of tensors as one safetensors file, atomically."""
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with outputs.writing(path) as staged:
        writer = SafetensorsWriter(staged.file, plan, metadata)
        try:
            for n, t in tensors.items():
                writer.write(n, t)
            writer.finish()
        finally:
            writer.close()
