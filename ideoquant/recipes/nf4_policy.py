"""NF4 recipe: which linears stay unquantized, and why."""

from __future__ import annotations

from ..model.inventory import ModelDims
from .linears import kept_linears, one_row_linears

ONE_ROW_REASON = "one row per image (adaLN/timestep): kept unquantized"
PATTERN_REASON = "matches --protect-pattern: kept unquantized"


def nf4_kept_linears(dims: ModelDims, patterns: list[str] | tuple[str, ...] = (), all_linears: bool = False) -> dict[str, str]:
    """Canonical linear modules an NF4 conversion keeps in the compute dtype, each with its reason."""
    one_row = set() if all_linears else set(one_row_linears(dims))
    return {m: ONE_ROW_REASON if m in one_row else PATTERN_REASON for m in kept_linears(dims, patterns, all_linears)}
