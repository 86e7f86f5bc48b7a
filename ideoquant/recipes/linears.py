"""Which linears a recipe keeps in higher precision, by design or by pattern."""

from __future__ import annotations

import fnmatch

from ..model.inventory import ModelDims, expected_tensors, layout_modules


def one_row_linears(dims: ModelDims) -> list[str]:
    """Linear modules that see one row per image (adaLN, timestep MLP): no gain from per-token int8."""
    return [s.module for s in expected_tensors(dims) if s.kind == "linear" and s.rows_per_image == "one_row"]


def matches_patterns(module: str, patterns: list[str]) -> bool:
    """Whether a canonical module path, or any of its diffusers names, matches a glob."""
    names = [module] + layout_modules(module, "diffusers")
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def kept_linears(dims: ModelDims, patterns: list[str] | tuple[str, ...] = (), all_linears: bool = False) -> list[str]:
    """Canonical linear modules kept in bf16 by default: the one-row linears plus pattern matches."""
    kept = [] if all_linears else one_row_linears(dims)
    for spec in expected_tensors(dims):
        if spec.kind == "linear" and spec.module not in kept and matches_patterns(spec.module, list(patterns)):
            kept.append(spec.module)
    return kept
