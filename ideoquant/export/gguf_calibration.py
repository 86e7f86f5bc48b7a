"""Activation-aware GGUF encoding from calibration statistics (`convert --calibration` on GGUF).

Each linear with recorded inputs gets its codes from GPTQ-style error feedback on the stock
ggml grid (`codecs.ggml.error_feedback`), against the input second-moment matrix

    H = (1 - a) * X^T X / n + a * diag(E[x^2])

where X are the sampled calibration rows (at most a few hundred per linear) and E[x^2] the
per-channel mean square over every calibration token. At full width a few hundred rows span
a small part of the input space: the codes would fit those rows and little else. The
diagonal from all tokens keeps H full rank and the feedback honest on held-out inputs. Its
share a is the Ledoit-Wolf estimate of how much of the sampled off-diagonal is noise, at
least DIAGONAL_SHARE: inputs whose channels are nearly uncorrelated (input_proj's latents)
get close to round-to-nearest instead of feedback fitted to noise.
The headers are the stock encoder's with E[x^2] as importance matrix, so every GGUF reader
decodes the files unchanged. Columns go in descending E[x^2] order (GPTQ's act-order): the
channels that carry most signal are rounded first, while the most columns remain to absorb
their error. Settings chosen on the project's checkpoint (bench/frontier.py), checked on
generator settings they were not chosen on.

The timestep-only linears (the timestep MLP, `adaln_proj`, every adaLN modulation) see a
function of the timestep alone: their rows come from the weights on a dense grid of
timesteps (`calibrate.timestep_inputs`) instead of the few timesteps calibration ran.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibrate.statistics import CalibrationStatistics, LinearStatistics
from ..calibrate.timestep_inputs import GRID_TIMESTEPS, timestep_linears, timestep_statistics
from ..codecs.ggml.base import GGMLType
from ..codecs.ggml.error_feedback import (
    activation_order,
    inverse_cholesky_factor,
    permuted,
    quantize_with_feedback,
    quantize_with_feedback_ordered,
    supports_feedback,
)
from ..codecs.ggml.registry import ggml_type
from ..errors import IdeoquantError
from ..io.source import BranchSource
from ..recipes.gguf_policy import TensorChoice
from .int8_branch import calibration_summary, load_branch_statistics

METADATA_KEY = "ideoquant.calibration"
METHOD = ("GPTQ error feedback on the stock ggml grid, columns by descending E[x^2]; "
          "block headers from ggml's encoder with E[x^2] importance; timestep-only linears "
          f"on their exact inputs at {GRID_TIMESTEPS} timesteps over [0, 1]")
# Least share of H taken by the all-token diagonal E[x^2] (see the module docstring).
DIAGONAL_SHARE = 0.1
# Damping of H, as a fraction of its mean diagonal.
DAMPING = 0.05
# Widest input that gets feedback: H is in_features^2 float32 (12288: 0.6 GB). Wider
# linears (llm_cond_proj, 53248 inputs) keep the stock encoder with the importance matrix.
MAX_FEEDBACK_WIDTH = 12288
# Columns in descending E[x^2] order with headers fixed up front, or in natural order with
# each span's headers chosen after the feedback it received.
ACTIVATION_ORDER = True


def check_calibration_format(fmt: str, choices: list[TensorChoice]) -> None:
    """One line when --calibration cannot change a GGUF format's per-block linears."""
    block_types = {c.qtype for c in choices if c.name.startswith("layers.") and len(c.shape) == 2}
    unserved = sorted(t.name for t in block_types if not supports_feedback(ggml_type(t)))
    if not block_types or unserved:
        raise IdeoquantError(
            f"--calibration on GGUF applies to q4_0, q4_k, q5_k, q6_k, q8_0, q4_k_m and q5_k_m; "
            f"{fmt} stores its block linears in {', '.join(unserved) or 'no quantized type'}"
        )


def sampling_noise_share(samples: torch.Tensor, product: torch.Tensor) -> float:
    """Ledoit-Wolf estimate of how much of the off-diagonal S = X^T X / n is sampling noise, in [0, 1].

    sum_{i!=j} Var(s_ij) / sum_{i!=j} s_ij^2, with Var(s_ij) = (E[x_i^2 x_j^2] - s_ij^2) / n: near
    0 where the samples pin the channel correlations down, near 1 where the inputs are
    uncorrelated and the off-diagonal entries are noise that feedback would fit. `product`
    is S (float32 [k, k]); the fourth moments come from row norms, in O(n k)."""
    n = samples.shape[0]
    if n < 2:
        return 1.0
    # In row slices: at 12288 inputs a k x k temporary would be another 0.6 GB.
    total = sum(float(product[i : i + 1024].square().sum(dtype=torch.float64)) for i in range(0, product.shape[0], 1024))
    off_squares = total - float(torch.diagonal(product).double().square().sum())
    if off_squares <= 0:
        return 1.0
    x2 = samples.to(torch.float64).square()
    # sum_{i!=j} E[x_i^2 x_j^2] = E[(sum_i x_i^2)^2] - E[sum_i x_i^4]
    fourth = float(x2.sum(1).square().mean() - x2.square().sum(1).mean())
    return min(1.0, max(0.0, (fourth - off_squares) / n / off_squares))


def second_moments(stats: LinearStatistics, floor: float = DIAGONAL_SHARE) -> tuple[torch.Tensor, float]:
    """H of one linear (float32 [in, in]) from its sampled rows and its all-token E[x^2], and the
    diagonal's share: the sampling-noise estimate of the samples, at least `floor`."""
    x = stats.samples.to(torch.float32)
    if x.shape[0] == 0:
        return torch.diag(stats.importance()), 1.0
    h = x.T @ x / x.shape[0]
    share = max(floor, sampling_noise_share(x, h))
    h.mul_(1.0 - share)
    torch.diagonal(h).add_(share * stats.importance())
    return h, share


def output_error(weight: torch.Tensor, decoded: torch.Tensor, rows: torch.Tensor) -> float:
    """||X (W_q - W)^T|| / ||X W^T|| on the given input rows."""
    exact = rows @ weight.T
    return float((rows @ decoded.T - exact).norm() / exact.norm().clamp_min(1e-30))


@dataclass
class FeedbackMeasurement:
    """One linear's output errors on its calibration rows, and the H it was encoded against."""

    aware_error: float
    plain_error: float
    diagonal_share: float

    def note(self) -> str:
        """The report line of this tensor."""
        return (
            f"error feedback: output error on the calibration rows {self.aware_error:.4g} "
            f"(round-to-nearest {self.plain_error:.4g}); diagonal share of H {self.diagonal_share:.3g}"
        )


@dataclass
class AwareTensor:
    """One tensor encoded with feedback, and its measurement."""

    data: torch.Tensor
    measured: FeedbackMeasurement


class GGUFCalibration:
    """The calibration statistics of one branch, used by the GGUF writer."""

    def __init__(self, path: Path, bs: BranchSource):
        self.path = Path(path)
        self.stats: CalibrationStatistics = load_branch_statistics(self.path, bs)
        self.summary = calibration_summary(self.stats, self.path, bs)
        self.branch = bs.branch
        self._bs = bs
        self._timestep_modules = set(timestep_linears(bs.dims))
        self._timestep_stats: dict[str, LinearStatistics] | None = None

    def linear(self, name: str) -> LinearStatistics | None:
        """Statistics of the linear that owns weight `name` (None where it saw no data); for
        a timestep-only linear, its inputs on the timestep grid."""
        module = name.rsplit(".", 1)[0]
        if module in self._timestep_modules:
            if self._timestep_stats is None:
                self._timestep_stats = timestep_statistics(self._bs.read_float32, self._bs.dims)
            return self._timestep_stats[module]
        st = self.stats.get(self.branch, module)
        return st if st is not None and st.count > 0 else None

    def importance(self, name: str) -> torch.Tensor | None:
        """E[x^2] of the weight's input channels, or None."""
        st = self.linear(name)
        return None if st is None else st.importance()

    def serves(self, c: TensorChoice) -> bool:
        """Whether this tensor gets error feedback."""
        return (
            len(c.shape) == 2
            and c.shape[1] <= MAX_FEEDBACK_WIDTH
            and supports_feedback(ggml_type(c.qtype))
            and (c.name.rsplit(".", 1)[0] in self._timestep_modules or self.linear(c.name) is not None)
        )

    def encode(self, cls: type[GGMLType], name: str, weight: torch.Tensor) -> AwareTensor:
        """Encode a weight [out, in] with feedback; measure both encodings on the calibration rows."""
        st = self.linear(name)
        assert st is not None
        importance = st.importance()
        # At 12288 inputs H is 0.6 GB in float32: each k x k copy is dropped as soon as the next exists.
        hessian, share = second_moments(st)
        order = activation_order(hessian) if ACTIVATION_ORDER else None
        if order is not None:
            hessian = permuted(hessian, order)
        try:
            factor = inverse_cholesky_factor(hessian, DAMPING)
        except ValueError as e:
            raise IdeoquantError(f"{self.path}: {name}: {e}") from None
        del hessian
        if order is not None:
            data = quantize_with_feedback_ordered(cls, weight, factor, order, importance)
        else:
            data = quantize_with_feedback(cls, weight, factor, importance)
        del factor
        rows = st.samples.to(torch.float32)
        plain = cls.dequantize_rows(cls.quantize_rows(weight, importance))
        aware = cls.dequantize_rows(data)
        if rows.shape[0] == 0:
            return AwareTensor(data, FeedbackMeasurement(float("nan"), float("nan"), share))
        return AwareTensor(data, FeedbackMeasurement(output_error(weight, aware, rows), output_error(weight, plain, rows), share))

    def settings(self) -> dict:
        """The calibration behind the file and how it was used."""
        return {**self.summary, "method": METHOD, "diagonal_share": DIAGONAL_SHARE, "damping": DAMPING,
                "timestep_grid": GRID_TIMESTEPS}

    def metadata(self) -> str:
        """The JSON of the file's `ideoquant.calibration` key (written before any tensor)."""
        return json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))

    def recipe(self, encoded: dict[str, FeedbackMeasurement]) -> dict:
        """What the report and the card keep: the settings and each linear's measured errors."""
        aware = [t.aware_error for t in encoded.values()]
        plain = [t.plain_error for t in encoded.values()]
        return {
            **self.settings(),
            "linears": len(encoded),
            "mean_output_error": sum(aware) / len(aware) if aware else None,
            "mean_output_error_round_to_nearest": sum(plain) / len(plain) if plain else None,
            "per_linear": {
                n: {"aware": round(t.aware_error, 6), "round_to_nearest": round(t.plain_error, 6),
                    "diagonal_share": round(t.diagonal_share, 4)}
                for n, t in encoded.items()
            },
        }


# --- --max-size: measured sensitivity of every tensor in every candidate type -----------------

# Rows of a tensor measured per candidate type (evenly spaced): relative errors settle long before.
SENSITIVITY_ROWS = 512
# File bytes besides the tensor data: header, key-value metadata and tensor infos (per file),
# plus per tensor its info, its recipe entry and alignment padding.
HEADER_BYTES = 16 << 10
BYTES_PER_TENSOR = 400


def weighted_error(cls: type[GGMLType], rows: torch.Tensor, importance: torch.Tensor | None) -> float:
    """sum_j E[x_j^2] ||dW_j||^2 / sum_j E[x_j^2] ||W_j||^2 of rows encoded in `cls` (ones without statistics)."""
    imatrix = importance if cls.uses_imatrix else None
    decoded = cls.dequantize_rows(cls.quantize_rows(rows, imatrix))
    weights = torch.ones(rows.shape[1]) if importance is None else importance
    num = float(((decoded - rows).square().sum(0) * weights).sum())
    den = float((rows.square().sum(0) * weights).sum())
    return num / max(den, 1e-30)


def plan_max_size(source, options) -> dict[str, list[TensorChoice]]:
    """The type of every tensor of every selected branch under `options.max_size` bytes (both files)."""
    from ..calibrate.statistics import residual_gains
    from ..model.inventory import linear_specs
    from ..recipes.gguf_budget import Option, budget_choices, candidate_types, choose_within_budget
    from ..recipes.gguf_policy import gguf_tensor_types

    options_by_key: dict[tuple[str, str], list[Option]] = {}
    errors: dict[str, dict[str, dict]] = {}
    bases: dict[str, list[TensorChoice]] = {}
    fixed = 0
    for branch, bs in source.branches.items():
        base = gguf_tensor_types(bs.dims, options.fmt)
        linear_weights = {s.name for s in linear_specs(bs.dims)}
        bases[branch] = base
        calibration = GGUFCalibration(Path(options.calibration), bs) if options.calibration is not None else None
        gains = residual_gains(calibration.stats.energies.get(branch, {})) if calibration is not None else {}
        errors[branch] = {}
        fixed += HEADER_BYTES
        for c in base:
            fixed += BYTES_PER_TENSOR
            if len(c.shape) != 2:
                fixed += ggml_type(c.qtype).row_bytes(c.shape[-1])
                continue
            weight = bs.read_float32(c.name)
            pick = torch.linspace(0, c.shape[0] - 1, min(c.shape[0], SENSITIVITY_ROWS)).round().long()
            rows = weight[pick].contiguous()
            importance = calibration.importance(c.name) if calibration is not None else None
            gain = gains.get(c.name.rsplit(".", 1)[0], 1.0)
            if calibration is not None and importance is None and c.name in linear_weights:
                gain = 0.0  # a linear that calibration saw no input reach (uncond llm_cond_proj)
            per_type = {}
            for qtype in candidate_types(c.shape[-1]):
                cls = ggml_type(qtype)
                per_type[qtype] = weighted_error(cls, rows, importance) * gain * gain
            errors[branch][c.name] = per_type
            options_by_key[(branch, c.name)] = [
                Option(t, ggml_type(t).row_bytes(c.shape[-1]) * c.shape[0], e) for t, e in per_type.items()
            ]
    chosen, _ = choose_within_budget(options_by_key, fixed, options.max_size)
    return {
        branch: budget_choices(base, {n: o for (b, n), o in chosen.items() if b == branch}, options.max_size, errors[branch])
        for branch, base in bases.items()
    }
