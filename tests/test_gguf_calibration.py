"""`convert --calibration` on GGUF: activation-aware files that stock readers decode unchanged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader
from gguf import quants as gguf_quants

from ideoquant import cli
from ideoquant.calibrate.inputs import synthetic_calls
from ideoquant.calibrate.run import calibrate
from ideoquant.calibrate.source_model import load_source_transformer
from ideoquant.io.source import open_source
from ideoquant.io.synthetic import write_synthetic_pipeline
from ideoquant.model.sequence import IMAGE_INDICATOR
from ideoquant.runtime.gguf_loader import load_gguf_transformer

SYNTH = dict(synthetic=True, steps=4, resolution=64, synthetic_inputs=6, text_tokens=8, quiet=True)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf_calib")
    src = root / "pipeline"
    write_synthetic_pipeline(src, layers=1, seed=0)
    stats = root / "stats.safetensors"
    calibrate(src, stats, **SYNTH)
    return src, stats


def _convert(*args) -> "object":
    return CliRunner().invoke(cli.main, ["convert", *[str(a) for a in args], "--quiet"])


@pytest.fixture(scope="module")
def q4k_pair(calibrated, tmp_path_factory) -> tuple[Path, Path]:
    src, stats = calibrated
    out = tmp_path_factory.mktemp("q4k")
    plain, aware = out / "plain", out / "aware"
    for folder, extra in ((plain, []), (aware, ["--calibration", stats])):
        result = _convert(src, "--format", "q4_k", "--branches", "cond", "--out", folder, *extra)
        assert result.exit_code == 0, result.output
    return plain, aware


def test_aware_file_decodes_with_gguf_and_records_the_calibration(q4k_pair):
    plain, aware = q4k_pair
    path = aware / "ideogram4-Q4_K.gguf"
    reader = GGUFReader(path)
    field = reader.get_field("ideoquant.calibration")
    settings = json.loads(field.contents())
    assert "error feedback" in settings["method"].lower() and settings["source_checksum_match"] is True
    assert settings["timestep_grid"] == 8192 and "8192 timesteps" in settings["method"]
    plain_reader = GGUFReader(plain / "ideogram4-Q4_K.gguf")
    assert [(t.name, t.tensor_type) for t in reader.tensors] == [(t.name, t.tensor_type) for t in plain_reader.tensors]
    changed = 0
    for t, p in zip(reader.tensors, plain_reader.tensors):
        decoded = gguf_quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert np.isfinite(decoded).all()
        if t.name.startswith("layers.") and t.name.endswith(".weight") and len(t.shape) == 2:
            changed += not np.array_equal(np.asarray(t.data), np.asarray(p.data))
    assert changed == 6  # every block linear got new codes
    report = json.loads((aware / "quantization_report.json").read_text())
    text = json.dumps(report)
    assert "error feedback" in text and "round-to-nearest" in text
    card = (aware / "README.md").read_text()
    assert "Activation-aware codes" in card and "round-to-nearest" in card
    # The card's figures are the report's per-linear measurements, averaged, and say what they are.
    per_linear = report["branches"]["transformer"]["recipe"]["calibration"]["per_linear"]
    # The diagonal's share of H: at least the floor, and well above it for input_proj's nearly uncorrelated latents.
    assert all(0.1 <= v["diagonal_share"] <= 1.0 for v in per_linear.values())
    shares = {k: v["diagonal_share"] for k, v in per_linear.items()}
    assert shares["input_proj.weight"] > 0.3 and shares["layers.0.attention.o.weight"] == 0.1, shares
    mean_aware = sum(v["aware"] for v in per_linear.values()) / len(per_linear)
    mean_plain = sum(v["round_to_nearest"] for v in per_linear.values()) / len(per_linear)
    line = next(l for l in card.splitlines() if "Activation-aware codes" in l)
    assert f"of {len(per_linear)} linears" in line
    shown = re.search(r"calibration rows ([0-9.e-]+), round-to-nearest ([0-9.e-]+) \(([0-9.]+)x\)", line)
    assert shown is not None, line
    assert float(shown[1]) == pytest.approx(mean_aware, rel=1e-3)
    assert float(shown[2]) == pytest.approx(mean_plain, rel=1e-3)
    assert float(shown[3]) == pytest.approx(mean_aware / mean_plain, abs=0.006)
    assert "in sample" in line and "does not measure the end-to-end gain" in line


@torch.no_grad()
def _velocity_error(model, reference, calls) -> float:
    errors = []
    for call, ref in zip(calls, reference):
        v = model(**call, return_dict=False)[0][0, call["indicator"][0] == IMAGE_INDICATOR]
        errors.append(float((v - ref).norm() / ref.norm()))
    return sum(errors) / len(errors)


def test_aware_file_is_closer_to_the_float_model_on_held_out_inputs(calibrated, q4k_pair):
    """The runtime-loaded aware model's velocity error, on inputs calibration never drew, is below plain's."""
    src, _ = calibrated
    plain, aware = q4k_pair
    bs = open_source(src).branches["transformer"]
    calls = list(synthetic_calls(bs.dims, 7, 98765, 4, 64, 8, "transformer"))
    with torch.no_grad():
        reference = [load_source_transformer(bs, keep_fp8=False)(**c, return_dict=False)[0][0, c["indicator"][0] == IMAGE_INDICATOR]
                     for c in calls]
    errors = {
        name: _velocity_error(load_gguf_transformer(folder / "ideogram4-Q4_K.gguf", dtype=torch.float32), reference, calls)
        for name, folder in (("plain", plain), ("aware", aware))
    }
    assert errors["aware"] < 0.9 * errors["plain"], errors


@pytest.mark.parametrize("fmt", ["q3_k", "q5_1", "f16"])
def test_calibration_on_a_format_it_cannot_serve_is_one_line(calibrated, tmp_path, fmt):
    src, stats = calibrated
    result = _convert(src, "--format", fmt, "--calibration", stats, "--out", tmp_path / "out")
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --calibration"), result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_calibration_with_imatrix_and_on_nf4_are_one_line(calibrated, tmp_path):
    src, stats = calibrated
    for args in (["--format", "q4_k", "--imatrix", "ones"], ["--format", "nf4"]):
        result = _convert(src, *args, "--calibration", stats, "--out", tmp_path / "out")
        assert result.exit_code != 0 and result.output.strip().startswith("error: --calibration"), result.output


def test_parse_max_size():
    from ideoquant.errors import IdeoquantError
    from ideoquant.recipes.gguf_budget import parse_max_size

    assert parse_max_size("11GiB") == 11 * 2**30
    assert parse_max_size("11GB") == 11 * 10**9
    assert parse_max_size("1.5 MiB") == 3 * 2**19
    assert parse_max_size("123456") == 123456
    for bad in ("eleven", "11 parsecs", "0", "-5GB"):
        with pytest.raises(IdeoquantError, match="--max-size"):
            parse_max_size(bad)


def test_budget_takes_the_best_error_reduction_per_byte():
    """Hand-worked: a saves 0.5 per 10 bytes, b 0.2 per 10; b's middle type lies above its hull."""
    from gguf import GGMLQuantizationType as QT

    from ideoquant.errors import IdeoquantError
    from ideoquant.recipes.gguf_budget import Option, choose_within_budget

    options = {
        ("cond", "a"): [Option(QT.Q3_K, 10, 1.0), Option(QT.Q4_K, 20, 0.5), Option(QT.Q8_0, 40, 0.4)],
        ("cond", "b"): [Option(QT.Q3_K, 10, 0.6), Option(QT.Q4_K, 20, 0.59), Option(QT.Q5_K, 30, 0.2)],
    }
    chosen, total = choose_within_budget(options, fixed_bytes=5, budget=35)
    assert {k[1]: o.qtype for k, o in chosen.items()} == {"a": QT.Q4_K, "b": QT.Q3_K} and total == 35
    chosen, total = choose_within_budget(options, fixed_bytes=5, budget=55)
    # b's Q5_K (0.4 saved for 20 bytes) beats a's Q8_0 (0.1 for 20); b's Q4_K is never chosen.
    assert {k[1]: o.qtype for k, o in chosen.items()} == {"a": QT.Q4_K, "b": QT.Q5_K} and total == 55
    with pytest.raises(IdeoquantError, match="below the smallest plan"):
        choose_within_budget(options, fixed_bytes=5, budget=20)


def test_max_size_at_plain_q4_k_size(calibrated, q4k_pair, tmp_path):
    """--max-size = the plain Q4_K file's size: the file fits, every 2-D tensor says why it has
    its type, and the runtime-loaded model is closer to the float model than plain Q4_K."""
    src, stats = calibrated
    plain, _ = q4k_pair
    size = (plain / "ideogram4-Q4_K.gguf").stat().st_size
    out = tmp_path / "budget"
    result = _convert(src, "--format", "q4_k", "--branches", "cond", "--calibration", stats,
                      "--max-size", str(size), "--out", out)
    assert result.exit_code == 0, result.output
    path = out / "ideogram4-Q4_K.gguf"
    assert path.stat().st_size <= size
    recipe = json.loads(GGUFReader(path).get_field("ideoquant.recipe").contents())
    two_d = [n for n, e in recipe.items() if "--max-size" in e["reason"]]
    assert two_d and len({recipe[n]["type"] for n in two_d}) > 1
    bs = open_source(src).branches["transformer"]
    calls = list(synthetic_calls(bs.dims, 7, 98765, 4, 64, 8, "transformer"))
    with torch.no_grad():
        reference = [load_source_transformer(bs, keep_fp8=False)(**c, return_dict=False)[0][0, c["indicator"][0] == IMAGE_INDICATOR]
                     for c in calls]
    budget = _velocity_error(load_gguf_transformer(path, dtype=torch.float32), reference, calls)
    base = _velocity_error(load_gguf_transformer(plain / "ideogram4-Q4_K.gguf", dtype=torch.float32), reference, calls)
    assert budget < base
    tiny = _convert(src, "--format", "q4_k", "--branches", "cond", "--max-size", "1000", "--out", tmp_path / "tiny")
    assert tiny.exit_code != 0 and tiny.output.strip().startswith("error: --max-size")


TIMESTEP_MODULES = ("t_embedding.mlp_in", "t_embedding.mlp_out", "adaln_proj", "layers.0.adaln_modulation",
                    "final_layer.adaln_modulation")


@torch.no_grad()
def _model_inputs(model, calls) -> dict[str, torch.Tensor]:
    """What the diffusers model's own forward feeds each timestep-only linear, one row per call."""
    seen = {m: [] for m in TIMESTEP_MODULES}
    hooks = [model.get_submodule(m).register_forward_pre_hook(lambda _mod, args, m=m: seen[m].append(args[0].reshape(-1, args[0].shape[-1])))
             for m in TIMESTEP_MODULES]
    try:
        for call in calls:
            model(**call, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    return {m: torch.cat(rows) for m, rows in seen.items()}


def test_timestep_inputs_are_what_the_model_feeds_those_linears(calibrated):
    """The grid inputs computed from the weights equal the rows the diffusers forward gives each linear."""
    from ideoquant.calibrate.timestep_inputs import timestep_linear_inputs, timestep_linears

    src, _ = calibrated
    bs = open_source(src).branches["transformer"]
    calls = list(synthetic_calls(bs.dims, 3, 4242, 5, 64, 8, "transformer"))
    timesteps = torch.cat([c["timestep"] for c in calls])
    recorded = _model_inputs(load_source_transformer(bs, keep_fp8=False), calls)
    computed = timestep_linear_inputs(bs.read_float32, bs.dims, timesteps)
    assert sorted(computed) == sorted(timestep_linears(bs.dims)) == sorted(TIMESTEP_MODULES)
    for module in TIMESTEP_MODULES:
        torch.testing.assert_close(computed[module], recorded[module], rtol=1e-5, atol=1e-6)


def test_timestep_linears_keep_their_gain_at_timesteps_calibration_never_ran(calibrated, q4k_pair):
    """Each timestep-only linear's output error at 48 unseen timesteps (the model's own inputs) is well
    below round-to-nearest's: their codes fit the whole timestep range, not calibration's few timesteps."""
    src, _ = calibrated
    plain, aware = q4k_pair
    bs = open_source(src).branches["transformer"]
    gen = torch.Generator().manual_seed(31337)
    calls = []
    for t in torch.rand(48, generator=gen).tolist():
        call = next(iter(synthetic_calls(bs.dims, 11, 555, 1, 64, 8, "transformer")))
        calls.append({**call, "timestep": torch.tensor([t])})
    rows = _model_inputs(load_source_transformer(bs, keep_fp8=False), calls)
    decoded = {}
    for name, folder in (("plain", plain), ("aware", aware)):
        reader = GGUFReader(folder / "ideogram4-Q4_K.gguf")
        decoded[name] = {t.name: torch.from_numpy(gguf_quants.dequantize(np.asarray(t.data), t.tensor_type).copy())
                         for t in reader.tensors if t.name[: -len(".weight")] in TIMESTEP_MODULES}
    ratios = {}
    for module in TIMESTEP_MODULES:
        weight = bs.read_float32(module + ".weight")
        x = rows[module]
        exact = x @ weight.T
        err = {k: float((x @ d[module + ".weight"].T - exact).norm() / exact.norm()) for k, d in decoded.items()}
        ratios[module] = err["aware"] / err["plain"]
    # Fitted to calibration's 24 timesteps instead, these were 0.97, 0.86, 0.77, 0.66, 0.64.
    assert max(ratios.values()) < 0.9 and sum(ratios.values()) / len(ratios) < 0.62, ratios


def test_sampling_noise_share_by_hand_and_on_known_inputs():
    """Ledoit-Wolf's noise share: a 2x2 case worked by hand, uncorrelated inputs (all noise), one shared factor (none)."""
    from ideoquant.export.gguf_calibration import sampling_noise_share

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # S = [[5, 7], [7, 10]]; sum_{i!=j} E[x_i^2 x_j^2] = 2 (4 + 144) / 2 = 148; (148 - 98) / 2 / 98
    assert sampling_noise_share(x, x.T @ x / 2) == pytest.approx(50 / 196, rel=1e-12)
    gen = torch.Generator().manual_seed(5)
    iid = torch.randn(512, 64, generator=gen)
    assert 0.85 < sampling_noise_share(iid, iid.T @ iid / 512) <= 1.0
    shared = torch.randn(512, 1, generator=gen) * torch.rand(1, 64, generator=gen).add(0.5) + 0.05 * torch.randn(512, 64, generator=gen)
    assert sampling_noise_share(shared, shared.T @ shared / 512) < 0.02


def test_second_moments_take_the_larger_of_the_floor_and_the_noise_share():
    """H = (1 - a) S + a diag(E[x^2]) with a = max(floor, noise share); the report keeps a per linear."""
    from ideoquant.calibrate.statistics import LinearStatistics
    from ideoquant.export.gguf_calibration import second_moments

    gen = torch.Generator().manual_seed(9)

    def stats_of(rows):
        st = LinearStatistics.empty(32)
        st.update(rows, torch.arange(256, dtype=torch.float64), torch.zeros(256, dtype=torch.long), max_samples=256)
        x = st.samples.to(torch.float32)
        return st, x.T @ x / 256, rows.square().mean(0)

    st, s, mean_square = stats_of(torch.randn(256, 32, generator=gen))
    h, share = second_moments(st, floor=0.1)
    assert share > 0.8  # uncorrelated inputs: the off-diagonal entries are noise
    torch.testing.assert_close(h, (1 - share) * s + share * torch.diag(mean_square), rtol=1e-5, atol=1e-6)
    st, s, mean_square = stats_of(torch.randn(256, 1, generator=gen) * torch.rand(1, 32, generator=gen).add(0.5))
    h, share = second_moments(st, floor=0.3)
    assert share == 0.3  # one shared factor: the estimate is far below the floor
    torch.testing.assert_close(h, 0.7 * s + 0.3 * torch.diag(mean_square), rtol=1e-5, atol=1e-6)
