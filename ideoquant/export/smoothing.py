"""SmoothQuant folds, per-linear alpha search and the measured choice of protected linears.

For a group of linears sharing one input X, s_j = max|X_j|^alpha / max|W_j|^(1-alpha) per
input channel j (W over every linear of the group). X' = X / s and W' = W * s leave the
product unchanged; 1/s is folded into the op that produces X, so nothing runs at
inference time:

| group                 | 1/s folds into                      |
|-----------------------|-------------------------------------|
| attention.qkv         | attention_norm1.weight              |
| feed_forward.w1 + w3  | ffn_norm1.weight                    |
| attention.o           | the v rows of attention.qkv         |
| feed_forward.w2       | the rows of feed_forward.w3         |
| llm_cond_proj         | llm_cond_norm.weight                |

Weights are rounded with error feedback (`codecs.int8.quantize_weight_error_feedback`, GPTQ):
same per-channel scales and plain int8 codes, each column's rounding error pushed into the
columns not yet rounded, using the second moment of the (smoothed) calibration sample rows.

Alpha is chosen per group in two rounds: the W8A8 output error with round-to-nearest weights
on all sample rows ranks the candidates ("no smoothing" is one of them); the best
`ALPHA_FINALISTS` (one: each rounding of a wide linear is costly) are then rounded with error
feedback fitted on part of the rows and measured on the rows held out, so the choice rewards
what generalizes, not what the fit memorized; a linear whose held-out error is lower with round-to-nearest keeps that. Every linear's remaining error (held-out, with the rounding it is written with),
scaled to what it does to the residual stream (a block linear's branch adds only a
fraction of the stream, measured during calibration), is its impact. Protection spends a
budget of bf16 bytes (`recipes.int8_policy`): linears are taken by measured error reduction
per protected byte (impact^2 / bytes: independent errors add in quadrature) while they fit.
`protect=N` keeps the N largest impacts instead; `--protect-pattern` matches are kept on top.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..calibrate.statistics import LinearStatistics, statistics_key
from ..codecs.int8 import (
    input_second_moment,
    int8_matmul,
    quantize_per_token,
    quantize_weight_error_feedback,
    quantize_weight_per_channel,
)
from ..errors import IdeoquantError
from ..model.inventory import ModelDims, expected_tensors
from ..recipes.int8_policy import (
    ALPHA_FINALISTS,
    ALPHA_GRID,
    DEFAULT_PROTECT_BUDGET,
    HELD_OUT_EVERY,
    MAX_ERROR_FEEDBACK_INPUTS,
    MIN_ROWS_FOR_HELD_OUT,
    ROUNDINGS,
    MIN_ABSMAX,
    PROTECTED_BYTES_PER_WEIGHT,
    ProtectBudget,
    int8_eligible_weights,
)
from ..recipes.linears import matches_patterns, one_row_linears
from ..recipes.smoothquant_map import (
    FACTORS_FOLDER,
    FoldTarget,
    SmoothGroup,
    smoothing_groups,
)
from .report import human_bytes

# Bounds on a smoothing factor: beyond them a channel is numerically dead, not an outlier.
MIN_FACTOR, MAX_FACTOR = 1e-4, 1e4
# Output rows per chunk when measuring a linear's error (bounds the float32 temporaries).
MEASURE_CHUNK_ELEMENTS = 1 << 24


def factors_path(out: Path, branch: str) -> Path:
    """Where an INT8 output folder keeps a branch's SmoothQuant factors."""
    return Path(out) / FACTORS_FOLDER / f"{branch}.safetensors"


def recipe_from_factors(dims: ModelDims, factors: dict[str, torch.Tensor], origin: str) -> Int8Recipe:
    """A recipe that applies stored factors (`smooth_tensor`), after checking their names and values."""
    groups = smoothing_groups(dims)
    widths = {s.name[: -len(".weight")]: s.shape[1] for s in expected_tensors(dims) if s.kind == "linear"}
    known = {g.name: widths[g.linears[0]] for g in groups}
    checked: dict[str, torch.Tensor] = {}
    for name, s in factors.items():
        if name not in known:
            raise IdeoquantError(f"{origin}: {name} is not a smoothing group of this model")
        if s.dtype != torch.float32 or tuple(s.shape) != (known[name],):
            raise IdeoquantError(f"{origin}: factors of {name} are {s.dtype} {list(s.shape)}, expected float32 [{known[name]}]")
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise IdeoquantError(f"{origin}: factors of {name} are not all finite and positive")
        checked[name] = s
    return Int8Recipe(dims, Int8Settings(), groups, {}, checked)


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); 1 where the channel never saw data."""
    a = act_absmax.to(torch.float32).clamp_min(MIN_ABSMAX)
    w = weight_absmax.to(torch.float32).clamp_min(MIN_ABSMAX)
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(MIN_FACTOR, MAX_FACTOR)
    return torch.where(act_absmax > 0, s, torch.ones_like(s))


def smoothed_second_moment(second_moment: torch.Tensor, factors: torch.Tensor | None) -> torch.Tensor:
    """E[x'x'^T] of the smoothed inputs x' = x / s, from E[xx^T] of the raw ones."""
    if factors is None:
        return second_moment
    return second_moment / (factors[:, None] * factors[None, :])


def w8a8_relative_error(
    x: torch.Tensor,
    weight: torch.Tensor,
    factors: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    second_moment: torch.Tensor | None = None,
) -> float:
    """||Y_w8a8 - Y|| / ||Y|| of one linear on rows x, with the input smoothed by `factors` if given;
    weights rounded to nearest, or with error feedback for inputs of `second_moment` (raw, unsmoothed)."""
    xs = x if factors is None else x / factors
    qx, sx = quantize_per_token(xs)
    if reference is None:
        reference = x @ weight.t()
    fed_back = None
    if second_moment is not None:
        smoothed = weight if factors is None else weight * factors
        fed_back = quantize_weight_error_feedback(smoothed, smoothed_second_moment(second_moment, factors))
        del smoothed
    err = torch.zeros((), dtype=torch.float64, device=x.device)
    ref = torch.zeros((), dtype=torch.float64, device=x.device)
    step = max(1, MEASURE_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for r0 in range(0, weight.shape[0], step):
        w = weight[r0 : r0 + step]
        if fed_back is not None:
            qw, sw = fed_back[0][r0 : r0 + step], fed_back[1][r0 : r0 + step]
        else:
            qw, sw = quantize_weight_per_channel(w if factors is None else w * factors)
        y = int8_matmul(qx, qw).to(torch.float32) * sx * sw.reshape(1, -1)
        y_ref = reference[:, r0 : r0 + step]
        err += (y - y_ref).square().sum(dtype=torch.float64)
        ref += y_ref.square().sum(dtype=torch.float64)
    return math.sqrt(float(err) / max(float(ref), 1e-30))


@dataclass(frozen=True)
class Int8Settings:
    """How the INT8 recipe is chosen."""

    alpha: float | None = None  # None: searched per group; a value forces it (0.5 is the paper's)
    smooth: bool = True  # False: no SmoothQuant at all (plain W8A8)
    protect_budget: ProtectBudget | None = DEFAULT_PROTECT_BUDGET  # bf16 bytes spent on measured choices
    protect: int | None = None  # an explicit count instead: the N largest measured impacts stay bf16
    protect_patterns: tuple[str, ...] = ()
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    rounding: str = "error_feedback"  # how int8 weights are rounded: "error_feedback" (GPTQ) or "nearest"
    max_rows: int | None = None  # sample rows used per linear (None: all recorded)
    device: str | None = None  # where measurements run (None: cuda when available)


@dataclass
class LinearChoice:
    """What the recipe decided for one linear, with the measurements behind it."""

    module: str
    group: str | None
    quantized: bool
    kept: str | None = None  # why it stays in bf16
    alpha: float | None = None  # the SmoothQuant alpha applied (None: not smoothed)
    error: float | None = None  # measured W8A8 relative output error as written (chosen alpha and rounding)
    error_nearest: float | None = None  # with the chosen alpha and round-to-nearest weights, on all rows
    error_plain: float | None = None  # round-to-nearest without smoothing
    rounding: str = "nearest"  # how the int8 weight is rounded
    impact: float | None = None  # error scaled by the linear's gain into the residual stream (the ranking)
    weights: int = 0
    note: str = ""


@dataclass
class Int8Recipe:
    """The per-branch INT8 decisions: smoothing factors, alphas, quantized and kept linears."""

    dims: ModelDims
    settings: Int8Settings
    groups: list[SmoothGroup]
    linears: dict[str, LinearChoice]
    factors: dict[str, torch.Tensor] = field(default_factory=dict)  # active groups only
    alphas: dict[str, float | None] = field(default_factory=dict)
    protection: dict = field(default_factory=dict)  # the budget, what it bought, each linear's gain
    sample_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # error-feedback inputs per linear (raw)

    @property
    def quantized(self) -> list[str]:
        return [m for m, c in self.linears.items() if c.quantized]

    @property
    def kept(self) -> dict[str, str]:
        return {m: c.kept or "" for m, c in self.linears.items() if not c.quantized}

    @property
    def protected(self) -> list[str]:
        """Linears kept because of their measured error (ranked, worst first) or a pattern."""
        picked = [(c.impact or 0.0, m) for m, c in self.linears.items() if c.kept and c.kept.startswith(("measured", "pattern"))]
        return [m for _, m in sorted(picked, key=lambda e: -e[0])]

    def _group_of(self, module: str) -> SmoothGroup | None:
        return next((g for g in self.groups if module in g.linears), None)

    def column_factors(self, module: str) -> torch.Tensor | None:
        """s multiplying the input columns of a linear's weight, or None."""
        group = self._group_of(module)
        return self.factors.get(group.name) if group else None

    def quantize_linear(self, module: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes and per-channel scales of a linear's smoothed weight, rounded as the recipe says."""
        linear = self.linears.get(module)
        rows = self.sample_rows.get(module)
        if linear is None or linear.rounding != "error_feedback" or rows is None:
            return quantize_weight_per_channel(weight)
        device = _measure_device(self.settings)
        second_moment = input_second_moment(rows.to(device=device, dtype=torch.float32))
        s = self.column_factors(module)
        h = smoothed_second_moment(second_moment, None if s is None else s.to(device))
        q, scale = quantize_weight_error_feedback(weight.to(device=device, dtype=torch.float32), h)
        return q.to(weight.device), scale.to(weight.device)

    def folded_tensors(self) -> dict[str, FoldTarget]:
        """Tensors that receive a 1/s fold (canonical name -> the fold)."""
        return {g.fold.tensor: g.fold for g in self.groups if g.name in self.factors}

    def folded_norms(self) -> list[str]:
        """Norm weights carrying a fold: stored in float32 so the fold stays exact."""
        return [g.fold.tensor for g in self.groups if g.name in self.factors and g.fold.rows is None]

    def smooth_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A canonical float tensor with its smoothing applied (columns * s, folds / s)."""
        out = tensor.to(torch.float32)
        if name.endswith(".weight"):
            s = self.column_factors(name[: -len(".weight")])
            if s is not None and out.dim() == 2:
                out = out * s.to(out.device)[None, :]
        for group in self.groups:
            if group.fold.tensor != name or group.name not in self.factors:
                continue
            s = self.factors[group.name].to(out.device)
            if out is tensor:
                out = out.clone()
            if group.fold.rows is None:
                out = out / s
            else:
                r0, r1 = group.fold.rows
                out[r0:r1] = out[r0:r1] / s[:, None]
        return out

    def metadata(self) -> dict:
        """JSON-ready record of the recipe (output metadata and model card)."""

        def rounded(v: float | None) -> float | None:
            return None if v is None else float(f"{v:.6g}")

        settings = asdict(self.settings)
        settings["alpha_grid"] = list(settings["alpha_grid"])
        settings["protect_patterns"] = list(settings["protect_patterns"])
        return {
            "settings": settings,
            "quantized": len(self.quantized),
            "kept": self.kept,
            "protected": self.protected,
            "protection": self.protection,
            "alphas": {g: rounded(a) for g, a in self.alphas.items()},
            "linears": {
                m: {
                    "quantized": c.quantized,
                    "kept": c.kept,
                    "alpha": rounded(c.alpha),
                    "error": rounded(c.error),
                    "error_nearest": rounded(c.error_nearest),
                    "rounding": c.rounding if c.quantized else None,
                    "error_plain": rounded(c.error_plain),
                    "impact": rounded(c.impact),
                    **({"note": c.note} if c.note else {}),
                }
                for m, c in self.linears.items()
            },
        }


def _measure_device(settings: Int8Settings) -> torch.device:
    if settings.device:
        return torch.device(settings.device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sample_rows(stats: LinearStatistics | None, settings: Int8Settings) -> torch.Tensor | None:
    if stats is None or stats.count == 0 or stats.samples.shape[0] == 0:
        return None
    return stats.samples if settings.max_rows is None else stats.samples[: settings.max_rows]


def _samples(stats: LinearStatistics | None, settings: Int8Settings, device: torch.device) -> torch.Tensor | None:
    rows = _sample_rows(stats, settings)
    return None if rows is None else rows.to(device=device, dtype=torch.float32)


def _error_feedback_applies(settings: Int8Settings, x: torch.Tensor) -> bool:
    """Error feedback is asked for, enough sample rows to hold some out, and a second-moment matrix of bounded size."""
    return (
        settings.rounding == "error_feedback"
        and x.shape[0] >= MIN_ROWS_FOR_HELD_OUT
        and x.shape[1] <= MAX_ERROR_FEEDBACK_INPUTS
    )


def fit_and_held_out(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample rows split into those error feedback is fitted on and those it is measured on
    (every `HELD_OUT_EVERY`-th row held out; the rows are in random key order)."""
    held = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    held[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY] = True
    return x[~held], x[held]


def _held_out_errors(
    x: torch.Tensor, weights: dict[str, torch.Tensor], factors: torch.Tensor | None
) -> dict[str, tuple[float, str]]:
    """Each linear's W8A8 error on the held-out rows and the rounding that gives it: error feedback
    fitted on the other rows, or round-to-nearest where that generalizes better."""
    fit, held = fit_and_held_out(x)
    second_moment = input_second_moment(fit)
    out = {}
    for m, w in weights.items():
        reference = held @ w.t()
        fed_back = w8a8_relative_error(held, w, factors, reference, second_moment)
        nearest = w8a8_relative_error(held, w, factors, reference)
        out[m] = (fed_back, "error_feedback") if fed_back <= nearest else (nearest, "nearest")
    return out


def plan_int8(
    dims: ModelDims,
    read_weight: Callable[[str], torch.Tensor],
    stats: dict[str, LinearStatistics],
    settings: Int8Settings = Int8Settings(),
    gains: dict[str, float] | None = None,
) -> Int8Recipe:
    """Measure every linear on its calibration rows; choose alphas, factors and the bf16 set.

    `gains` (from `calibrate.residual_gains`) weights each block linear's error by how much
    its branch adds to the residual stream; without them the raw output errors rank.
    """
    if settings.rounding not in ROUNDINGS:
        raise IdeoquantError(f"rounding must be one of {', '.join(ROUNDINGS)}, not {settings.rounding!r}")
    device = _measure_device(settings)
    groups = smoothing_groups(dims)
    one_row = set(one_row_linears(dims))
    linears: dict[str, LinearChoice] = {}
    factors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float | None] = {}
    sample_rows: dict[str, torch.Tensor] = {}

    for group in groups:
        st = stats.get(statistics_key(group.linears[0]))
        x = _samples(st, settings, device)
        if x is None:
            for m in group.linears:
                linears[m] = LinearChoice(m, group.name, True, note="no calibration data: quantized without smoothing")
            alphas[group.name] = None
            continue
        weights = {m: read_weight(m + ".weight").to(device=device, dtype=torch.float32) for m in group.linears}
        references = {m: x @ w.t() for m, w in weights.items()}
        weight_absmax = torch.stack([w.abs().amax(dim=0) for w in weights.values()]).amax(dim=0)
        candidates: list[float | None] = [None]
        if settings.smooth:
            candidates += [settings.alpha] if settings.alpha is not None else list(settings.alpha_grid)
        errors: dict[float | None, dict[str, float]] = {}
        for alpha in candidates:
            s = None if alpha is None else smoothing_factors(st.absmax.to(device), weight_absmax, alpha)
            errors[alpha] = {m: w8a8_relative_error(x, w, s, references[m]) for m, w in weights.items()}
        # Shared s: the objective is the group's summed squared relative error.
        def objective(a: float | None, table: dict) -> tuple[float, bool]:
            return sum(e * e for e in table[a].values()), a is not None

        ranked = sorted(candidates, key=lambda a: objective(a, errors))
        if settings.smooth and settings.alpha is not None:
            ranked = [settings.alpha]
        if _error_feedback_applies(settings, x):
            held_out: dict[float | None, dict[str, tuple[float, str]]] = {}
            for alpha in ranked[:ALPHA_FINALISTS]:
                s = None if alpha is None else smoothing_factors(st.absmax.to(device), weight_absmax, alpha)
                held_out[alpha] = _held_out_errors(x, weights, s)
            errors_only = {a: {m: e for m, (e, _) in table.items()} for a, table in held_out.items()}
            chosen = min(errors_only, key=lambda a: objective(a, errors_only))
            chosen_errors = held_out[chosen]
        else:
            chosen = ranked[0]
            chosen_errors = {m: (e, "nearest") for m, e in errors[chosen].items()}
        alphas[group.name] = chosen
        if chosen is not None:
            factors[group.name] = smoothing_factors(st.absmax.to(device), weight_absmax, chosen).cpu()
        for m in group.linears:
            linears[m] = LinearChoice(
                m, group.name, True, alpha=chosen, error=chosen_errors[m][0], error_nearest=errors[chosen][m],
                error_plain=errors[None][m], rounding=chosen_errors[m][1],
            )
            if linears[m].rounding == "error_feedback":
                sample_rows[m] = _sample_rows(st, settings)
        del weights, references

    for spec in expected_tensors(dims):
        m = spec.module
        if spec.kind != "linear" or m in linears:
            continue
        if m in one_row:
            linears[m] = LinearChoice(m, None, False, kept="one row per image: no gain from per-token int8")
            continue
        x = _samples(stats.get(statistics_key(m)), settings, device)
        if x is None:
            linears[m] = LinearChoice(m, None, True, note="no calibration data")
            continue
        w = read_weight(m + ".weight").to(device=device, dtype=torch.float32)
        e = w8a8_relative_error(x, w)
        linears[m] = LinearChoice(m, None, True, error=e, error_nearest=e, error_plain=e, note="no fold target: not smoothed")
        if _error_feedback_applies(settings, x):
            linears[m].error, linears[m].rounding = _held_out_errors(x, {m: w}, None)[m]
            if linears[m].rounding == "error_feedback":
                sample_rows[m] = _sample_rows(stats.get(statistics_key(m)), settings)

    # Canonical order for the output and for ties in the ranking.
    order = {s.module: i for i, s in enumerate(expected_tensors(dims))}
    linears = dict(sorted(linears.items(), key=lambda kv: order[kv[0]]))
    weights = int8_eligible_weights(dims)
    gains = gains or {}
    for c in linears.values():
        c.weights = weights.get(c.module, 0)
        if c.error is not None:
            c.impact = c.error * gains.get(c.module, 1.0)
    protection = protect_linears(linears, settings, dims, order)
    for m, c in linears.items():
        if c.quantized and settings.protect_patterns and matches_patterns(m, list(settings.protect_patterns)):
            c.quantized, c.kept = False, "pattern: --protect-pattern"
    protection["patterns"] = [m for m, c in linears.items() if c.kept == "pattern: --protect-pattern"]
    if not any(c.quantized for c in linears.values()):
        kept = sum(1 for c in linears.values() if not c.quantized)
        raise IdeoquantError(
            f"no linear left in int8: all {kept} are kept in bf16 "
            f"({protection['describe']}{', --protect-pattern' if protection['patterns'] else ''}); "
            "lower --protect-budget or --protect"
        )

    # A group whose linears all stay bf16 gains nothing from smoothing: leave its fold target as is.
    for group in groups:
        if group.name in factors and not any(linears[m].quantized for m in group.linears):
            del factors[group.name]
            alphas[group.name] = None
            for m in group.linears:
                linears[m].alpha = None
                linears[m].note = "kept in bf16: not smoothed"
    sample_rows = {m: rows for m, rows in sample_rows.items() if linears[m].quantized}
    return Int8Recipe(dims, settings, groups, linears, factors, alphas, protection, sample_rows)


def _rss(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def protect_linears(linears: dict[str, LinearChoice], settings: Int8Settings, dims: ModelDims, order: dict[str, int]) -> dict:
    """Keep the measured linears the settings ask for in bf16 (budget or count); return what was spent and bought."""
    measured = [c for c in linears.values() if c.quantized and c.impact is not None]
    eligible_bytes = sum(int8_eligible_weights(dims).values()) * PROTECTED_BYTES_PER_WEIGHT
    chosen: list[LinearChoice] = []
    if settings.protect is not None:
        if settings.protect < 0:
            raise IdeoquantError(f"--protect must be at least 0, not {settings.protect}")
        ranked = sorted(measured, key=lambda c: (-c.impact, order[c.module]))
        chosen = ranked[: settings.protect]
        budget_bytes = None
        describe = f"--protect {settings.protect}: the {settings.protect} largest measured impacts"
        reason = f"among the {settings.protect} largest"
    elif settings.protect_budget is not None:
        budget_bytes = settings.protect_budget.bytes_for(dims)
        describe = f"budget {settings.protect_budget.describe()} ({human_bytes(budget_bytes)} of bf16)"
        # Error reduction per protected byte: protecting a linear removes its impact^2 from the
        # summed squared error. Greedy by that ratio, skipping what no longer fits.
        ranked = sorted(measured, key=lambda c: (-(c.impact**2) / max(c.weights, 1), order[c.module]))
        spent = 0
        for c in ranked:
            cost = c.weights * PROTECTED_BYTES_PER_WEIGHT
            if c.impact > 0 and spent + cost <= budget_bytes:
                chosen.append(c)
                spent += cost
        reason = "best error reduction per byte within the budget"
    else:
        budget_bytes, describe, reason = None, "no protection", ""
    for c in chosen:
        c.quantized, c.kept = False, f"measured: W8A8 impact {c.impact:.4g}, {reason}"
    before = _rss([c.impact for c in measured])
    after = _rss([c.impact for c in measured if c.quantized])
    total_sq = sum(c.impact**2 for c in measured) or 1.0
    return {
        "describe": describe,
        "budget_bytes": budget_bytes,
        "eligible_bytes": eligible_bytes,
        "spent_bytes": sum(c.weights for c in chosen) * PROTECTED_BYTES_PER_WEIGHT,
        "impact_rss_before": float(f"{before:.6g}"),
        "impact_rss_after": float(f"{after:.6g}"),
        "linears": {
            c.module: {
                "bytes": c.weights * PROTECTED_BYTES_PER_WEIGHT,
                "impact": float(f"{c.impact:.6g}"),
                "share_of_squared_impact": float(f"{c.impact**2 / total_sq:.4g}"),
            }
            for c in chosen
        },
    }

