"""SmoothQuant folds, alpha search and measured protection on the synthetic checkpoint."""

from __future__ import annotations

import pytest
import torch

from ideoquant.calibrate.inputs import synthetic_calls
from ideoquant.calibrate.run import calibrate
from ideoquant.calibrate.statistics import statistics_key
from ideoquant.codecs.int8 import quantize_per_token, quantize_weight_per_channel
from ideoquant.export.smoothing import (
    Int8Settings,
    plan_int8,
    smoothing_factors,
    w8a8_relative_error,
)
from ideoquant.io.source import open_source
from ideoquant.io.synthetic import write_synthetic_pipeline
from ideoquant.model.build import transformer_from_tensors
from ideoquant.recipes.int8_policy import ALPHA_FINALISTS, ALPHA_GRID, HELD_OUT_EVERY
from ideoquant.recipes.linears import one_row_linears
from ideoquant.recipes.smoothquant_map import smoothing_groups

CALIB = dict(synthetic=True, steps=3, resolution=64, synthetic_inputs=3, text_tokens=8, max_samples=96, quiet=True)




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("smooth")
    write_synthetic_pipeline(root / "pipeline")
    stats = calibrate(root / "pipeline", root / "stats.safetensors", **CALIB)
    return open_source(root / "pipeline"), stats


def test_factors_follow_the_formula():
    act = torch.tensor([4.0, 0.0, 1.0, 9.0])
    w = torch.tensor([1.0, 2.0, 4.0, 0.25])
    s = smoothing_factors(act, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 0.5, 6.0]))  # a channel without data keeps s = 1
    torch.testing.assert_close(smoothing_factors(act, w, 1.0)[0], torch.tensor(4.0))


def test_relative_error_is_the_w8a8_product_error():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 96, generator=gen), torch.randn(24, 96, generator=gen)
    s = torch.rand(96, generator=gen) + 0.5
    qx, sx = quantize_per_token(x / s)
    qw, sw = quantize_weight_per_channel(w * s)
    y = (qx.double() @ qw.double().t()) * sx.double() * sw.double().t()
    ref = x.double() @ w.double().t()
    expected = float((y - ref).norm() / ref.norm())
    assert w8a8_relative_error(x, w, s) == pytest.approx(expected, rel=1e-4)


def test_groups_follow_the_fold_table(setup):
    source, _ = setup
    dims = source.branches["transformer"].dims
    groups = {g.name: g for g in smoothing_groups(dims)}
    assert len(groups) == 1 + 4 * dims.num_layers
    assert groups["layers.1.feed_forward.w1+w3"].fold.tensor == "layers.1.ffn_norm1.weight"
    assert groups["layers.0.attention.o"].fold.rows == (2 * dims.hidden, 3 * dims.hidden)
    assert groups["layers.0.feed_forward.w2"].fold.tensor == "layers.0.feed_forward.w3.weight"
    assert groups["llm_cond_proj"].fold.tensor == "llm_cond_norm.weight"


def _velocity(model, calls):
    with torch.no_grad():
        return torch.cat([model(**c, return_dict=False)[0] for c in calls])


@pytest.mark.parametrize("branch", ["transformer", "unconditional_transformer"])
def test_folded_model_equals_unfolded_in_float32(setup, branch):
    source, stats = setup
    bs = source.branches[branch]
    recipe = plan_int8(bs.dims, bs.read_float32, stats.branch(branch), Int8Settings(alpha=0.5, protect=0))
    # Every foldable input is smoothed (the uncond branch has no llm_cond_proj data).
    expected = 4 * bs.dims.num_layers + (branch == "transformer")
    assert len(recipe.factors) == expected
    norm = "layers.0.attention_norm1.weight"
    assert not torch.allclose(recipe.smooth_tensor(norm, bs.read_float32(norm)), bs.read_float32(norm))
    plain = transformer_from_tensors(bs.dims, bs.read_float32)
    folded = transformer_from_tensors(bs.dims, lambda n: recipe.smooth_tensor(n, bs.read_float32(n)))
    calls = [c for i in (7, 8) for c in synthetic_calls(bs.dims, i, 5, 2, 64, 8, branch)]
    a, b = _velocity(plain, calls), _velocity(folded, calls)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))

    # The smoothed linears see X / s at their inputs.
    seen = {}
    hook = lambda name: (lambda m, args: seen.setdefault(name, args[0].detach()))  # noqa: E731
    plain.layers[1].feed_forward.w1.register_forward_pre_hook(hook("plain"))
    folded.layers[1].feed_forward.w1.register_forward_pre_hook(hook("folded"))
    _velocity(plain, calls[:1]), _velocity(folded, calls[:1])
    s = recipe.factors["layers.1.feed_forward.w1+w3"]
    torch.testing.assert_close(seen["folded"], seen["plain"] / s, rtol=1e-4, atol=1e-4)


def test_w1_and_w3_share_one_factor(setup):
    source, stats = setup
    bs = source.branches["transformer"]
    recipe = plan_int8(bs.dims, bs.read_float32, stats.branch("transformer"), Int8Settings(protect=0))
    w1, w3 = recipe.linears["layers.0.feed_forward.w1"], recipe.linears["layers.0.feed_forward.w3"]
    assert w1.alpha == w3.alpha
    assert recipe.column_factors("layers.0.feed_forward.w1") is recipe.column_factors("layers.0.feed_forward.w3")


def test_searched_alpha_is_the_best_measured(setup):
    source, stats = setup
    bs = source.branches["transformer"]
    branch_stats = stats.branch("transformer")
    nearest = plan_int8(bs.dims, bs.read_float32, branch_stats, Int8Settings(protect=0, rounding="nearest"))
    recipe = plan_int8(bs.dims, bs.read_float32, branch_stats, Int8Settings(protect=0))
    for group in smoothing_groups(bs.dims):
        st = branch_stats[statistics_key(group.linears[0])]
        x = st.samples.float()
        weights = [bs.read_float32(m + ".weight") for m in group.linears]
        wmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
        by_alpha = {}
        for alpha in (None,) + ALPHA_GRID:
            s = None if alpha is None else smoothing_factors(st.absmax, wmax, alpha)
            by_alpha[alpha] = sum(w8a8_relative_error(x, w, s) ** 2 for w in weights)
        # Round to nearest: the best measured candidate.
        assert sum(nearest.linears[m].error ** 2 for m in group.linears) == pytest.approx(min(by_alpha.values()), rel=1e-6)
        # Error feedback: one of the best ALPHA_FINALISTS by round-to-nearest error, the one with
        # the least error on the held-out rows.
        finalists = sorted(by_alpha, key=lambda a: (by_alpha[a], a is not None))[:ALPHA_FINALISTS]
        chosen = recipe.linears[group.linears[0]].alpha
        assert chosen in finalists, (group.name, chosen, finalists)
        fit, held = x[[i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1 for i in range(len(x))]], x[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
        h = fit.double().t() @ fit.double() / len(fit)
        held_out = {}
        for alpha in finalists:
            s = None if alpha is None else smoothing_factors(st.absmax, wmax, alpha)
            held_out[alpha] = sum(w8a8_relative_error(held, w, s, None, h.float()) ** 2 for w in weights)
        assert held_out[chosen] == pytest.approx(min(held_out.values()), rel=1e-6)
        assert sum(recipe.linears[m].error ** 2 for m in group.linears) == pytest.approx(held_out[chosen], rel=1e-5)
        assert all(recipe.linears[m].rounding == "error_feedback" for m in group.linears)
    # Inputs behind norms with outlier channels: smoothing must cut the error clearly.
    for m in ("layers.0.attention.qkv", "layers.1.feed_forward.w1", "llm_cond_proj"):
        c = recipe.linears[m]
        assert c.alpha is not None and c.error < 0.6 * c.error_plain, (m, c)


def test_planning_rounds_each_linear_once(setup, monkeypatch):
    """Error feedback dominates planning time at full width: one rounding per linear, not one per alpha."""
    import ideoquant.export.smoothing as smoothing

    source, stats = setup
    bs = source.branches["transformer"]
    shapes: list[tuple[int, int]] = []
    real = smoothing.quantize_weight_error_feedback

    def counting(weight, second_moment, *args, **kwargs):
        shapes.append(tuple(weight.shape))
        return real(weight, second_moment, *args, **kwargs)

    monkeypatch.setattr(smoothing, "quantize_weight_error_feedback", counting)
    recipe = plan_int8(bs.dims, bs.read_float32, stats.branch("transformer"), Int8Settings(protect=0))
    measured = [m for m, c in recipe.linears.items() if c.error is not None and c.quantized]
    # Every measured linear that had rows enough for error feedback was rounded exactly once.
    assert len(shapes) == len(measured)
    expected = sorted(tuple(bs.read_float32(m + ".weight").shape) for m in measured)
    assert sorted(shapes) == expected


def test_protected_set_is_the_measured_worst(setup):
    source, stats = setup
    bs = source.branches["unconditional_transformer"]
    settings = Int8Settings(protect=3, protect_patterns=("layers.1.attention.to_out.0",))
    recipe = plan_int8(bs.dims, bs.read_float32, stats.branch(bs.branch), settings)
    one_row = set(one_row_linears(bs.dims))
    assert one_row <= set(recipe.kept)
    ranked = sorted(
        (c for m, c in recipe.linears.items() if m not in one_row and c.error is not None), key=lambda c: -c.error
    )
    measured = [m for m, reason in recipe.kept.items() if reason.startswith("measured")]
    assert sorted(measured) == sorted(c.module for c in ranked[:3])
    assert recipe.kept["layers.1.attention.o"].startswith("pattern")
    assert set(recipe.protected) == set(measured) | {"layers.1.attention.o"}
    # No text ever reaches the unconditional llm_cond_proj: quantized, not smoothed, no error measured.
    llm = recipe.linears["llm_cond_proj"]
    assert llm.quantized and llm.alpha is None and llm.error is None and "no calibration data" in llm.note
    assert "llm_cond_proj" not in recipe.factors
    meta = recipe.metadata()
    assert meta["linears"]["llm_cond_proj"]["error"] is None and len(meta["protected"]) == 4


def test_groups_kept_whole_are_not_folded(setup):
    source, stats = setup
    bs = source.branches["transformer"]
    settings = Int8Settings(protect=0, protect_patterns=("layers.*.feed_forward.w2",))
    recipe = plan_int8(bs.dims, bs.read_float32, stats.branch("transformer"), settings)
    assert "layers.0.feed_forward.w2" not in recipe.factors
    w3 = bs.read_float32("layers.0.feed_forward.w3.weight")
    s13 = recipe.factors.get("layers.0.feed_forward.w1+w3")
    expected = w3 if s13 is None else w3 * s13[None, :]
    torch.testing.assert_close(recipe.smooth_tensor("layers.0.feed_forward.w3.weight", w3), expected)
