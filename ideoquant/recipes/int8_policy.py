"""INT8 W8A8 recipe defaults: the SmoothQuant alpha grid and the protection budget.

Protection is a budget of bf16 bytes per branch, not a count of linears: a count tuned to
34 blocks means nothing at another depth, and linears differ in size (`llm_cond_proj`
holds 245 M weights, four `feed_forward.w2`). The budget covers the int8-eligible linears
only; the one-row linears kept by design (`recipes.linears.one_row_linears`) are outside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import IdeoquantError
from ..model.inventory import ModelDims, expected_tensors

ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# The best alphas by round-to-nearest error that are then compared with error-feedback rounding.
# One: each error-feedback rounding of a 12288-input `w2` costs tens of seconds on a CPU
# (bench/int8_rounding_cost.py), and the held-out comparison of three finalists did not
# lower the end-to-end error (bench/int8_errors.py; README "INT8 W8A8").
ALPHA_FINALISTS = 1
# How int8 weights may be rounded: error feedback (GPTQ, the default) or to nearest.
ROUNDINGS = ("error_feedback", "nearest")
# Every HELD_OUT_EVERY-th calibration sample row is held out of the error-feedback fit and
# measures it; with fewer rows than MIN_ROWS_FOR_HELD_OUT, weights are rounded to nearest.
HELD_OUT_EVERY = 4
MIN_ROWS_FOR_HELD_OUT = 16
# Linears with more inputs are rounded to nearest: their second-moment matrix (in^2 floats)
# and its factorization would dwarf the weight (`llm_cond_proj`: 53248 inputs, 11 GB).
MAX_ERROR_FEEDBACK_INPUTS = 16384

MIN_ABSMAX = 1e-6

# Bytes per weight of a linear kept out of int8.
PROTECTED_BYTES_PER_WEIGHT = 2


def int8_eligible_weights(dims: ModelDims) -> dict[str, int]:
    """Weights of every linear that per-token int8 applies to (all but the one-row linears), by module."""
    return {
        s.module: s.numel for s in expected_tensors(dims) if s.kind == "linear" and s.rows_per_image != "one_row"
    }


def paper_share(dims: ModelDims = ModelDims()) -> float:
    """The paper's protected share: 17 of the 34 `feed_forward.w2` of the published model, as a
    fraction of its int8-eligible linear weights (about 11%)."""
    weights = int8_eligible_weights(dims)
    w2 = weights["layers.0.feed_forward.w2"]
    return 17 * w2 / sum(weights.values())


@dataclass(frozen=True)
class ProtectBudget:
    """How many bf16 bytes a branch may spend on linears protected for their measured error:
    a fraction of its int8-eligible linear weights, or a size in bytes."""

    fraction: float | None = None
    nbytes: int | None = None

    def bytes_for(self, dims: ModelDims) -> int:
        """The budget in bf16 bytes for a branch of these dims."""
        if self.nbytes is not None:
            return self.nbytes
        eligible = sum(int8_eligible_weights(dims).values())
        return int(self.fraction * eligible) * PROTECTED_BYTES_PER_WEIGHT

    def describe(self) -> str:
        """`11.3% of the int8-eligible linear weights` or `1.50 GiB`."""
        if self.nbytes is not None:
            return _human_bytes(self.nbytes)
        return f"{100 * self.fraction:.3g}% of the int8-eligible linear weights"


# The default protection, used by the CLI, ConvertOptions and the demo alike.
DEFAULT_PROTECT_BUDGET = ProtectBudget(fraction=paper_share())

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_protect_budget(text: str | float | int | ProtectBudget) -> ProtectBudget:
    """`0.11`, `11%`, `paper` (fractions of the eligible weights) or `1.5GiB`, `800MB`, `123456` (bytes)."""
    if isinstance(text, ProtectBudget):
        return text
    if isinstance(text, float):
        text = repr(text)
    elif isinstance(text, int):
        text = f"{text}B"
    value = str(text).strip().lower()
    if value == "paper":
        return DEFAULT_PROTECT_BUDGET
    bad = IdeoquantError(
        f"--protect-budget must be a fraction (0.11, 11%) or a size (1.5GiB, 800MB), not {text!r}"
    )
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(%|[a-z]*)", value)
    if not m:
        raise bad
    number, unit = float(m.group(1)), m.group(2)
    if unit == "%" or (unit == "" and "." in m.group(1)) or (unit == "" and number == 0):
        fraction = number / 100 if unit == "%" else number
        if not 0.0 <= fraction < 1.0:
            raise IdeoquantError(f"--protect-budget fraction must lie in [0, 1), not {text!r}")
        return ProtectBudget(fraction=fraction)
    if unit not in _UNITS:
        raise bad
    return ProtectBudget(nbytes=int(number * _UNITS[unit]))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
