"""A folder of safetensors files read as one mapping of tensor names: shards, index, config.

Every reader of weights (the converter's source, the runtime loaders, `verify`) finds its
files and reads its `config.json` here, so that shards, a stale index, a name prefix and a
malformed index are handled the same way everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import IdeoquantError, printable
from ..model.inventory import CONFIG_KEYS, detect_prefix
from .input_files import json_int, json_list, json_number, json_object, json_str, load_json, show
from .safetensors_reader import SafetensorsFile, StoredTensor

log = logging.getLogger("ideoquant")

INDEX_SUFFIX = ".safetensors.index.json"


def read_index(index: Path) -> dict[str, str]:
    """The `weight_map` of a shard index: tensor name -> shard file name inside the same folder."""
    where = show(index)
    data = json_object(load_json(index, "safetensors index"), f"{where}: the index")
    if "weight_map" not in data:
        raise IdeoquantError(f"{where}: malformed safetensors index (no weight_map)")
    weight_map = json_object(data["weight_map"], f"{where}: weight_map")
    for tensor, shard in weight_map.items():
        json_str(shard, f"{where}: weight_map[{printable(repr(tensor))}]")
    for shard in set(weight_map.values()):
        # Shards live beside their index: a path that leaves the folder is refused, never followed.
        if Path(shard).name != shard or shard in ("", ".", "..") or "\\" in shard:
            raise IdeoquantError(f"{where}: shard name {printable(repr(shard))} points outside its folder")
    return weight_map


def find_safetensors(folder: Path, strict: bool = False) -> list[Path]:
    """The safetensors files of a branch folder, through its index when it has one.

    A source (`strict=False`) may carry a stale index that names missing shards beside one
    complete file: that file is used, with a warning. A written output (`strict=True`) must
    hold exactly the shards its index names.
    """
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    singles = sorted(folder.glob("*.safetensors"))
    if not indexes:
        if not singles:
            raise IdeoquantError(f"{folder}: no .safetensors files")
        return singles
    index = indexes[0]
    shards = sorted(set(read_index(index).values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if not missing:
        return [folder / s for s in shards]
    whole = [p for p in singles if p.name not in shards]
    if not strict and len(whole) == 1:
        log.warning("%s names missing files (%s); using %s", index.name, ", ".join(missing), whole[0].name)
        return whole
    raise IdeoquantError(f"{index}: shard {missing[0]} is missing")


# config.json fields the readers use, by type: widths (positive integers), numbers, lists.
CONFIG_INTEGERS = tuple(CONFIG_KEYS) + ("num_attention_heads",)
CONFIG_NUMBERS = ("rope_theta", "norm_eps")


def read_config(folder: Path, required: bool = False) -> dict | None:
    """A folder's `config.json` as a dict (None when absent and not required), every field
    the readers use type-checked: one line naming a field of the wrong type."""
    path = folder / "config.json"
    if not path.exists():
        if required:
            raise IdeoquantError(f"{show(folder)}: no config.json")
        return None
    where = show(path)
    config = json_object(load_json(path, "config.json"), f"{where}: the file")
    for key in CONFIG_INTEGERS:
        if key in config:
            json_int(config[key], f"{where}: {key}", minimum=1)
    for key in CONFIG_NUMBERS:
        if key in config:
            json_number(config[key], f"{where}: {key}")
    if "mrope_section" in config:
        for item in json_list(config["mrope_section"], f"{where}: mrope_section"):
            json_int(item, f"{where}: mrope_section entry", minimum=0)
    if "quantization_config" in config:
        json_object(config["quantization_config"], f"{where}: quantization_config")
    return config


class TensorFolder(Mapping):
    """The tensors of one or more safetensors files by name, a common name prefix stripped.

    A name stored twice is an error. Values are `StoredTensor` locations; `read` reads one
    tensor's bytes.
    """

    def __init__(self, files: list[SafetensorsFile], origin: str, prefix: str | None = None) -> None:
        self.files = files
        self.origin = origin
        names = [n for f in files for n in f.tensors]
        self.prefix = detect_prefix(names) if prefix is None else prefix
        self._stored: dict[str, StoredTensor] = {}
        for f in files:
            for name, t in f.tensors.items():
                if self.prefix:
                    if not name.startswith(self.prefix):
                        continue
                    name = name[len(self.prefix) :]
                if name in self._stored:
                    raise IdeoquantError(f"tensor {name!r} appears in both {self._stored[name].file.path} and {f.path}")
                self._stored[name] = t

    @classmethod
    def open(cls, folder: Path, strict: bool = False, prefix: str | None = None) -> "TensorFolder":
        """The tensors of a branch folder (see `find_safetensors` for `strict`)."""
        found = cls([SafetensorsFile(p) for p in find_safetensors(folder, strict)], str(folder), prefix)
        if strict:
            found.check_index(folder)
        return found

    def __getitem__(self, name: str) -> StoredTensor:
        return self._stored[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Stored name -> shape, without reading any data."""
        return {n: t.shape for n, t in self._stored.items()}

    def read(self, name: str) -> torch.Tensor:
        """One tensor as stored, read into its own memory."""
        t = self._stored[name]
        return t.file.read(t.name)

    def tensors(self) -> Mapping[str, torch.Tensor]:
        """The same names mapped to tensors, each read when asked for."""
        return _ReadOnAccess(self)

    def check_index(self, folder: Path) -> None:
        """A written folder's index names exactly the tensors its shards hold."""
        indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
        if not indexes:
            return
        weight_map = read_index(indexes[0])
        by_file = {f.path.name: f for f in self.files}
        for key, shard in weight_map.items():
            if key not in by_file[shard].tensors:
                raise IdeoquantError(f"{indexes[0]}: {key} is not in {shard}")
        unindexed = [k for name, f in by_file.items() for k in f.tensors if weight_map.get(k) != name]
        if unindexed:
            raise IdeoquantError(f"{indexes[0]}: {unindexed[0]} is in a shard but not in the index")


class _ReadOnAccess(Mapping):
    """A TensorFolder seen as name -> tensor (each read on access)."""

    def __init__(self, folder: TensorFolder) -> None:
        self._folder = folder

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._folder.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._folder)

    def __len__(self) -> int:
        return len(self._folder)

    def __contains__(self, name: object) -> bool:
        return name in self._folder  # without reading the tensor, as Mapping's default would
