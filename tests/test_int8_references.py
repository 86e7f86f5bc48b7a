"""INT8 W8A8 and SmoothQuant numerics against independent references: compressed-tensors' own
quantize/dequantize, hand-computed factors and gains, gains measured on the diffusers model,
and NF4's partial last block against bitsandbytes."""

from __future__ import annotations

import pytest
import torch

from ideoquant.calibrate.inputs import synthetic_calls
from ideoquant.calibrate.run import calibrate
from ideoquant.calibrate.source_model import load_source_transformer
from ideoquant.calibrate.statistics import residual_gains
from ideoquant.calibrate.statistics import statistics_key
from ideoquant.codecs.int8 import (
    dequantize_weight,
    input_second_moment,
    quantize_per_token,
    quantize_weight_error_feedback,
    quantize_weight_per_channel,
)
from ideoquant.errors import IdeoquantError
from ideoquant.export.smoothing import (
    Int8Settings,
    LinearChoice,
    plan_int8,
    protect_linears,
    smoothing_factors,
)
from ideoquant.io.source import open_source
from ideoquant.io.synthetic import write_synthetic_pipeline
from ideoquant.model.inventory import ModelDims, layout_modules
from ideoquant.model.sequence import IMAGE_INDICATOR, TEXT_INDICATOR
from ideoquant.recipes.int8_policy import (
    DEFAULT_PROTECT_BUDGET,
    ProtectBudget,
    int8_eligible_weights,
    paper_share,
    parse_protect_budget,
)

ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
ct_helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402

TOKEN_ARGS = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
CHANNEL_ARGS = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False)
# compressed-tensors' observer maps absmax to half its 255-step range (127.5, codes -128..127);
# the files and the runtime use the symmetric grid +-127 (absmax / 127), as vLLM's dynamic int8.
CT_TO_SYMMETRIC = 127.5 / 127


def _activations(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 37, 96, generator=g)
    x[..., 5] *= 40.0  # an outlier channel
    x[1, 4] *= 1e-3  # a quiet token: its own scale, not the tensor's
    x[2, 7] = 0.0  # an all-zero token
    # Exact ties x / scale = k + 0.5 (round half to even, never truncation).
    x[0, 0, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.49, -2.5])
    return x


def test_per_token_activations_match_compressed_tensors():
    x = _activations(0)
    # compressed-tensors' own dynamic per-token qparams (min/max per token over the last dim).
    ct_scale, ct_zero = ct_helpers.compute_dynamic_scales_and_zp(x, TOKEN_ARGS, module=None)
    assert torch.equal(ct_zero, torch.zeros_like(ct_zero))
    q, scale = quantize_per_token(x.reshape(-1, 96))
    scale = scale.reshape(3, 37, 1)
    nonzero = x.abs().amax(dim=-1, keepdim=True) > 0
    torch.testing.assert_close(scale[nonzero], (ct_scale * CT_TO_SYMMETRIC)[nonzero], rtol=1e-6, atol=0)
    # Codes element for element, and the dequantized values, from compressed-tensors' functions.
    safe = torch.where(nonzero, scale, torch.ones_like(scale))
    ct_q = ct_forward.quantize(x, safe, torch.zeros_like(safe), TOKEN_ARGS, dtype=torch.int8)
    ours = q.reshape(3, 37, 96)
    assert torch.equal(ours[nonzero.expand_as(x)], ct_q[nonzero.expand_as(x)])
    assert torch.equal(ours[~nonzero.expand_as(x)], torch.zeros_like(ours[~nonzero.expand_as(x)]))
    ct_x = ct_forward.dequantize(ct_q, safe, torch.zeros_like(safe), TOKEN_ARGS, dtype=torch.float32)
    torch.testing.assert_close(ours.float() * scale, torch.where(nonzero, ct_x, torch.zeros_like(ct_x)), rtol=0, atol=0)
    assert int(ours[0, 0, 0]) == 127 and ours[0, 0].abs().max() == 127


def test_per_channel_weights_match_compressed_tensors():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 80, generator=g) * torch.exp(torch.randn(24, 1, generator=g))
    w[3] = 0.0
    w[5, :6] = torch.tensor([127.0, 0.5, 1.5, -2.5, 3.5, -126.5])  # ties at scale 1
    ct_scale, ct_zero = ct_helpers.calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), CHANNEL_ARGS)
    q, scale = quantize_weight_per_channel(w)
    rows = w.abs().amax(dim=1) > 0
    torch.testing.assert_close(scale[rows], (ct_scale * CT_TO_SYMMETRIC)[rows], rtol=1e-6, atol=0)
    ct_q = ct_forward.quantize(w, scale, torch.zeros_like(scale), CHANNEL_ARGS, dtype=torch.int8)
    assert torch.equal(q, ct_q)
    ct_w = ct_forward.dequantize(ct_q, scale, torch.zeros_like(scale), CHANNEL_ARGS, dtype=torch.float32)
    assert torch.equal(dequantize_weight(q, scale), ct_w)


def test_smoothing_factors_hand_computed():
    # s = a^alpha / w^(1 - alpha): alpha 0.25 and 0.75, weights far from 1.
    act = torch.tensor([81.0, 16.0, 0.0, 1.0])
    w = torch.tensor([16.0, 16.0, 3.0, 0.0625])
    torch.testing.assert_close(smoothing_factors(act, w, 0.25), torch.tensor([3.0 / 8.0, 2.0 / 8.0, 1.0, 1.0 / 0.125]))
    torch.testing.assert_close(smoothing_factors(act, w, 0.75), torch.tensor([27.0 / 2.0, 8.0 / 2.0, 1.0, 1.0 / 0.5]))


def test_residual_gains_hand_computed():
    # energy = (residual, attention branch, mlp branch) sums of squares.
    gains = residual_gains({"layers.0": torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64)})
    assert gains["layers.0.attention.qkv"] == pytest.approx(0.5) and gains["layers.0.attention.o"] == pytest.approx(0.5)
    for name in ("w1", "w2", "w3"):
        assert gains[f"layers.0.feed_forward.{name}"] == pytest.approx(1.5)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("references")
    write_synthetic_pipeline(root / "pipeline")
    stats = calibrate(root / "pipeline", root / "stats.safetensors", synthetic=True, steps=2, resolution=64,
                      synthetic_inputs=2, text_tokens=8, max_samples=64, seed=4, quiet=True)
    return open_source(root / "pipeline"), stats


@pytest.mark.parametrize("branch", ["transformer", "unconditional_transformer"])
def test_residual_gains_equal_the_measured_branch_updates(calibrated, branch):
    """What each block's attention and MLP add to the stream, measured on the diffusers model."""
    source, stats = calibrated
    bs = source.branches[branch]
    model = load_source_transformer(bs)
    sums: dict[int, list[float]] = {}
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.layers):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__("in", a[0])))
        handles.append(block.ffn_norm1.register_forward_pre_hook(lambda m, a: captured.__setitem__("mid", a[0])))

        def done(m, a, out, i=i):
            content = (captured["indicator"] == IMAGE_INDICATOR) | (captured["indicator"] == TEXT_INDICATOR)
            x, mid, y = (t[content].double() for t in (captured["in"], captured["mid"], out))
            e = sums.setdefault(i, [0.0, 0.0, 0.0])
            e[0] += float(x.square().sum())
            e[1] += float((mid - x).square().sum())
            e[2] += float((y - mid).square().sum())

        handles.append(block.register_forward_hook(done))
    with torch.no_grad():
        for index in range(2):
            for call in synthetic_calls(bs.dims, index, 4, 2, 64, 8, branch):
                captured["indicator"] = call["indicator"]
                model(**call, return_dict=False)
    for h in handles:
        h.remove()
    gains = residual_gains(stats.energies[branch])
    for i, (res, att, mlp) in sums.items():
        assert gains[f"layers.{i}.attention.qkv"] == pytest.approx((att / res) ** 0.5, rel=1e-3)
        assert gains[f"layers.{i}.feed_forward.w2"] == pytest.approx((mlp / res) ** 0.5, rel=1e-3)


def test_error_feedback_with_uncorrelated_inputs_is_round_to_nearest():
    """With a diagonal second moment no column can absorb another's error: the codes are
    compressed-tensors' own round-to-nearest codes for the same scales."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 300, generator=g) * torch.exp(torch.randn(40, 1, generator=g))
    h = torch.diag(torch.rand(300, generator=g) + 0.1)
    h[7, 7] = 0.0  # an input channel that never saw data
    q, scale = quantize_weight_error_feedback(w, h)
    ct_scale, _ = ct_helpers.calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), CHANNEL_ARGS)
    torch.testing.assert_close(scale, ct_scale * CT_TO_SYMMETRIC, rtol=1e-6, atol=0)
    assert torch.equal(q, ct_forward.quantize(w, scale, torch.zeros_like(scale), CHANNEL_ARGS, dtype=torch.int8))


def _held_out_inputs(bs, branch: str, module: str, seed: int) -> torch.Tensor:
    """The inputs a linear sees on forwards of a seed calibration never drew (diffusers model, float32)."""
    model = load_source_transformer(bs)
    rows: list[torch.Tensor] = []
    target = model.get_submodule(layout_modules(module, "diffusers")[0])
    handle = target.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]).detach()))
    with torch.no_grad():
        for index in range(2):
            for call in synthetic_calls(bs.dims, index, seed, 2, 64, 8, branch):
                model(**call, return_dict=False)
    handle.remove()
    x = torch.cat(rows)
    return x[x.abs().amax(dim=1) > 0]


@pytest.fixture(scope="module")
def calibrated_rows(tmp_path_factory):
    """Calibration keeping the default 512 sample rows per linear (128 px: 64 image tokens per forward)."""
    root = tmp_path_factory.mktemp("rows")
    write_synthetic_pipeline(root / "pipeline")
    stats = calibrate(root / "pipeline", root / "stats.safetensors", synthetic=True, steps=3, resolution=128,
                      synthetic_inputs=3, text_tokens=8, max_samples=512, seed=4, quiet=True)
    return open_source(root / "pipeline"), stats


@pytest.mark.parametrize("branch", ["transformer", "unconditional_transformer"])
@pytest.mark.parametrize("module", ["layers.0.attention.qkv", "layers.1.feed_forward.w2", "layers.1.attention.o"])
def test_error_feedback_cuts_held_out_output_error(calibrated_rows, branch, module):
    """Error-feedback rounding fitted on the calibration rows, measured on held-out activations
    (another seed) against the float64 product: below round-to-nearest, weight-only and as W8A8
    with activations quantized by compressed-tensors' per-token functions."""
    source, stats = calibrated_rows
    bs = source.branches[branch]
    fit = stats.branch(branch)[statistics_key(module)].samples.float()
    assert fit.shape[0] == 512
    held = _held_out_inputs(bs, branch, module, seed=991)
    w = bs.read_float32(module + ".weight")
    reference = held.double() @ w.double().t()
    ct_scale, _ = ct_helpers.compute_dynamic_scales_and_zp(held, TOKEN_ARGS, module=None)
    ct_scale = ct_scale * CT_TO_SYMMETRIC
    ct_q = ct_forward.quantize(held, ct_scale, torch.zeros_like(ct_scale), TOKEN_ARGS, dtype=torch.int8)
    held_w8 = ct_forward.dequantize(ct_q, ct_scale, torch.zeros_like(ct_scale), TOKEN_ARGS, dtype=torch.float32)

    def error(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
        y = x.double() @ (q.double() * scale.double()).t()
        return float((y - reference).norm() / reference.norm())

    nearest = quantize_weight_per_channel(w)
    fed_back = quantize_weight_error_feedback(w, input_second_moment(fit))
    assert torch.equal(fed_back[1], nearest[1])  # same per-channel scales, plain int8 codes
    assert fed_back[0].dtype == torch.int8 and int(fed_back[0].abs().max()) <= 127
    # Measured weight-only ratios 0.44-0.81; as W8A8 0.84-1.0 (per-token activation error dominates).
    assert error(held, *fed_back) < 0.85 * error(held, *nearest), (error(held, *fed_back), error(held, *nearest))
    assert error(held_w8, *fed_back) < error(held_w8, *nearest)


def _choice(module: str, impact: float, weights: int) -> LinearChoice:
    return LinearChoice(module, None, True, error=impact, impact=impact, weights=weights)


def test_budget_takes_error_reduction_per_byte():
    dims = ModelDims(num_layers=1)
    order = {"a": 0, "b": 1, "c": 2}
    # impact^2 / weights: c 2.5e-4, b 1.28e-4, a 1e-4 -> c, b; a no longer fits (by impact alone: a, c).
    linears = {"a": _choice("a", 0.1, 100), "b": _choice("b", 0.08, 50), "c": _choice("c", 0.05, 10)}
    settings = Int8Settings(protect_budget=ProtectBudget(nbytes=2 * 110))
    report = protect_linears(linears, settings, dims, order)
    assert [m for m, c in linears.items() if not c.quantized] == ["b", "c"]
    assert report["spent_bytes"] == 2 * 60 and report["budget_bytes"] == 220
    assert set(report["linears"]) == {"b", "c"} and report["linears"]["b"]["impact"] == pytest.approx(0.08)
    assert report["impact_rss_before"] == pytest.approx((0.01 + 0.0064 + 0.0025) ** 0.5, rel=1e-5)
    assert report["impact_rss_after"] == pytest.approx(0.1, rel=1e-5)
    linears = {"a": _choice("a", 0.1, 100), "b": _choice("b", 0.08, 50), "c": _choice("c", 0.05, 10)}
    protect_linears(linears, Int8Settings(protect=2), dims, order)
    assert [m for m, c in linears.items() if not c.quantized] == ["a", "b"]


def test_default_budget_is_the_paper_share():
    full = ModelDims()
    weights = int8_eligible_weights(full)
    assert "adaln_proj" not in weights and "layers.0.adaln_modulation" not in weights and "t_embedding.linear_1" not in weights
    # 17 of 34 w2 (4608 x 12288) over the int8-eligible weights, worked out by hand.
    per_block = 4 * 4608 * 4608 + 3 * 4608 * 12288
    eligible = 34 * per_block + 128 * 4608 + 53248 * 4608 + 4608 * 128
    assert paper_share() == pytest.approx(17 * 4608 * 12288 / eligible)
    assert 0.10 < paper_share() < 0.12
    assert DEFAULT_PROTECT_BUDGET.fraction == paper_share()
    assert DEFAULT_PROTECT_BUDGET.bytes_for(full) == pytest.approx(2 * 17 * 4608 * 12288, rel=1e-6)


@pytest.mark.parametrize(
    "text, expected",
    [("0.11", ProtectBudget(fraction=0.11)), ("11%", ProtectBudget(fraction=0.11)), ("0", ProtectBudget(fraction=0.0)),
     ("1.5GiB", ProtectBudget(nbytes=3 * 2**29)), ("800MB", ProtectBudget(nbytes=800_000_000)),
     ("4096", ProtectBudget(nbytes=4096)), ("paper", DEFAULT_PROTECT_BUDGET)],
)
def test_parse_protect_budget(text, expected):
    got = parse_protect_budget(text)
    assert got.nbytes == expected.nbytes and got.fraction == pytest.approx(expected.fraction) if expected.fraction else got == expected


@pytest.mark.parametrize("text", ["lots", "1.5", "150%", "-3", "2 parsecs"])
def test_parse_protect_budget_rejects(text):
    with pytest.raises(IdeoquantError, match="--protect-budget") as err:
        parse_protect_budget(text)
    assert "\n" not in str(err.value)


def test_default_budget_leaves_int8_at_any_depth(calibrated):
    source, stats = calibrated
    bs = source.branches["transformer"]
    recipe = plan_int8(bs.dims, bs.read_float32, stats.branch("transformer"), Int8Settings(),
                       residual_gains(stats.energies["transformer"]))
    eligible = sum(int8_eligible_weights(bs.dims).values())
    protected = recipe.protection["linears"]
    assert protected and recipe.quantized
    assert recipe.protection["spent_bytes"] == sum(p["bytes"] for p in protected.values())
    assert recipe.protection["spent_bytes"] <= 2 * paper_share() * eligible
    # Nothing left out fits in what the budget has left.
    left = recipe.protection["budget_bytes"] - recipe.protection["spent_bytes"]
    assert all(2 * c.weights > left for c in recipe.linears.values() if c.quantized and c.impact)
    # A count tuned to 34 blocks keeps everything at 2: an error, not a bf16 copy labelled int8.
    with pytest.raises(IdeoquantError, match="no linear left in int8") as err:
        plan_int8(bs.dims, bs.read_float32, stats.branch("transformer"), Int8Settings(protect=17))
    assert "\n" not in str(err.value)


def test_nf4_partial_last_block_divides():
    """Tail values where x / absmax and x * (1 / absmax) fall on either side of an NF4 threshold."""
    from .test_nf4 import F, assert_matches_bnb

    levels = F.get_4bit_type("nf4", device="cpu")
    thresholds = ((levels[1:] + levels[:-1]) / 2).tolist()
    am = torch.tensor(0.7, dtype=torch.float32)
    recip = 1.0 / am
    picked = []
    for t in thresholds:
        centre = (torch.tensor(t, dtype=torch.float32) * am).view(torch.int32)
        for k in range(-8, 9):
            x = (centre + k).view(torch.float32)
            a, b = x / am, x * recip
            if bool((a > t) != (b > t)):
                picked.append(float(x))
    assert len(picked) >= 3, "no value tells division from a reciprocal multiply"
    tail = torch.tensor([0.7] + picked[:40], dtype=torch.float32)
    body = torch.randn(128, generator=torch.Generator().manual_seed(2)) * 0.3
    assert_matches_bnb(torch.cat([body, tail]).reshape(1, -1))
