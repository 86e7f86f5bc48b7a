"""Find the quantized branch a path holds, load it, and assemble a full `Ideogram4Pipeline`.

Accepted paths: a `.gguf` file (either branch); a folder of GGUF files; an INT8
(compressed-tensors) or NF4 (bitsandbytes) output folder with `transformer/` and
`unconditional_transformer/`; or one such branch folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import IdeoquantError
from ..io.tensor_folder import read_config
from ..model.inventory import BRANCHES, normalize_branch


@dataclass(frozen=True)
class BranchLocation:
    """Where one branch of a quantized output lies and in which format."""

    kind: str  # "gguf", "int8" or "nf4"
    path: Path
    branch: str | None


def _read_config(folder: Path) -> dict:
    return read_config(folder, required=True)


def _folder_kind(folder: Path) -> str:
    qc = _read_config(folder).get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "compressed-tensors":
        return "int8"
    if method == "bitsandbytes":
        return "nf4"
    if method is None:
        raise IdeoquantError(f"{folder}: config.json has no quantization_config; not an INT8 or NF4 output")
    raise IdeoquantError(f"{folder}: quantization method {method!r} is not supported (compressed-tensors or bitsandbytes)")


def _gguf_in_folder(folder: Path, branch: str | None) -> BranchLocation:
    from .gguf_loader import gguf_branch

    files = sorted(folder.glob("*.gguf"))
    wanted = branch or "transformer"
    matches = [p for p in files if gguf_branch(p) == wanted]
    if not matches:
        raise IdeoquantError(f"{folder}: no GGUF file of the {wanted} branch")
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise IdeoquantError(f"{folder}: several GGUF files of the {wanted} branch ({names}); pass the file itself")
    return BranchLocation("gguf", matches[0], wanted)


def locate_branch(path: str | Path, branch: str | None = None) -> BranchLocation:
    """Resolve a file or folder (and an optional branch name) to one loadable branch."""
    path = Path(path)
    branch = normalize_branch(branch)
    if not path.exists():
        raise IdeoquantError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise IdeoquantError(f"{path}: not a .gguf file; pass a .gguf file or an INT8/NF4 output folder")
        return BranchLocation("gguf", path, branch)
    if (path / "config.json").is_file():
        if branch is not None and path.name in BRANCHES and path.name != branch:
            raise IdeoquantError(f"{path}: a {path.name} folder, not {branch}")
        return BranchLocation(_folder_kind(path), path, branch or (path.name if path.name in BRANCHES else None))
    present = [b for b in BRANCHES if (path / b / "config.json").is_file()]
    if present:
        wanted = branch or "transformer"
        if wanted not in present:
            raise IdeoquantError(f"{path}: output folder has no {wanted}/")
        return BranchLocation(_folder_kind(path / wanted), path / wanted, wanted)
    if any(path.glob("*.gguf")):
        return _gguf_in_folder(path, branch)
    raise IdeoquantError(f"{path}: no .gguf file, config.json or branch folder; not a quantized output")


def load_transformer(
    path: str | Path,
    branch: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> torch.nn.Module:
    """A diffusers `Ideogram4Transformer2DModel` whose linears keep their quantized bytes.

    `path` is a `.gguf` file, a folder of GGUF files, or an INT8/NF4 output or branch
    folder; `branch` (`transformer`/`unconditional_transformer`, or cond/uncond) picks one
    of two branches and defaults to the conditional one. `dtype` is the compute dtype.
    """
    loc = locate_branch(path, branch)
    if loc.kind == "gguf":
        from .gguf_loader import load_gguf_transformer

        return load_gguf_transformer(loc.path, loc.branch, device=device, dtype=dtype)
    if loc.kind == "nf4":
        from .nf4_loader import load_nf4_transformer

        return load_nf4_transformer(loc.path, device=device, dtype=dtype)
    from .int8_loader import load_int8_transformer

    return load_int8_transformer(loc.path, device, dtype)


def branch_paths(output_dir_or_files: str | Path | Sequence[str | Path] | Mapping[str, str | Path]) -> dict[str, tuple[Path, str]]:
    """(path, branch) to load for each branch: from one output folder, a {branch: path} map,
    or two paths given conditional first."""
    if isinstance(output_dir_or_files, Mapping):
        items = {normalize_branch(k): Path(v) for k, v in output_dir_or_files.items()}
        missing = [b for b in BRANCHES if b not in items]
        if missing:
            raise IdeoquantError(f"no path given for the {missing[0]} branch")
        return {b: (items[b], b) for b in BRANCHES}
    if isinstance(output_dir_or_files, (str, Path)):
        root = Path(output_dir_or_files)
        if root.is_file():
            raise IdeoquantError(f"{root}: one file holds one branch; pass both files or their folder")
        return {b: (root, b) for b in BRANCHES}
    paths = [Path(p) for p in output_dir_or_files]
    if len(paths) != 2:
        raise IdeoquantError(f"expected two paths (conditional, unconditional), got {len(paths)}")
    return {b: (p, b) for b, p in zip(BRANCHES, paths)}


def load_pipeline(
    output_dir_or_files: str | Path | Sequence[str | Path] | Mapping[str, str | Path],
    base: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    **from_pretrained_kwargs,
):
    """An `Ideogram4Pipeline`: both quantized transformers plus text encoder, VAE, tokenizer and
    scheduler from `base` (a pipeline folder or Hub repo id; its transformer folders are not read)."""
    from diffusers import Ideogram4Pipeline

    transformers = {
        b: load_transformer(path, branch=br, device=device, dtype=dtype) for b, (path, br) in branch_paths(output_dir_or_files).items()
    }
    kwargs = {"torch_dtype": dtype, **from_pretrained_kwargs}
    try:
        pipe = Ideogram4Pipeline.from_pretrained(str(base), **transformers, **kwargs)
    except (OSError, ValueError) as e:
        raise IdeoquantError(f"{base}: cannot load the base pipeline ({str(e).splitlines()[0]})") from None
    return pipe.to(device)


__all__ = ["BranchLocation", "branch_paths", "load_pipeline", "load_transformer", "locate_branch"]
