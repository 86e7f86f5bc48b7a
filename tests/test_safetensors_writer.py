"""The streaming safetensors writer: files the `safetensors` package reads back exactly, shards
that keep a weight with its companions, and a read-back check that catches what went wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ideoquant.errors import IdeoquantError
from ideoquant.io.safetensors_writer import (
    PlannedTensor,
    ShardedSafetensorsOutput,
    weight_group,
)
from ideoquant.io.staging import OutputSet


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for i in range(4):
        out[f"layers.{i}.w.weight"] = torch.randint(-128, 127, (64, 32), dtype=torch.int8, generator=gen)
        out[f"layers.{i}.w.weight_scale"] = torch.rand(64, 1, generator=gen)
        out[f"layers.{i}.norm.weight"] = torch.randn(32, generator=gen).to(torch.bfloat16)
    return out


def _write(tmp_path, max_shard_bytes: int) -> tuple[ShardedSafetensorsOutput, dict[str, torch.Tensor]]:
    tensors = _tensors()
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedSafetensorsOutput(OutputSet(), tmp_path, plan, metadata={"format": "pt"}, max_shard_bytes=max_shard_bytes)
    writer.write_all(iter(tensors.items()))
    return writer, tensors


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 2500])
def test_files_read_back_exactly_with_the_safetensors_package(tmp_path, max_shard_bytes):
    writer, tensors = _write(tmp_path, max_shard_bytes)
    writer.verify()
    read: dict[str, torch.Tensor] = {}
    shards_of_group: dict[str, set[str]] = {}
    for path in writer.paths:
        shard = load_file(path)
        for name in shard:
            shards_of_group.setdefault(weight_group(name), set()).add(path.name)
        read.update(shard)
    assert all(len(shards) == 1 for shards in shards_of_group.values())  # no weight straddles shards
    assert read.keys() == tensors.keys()
    for name, t in tensors.items():
        assert read[name].dtype == t.dtype and torch.equal(read[name], t)
    if max_shard_bytes < 1 << 30:
        assert len(writer.paths) > 1
        index = json.loads(writer.index_path.read_text())
        assert index["weight_map"] == {n: p.name for p in writer.paths for n in load_file(p)}


def test_read_back_catches_changed_bytes(tmp_path):
    writer, _ = _write(tmp_path, 1 << 30)
    path = writer.paths[0]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(IdeoquantError, match="layers.3.norm.weight reads back with different bytes"):
        writer.verify()


def test_read_back_catches_a_wrong_index(tmp_path):
    writer, _ = _write(tmp_path, 2500)
    index = json.loads(writer.index_path.read_text())
    index["weight_map"]["layers.0.norm.weight"] = writer.paths[-1].name
    writer.index_path.write_text(json.dumps(index))
    with pytest.raises(IdeoquantError, match="does not map layers.0.norm.weight"):
        writer.verify()


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 2500])
def test_each_files_sha256_is_the_bytes_on_disk(tmp_path, max_shard_bytes):
    """The digest the writer computes on the way (what the model card lists) is hashlib's
    sha256 of the finished file."""
    import hashlib

    writer, _ = _write(tmp_path, max_shard_bytes)
    assert sorted(writer.sha256) == sorted(str(p) for p in writer.paths)
    for path in writer.paths:
        assert writer.sha256[str(path)] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_full_disk_in_the_writer_thread_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    """ENOSPC raised where the bytes are written (the background thread) reaches the caller
    as the one-line disk-full error, and the staged file is removed."""
    import errno

    from ideoquant.io import hashed_stream

    written = {"n": 0}

    class FullDisk:
        def __init__(self, real):
            self.real = real

        def write(self, data):
            written["n"] += 1
            if written["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.real.write(data)

        def __getattr__(self, name):
            return getattr(self.real, name)

    real_init = hashed_stream.HashedStream.__init__
    monkeypatch.setattr(hashed_stream.HashedStream, "__init__", lambda self, fout, written=b"": real_init(self, FullDisk(fout), written))
    with pytest.raises(IdeoquantError, match="disk full while writing"):
        _write(tmp_path, 1 << 30)
    assert list(tmp_path.iterdir()) == []
