"""`--max-size`: the ggml type of every tensor from measured sensitivity, within a byte budget.

Each 2-D tensor has candidate types (Q3_K..Q8_0, or the 32-weight types where its rows do
not fit 256-weight blocks), each with its bytes and its predicted error (the measured
E[x^2]-weighted relative weight error, times the square of how strongly the tensor's output
reaches the residual stream). Starting from every tensor's cheapest type, the upgrade with
the largest error reduction per extra byte is taken while the budget allows, over both
branches together. This module only chooses; measuring is the exporter's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType as QT

from ..errors import IdeoquantError
from .gguf_policy import TensorChoice

# Candidate types, cheapest first: rows that hold 256-weight blocks, and rows that only hold 32.
BUDGET_TYPES_256 = (QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0)
BUDGET_TYPES_32 = (QT.Q4_0, QT.Q5_0, QT.Q8_0)
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_max_size(text: str | int) -> int:
    """`11GiB`, `11GB`, `10.5 GiB` or a byte count -> bytes."""
    if isinstance(text, int):
        value = str(text)
    else:
        value = str(text).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", value)
    if not m or m.group(2) not in _UNITS:
        raise IdeoquantError(f"--max-size must be a size (11GiB, 11GB, 123456), not {text!r}")
    nbytes = int(float(m.group(1)) * _UNITS[m.group(2)])
    if nbytes <= 0:
        raise IdeoquantError(f"--max-size must be positive, not {text!r}")
    return nbytes


def candidate_types(row_length: int) -> tuple[QT, ...]:
    """The types a tensor with rows of this length may take under a budget."""
    return BUDGET_TYPES_256 if row_length % 256 == 0 else BUDGET_TYPES_32


@dataclass(frozen=True)
class Option:
    """One type for one tensor: its bytes and predicted error."""

    qtype: QT
    nbytes: int
    error: float


def _lower_hull(options: list[Option]) -> list[Option]:
    """Options that can be optimal under some budget: cheapest first, errors falling at a
    decreasing rate per byte (the lower convex hull)."""
    best: list[Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.error)):
        if best and o.error >= best[-1].error:
            continue  # dearer and no better
        while len(best) >= 2:
            a, b = best[-2], best[-1]
            # b lies above the segment a-o: never worth stopping at.
            if (b.error - a.error) * (o.nbytes - a.nbytes) >= (o.error - a.error) * (b.nbytes - a.nbytes):
                best.pop()
            else:
                break
        best.append(o)
    return best


def choose_within_budget(
    options: dict[tuple[str, str], list[Option]], fixed_bytes: int, budget: int
) -> tuple[dict[tuple[str, str], Option], int]:
    """Greedy by error reduction per byte over (branch, tensor) keys; returns the choice and its bytes."""
    hulls = {key: _lower_hull(opts) for key, opts in options.items()}
    level = dict.fromkeys(hulls, 0)
    total = fixed_bytes + sum(h[0].nbytes for h in hulls.values())
    if total > budget:
        raise IdeoquantError(f"--max-size {budget} bytes is below the smallest plan ({total} bytes, every tensor in its cheapest type)")
    while True:
        best, best_rate = None, 0.0
        for key, hull in hulls.items():
            i = level[key]
            if i + 1 >= len(hull):
                continue
            extra = hull[i + 1].nbytes - hull[i].nbytes
            if total + extra > budget:
                continue
            rate = (hull[i].error - hull[i + 1].error) / max(extra, 1)
            if rate > best_rate:
                best, best_rate = key, rate
        if best is None:
            break
        i = level[best]
        total += hulls[best][i + 1].nbytes - hulls[best][i].nbytes
        level[best] = i + 1
    return {key: hulls[key][level[key]] for key in hulls}, total


def budget_choices(
    base: list[TensorChoice], chosen: dict[str, Option], budget: int, error_of: dict[str, dict[QT, float]]
) -> list[TensorChoice]:
    """The plan of one branch: 1-D tensors as `base` has them, every 2-D tensor in its chosen type
    with the reason (its predicted error against the cheapest type's)."""
    out = []
    for c in base:
        option = chosen.get(c.name)
        if option is None:
            out.append(c)
            continue
        errors = error_of[c.name]
        cheapest = min(errors, key=lambda t: candidate_types(c.shape[-1]).index(t))
        reason = (
            f"--max-size {budget} B: predicted error {option.error:.3g} "
            f"({cheapest.name}: {errors[cheapest]:.3g}), chosen by error reduction per byte"
        )
        out.append(TensorChoice(c.name, c.shape, option.qtype, reason))
    return out
