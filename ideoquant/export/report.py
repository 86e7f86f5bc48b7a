"""Plain-text tables of conversion results (CLI summary, demo, benchmarks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import printable

if TYPE_CHECKING:
    from .options import BranchResult


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned text columns (cells come from files: control characters are escaped)."""
    header = [printable(str(c)) for c in header]
    rows = [[printable(str(c)) for c in r] for r in rows]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def bits_per_weight(result: "BranchResult") -> float:
    """Output bits per source weight (all tensors of the branch)."""
    return 8 * result.output_bytes / max(result.weights, 1)


def summary_table(results: list["BranchResult"]) -> str:
    """One row per branch: file(s), size, bits per weight, mean and worst relative error."""
    rows = []
    for r in results:
        err = r.error_summary()
        name = r.files[0].name if len(r.files) == 1 else f"{r.files[0].parent.name}/ ({len(r.files)} files)"
        rows.append([
            name,
            human_bytes(r.output_bytes),
            f"{bits_per_weight(r):.2f}",
            f"{err['mean']:.2e}",
            f"{err['max']:.2e}",
            f"{r.seconds:.1f}s",
        ])
    return format_table(["file", "size", "bits/weight", "mean rel err", "worst rel err", "time"], rows)
