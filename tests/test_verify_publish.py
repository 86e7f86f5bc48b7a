"""`ideoquant verify` and `ideoquant publish`: a fresh conversion verifies; a flipped byte, a removed
file or an edited card fails with one line; publish refuses such folders and hands the right
calls to an injected Hub client (nothing reaches the network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ideoquant import cli
from ideoquant.codecs.nf4 import dequantize_nf4, nf4_serialized_tensors, quantize_nf4
from ideoquant.errors import IdeoquantError
from ideoquant.export.convert import convert
from ideoquant.export.error_meter import relative_error
from ideoquant.export.model_card import parse_file_table
from ideoquant.export.options import BranchResult, ConvertOptions, TensorReport
from ideoquant.export.publish import publish_folder
from ideoquant.export.verify import verify_folder
from ideoquant.io.safetensors_writer import save_safetensors
from ideoquant.model.inventory import to_layout_names

from .test_model_card import licensed_source

REPO = "someone/ideogram-4-test"




def run_cli(*args: str):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def one_line_error(result) -> str:
    """The CLI failed with exactly one `error:` line; returns it."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def converted(tiny_fp8, tmp_path_factory):
    base = tmp_path_factory.mktemp("verify")
    src = licensed_source(tiny_fp8, base / "src")
    out = base / "q8"
    convert(str(src), ConvertOptions(fmt="q8_0", out=out, quiet=True, base_model="ideogram-ai/ideogram-4-fp8"))
    return src, out


@pytest.fixture
def copy(converted, tmp_path):
    """A private copy of the converted folder, free to damage."""
    dst = tmp_path / "copy"
    shutil.copytree(converted[1], dst)
    return dst


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def restamp(folder: Path, name: str) -> None:
    """Rewrite the card's and report's size/sha256 of one file, as if they had been made for it."""
    from ideoquant.export.model_card import file_entry

    entry = file_entry(folder / name, folder)
    report_path = folder / "quantization_report.json"
    report = json.loads(report_path.read_text())
    for f in [f for b in report["branches"].values() for f in b["files"]] + report["files"]:
        if f["path"] == name:
            old = f"| {f['size']} | `{f['sha256']}` |"
            f.update(entry)
    report_path.write_text(json.dumps(report))
    card = folder / "README.md"
    lines = card.read_text().splitlines(keepends=True)
    row = next(i for i, line in enumerate(lines) if line.startswith(f"| `{name}` |"))
    lines[row] = lines[row].replace(old, f"| {entry['size']} | `{entry['sha256']}` |")
    card.write_text("".join(lines))


# --- verify -----------------------------------------------------------------------------------

def test_fresh_conversion_verifies_against_source_and_records_it(converted, copy):
    src, _ = converted
    result = run_cli("verify", copy, "--source", src)
    assert result.exit_code == 0, result.output
    report = json.loads((copy / "quantization_report.json").read_text())
    verified = report["verified"]
    assert verified["source"] == str(src) and verified["files"] == 3
    for branch, stats in verified["branches"].items():
        assert stats["tensors_compared"] == len(report["branches"][branch]["tensors"])
        assert stats["max_deviation_from_report"] <= 1e-9
        assert stats["max"] == pytest.approx(report["branches"][branch]["error_summary"]["max"])
    # Recording the result does not break the next verification.
    assert run_cli("verify", copy).exit_code == 0


def test_flipped_byte_fails_with_one_line(copy):
    flip_byte(copy / "ideogram4-Q8_0.gguf", -100)
    assert "sha256 differs" in one_line_error(run_cli("verify", copy))


def test_removed_file_fails_with_one_line(copy):
    (copy / "ideogram4-uncond-Q8_0.gguf").unlink()
    assert "missing" in one_line_error(run_cli("verify", copy))


def test_edited_card_hash_fails_with_one_line(copy):
    card = copy / "README.md"
    name = "ideogram4-Q8_0.gguf"
    digest = parse_file_table(card.read_text())[name][1]
    card.write_text(card.read_text().replace(digest, digest[::-1]))
    assert "differs from quantization_report.json" in one_line_error(run_cli("verify", copy))


def test_card_row_removed_fails(copy):
    card = copy / "README.md"
    card.write_text("\n".join(line for line in card.read_text().splitlines() if "`LICENSE.md` |" not in line))
    assert "does not list LICENSE.md" in one_line_error(run_cli("verify", copy))


def test_source_catches_changed_values_even_with_restamped_hashes(converted, copy):
    # The last tensor is an F32 bias stored exactly: any change shows as an error the report does not state.
    name = "ideogram4-Q8_0.gguf"
    flip_byte(copy / name, -2)
    restamp(copy, name)
    assert run_cli("verify", copy).exit_code == 0  # the hashes alone now agree
    line = one_line_error(run_cli("verify", copy, "--source", converted[0]))
    assert "relative error" in line and "the report says 0.0000e+00" in line


def test_structure_damage_is_caught_without_source(copy):
    name = "ideogram4-uncond-Q8_0.gguf"
    (copy / name).write_bytes((copy / name).read_bytes()[:4096])
    restamp(copy, name)
    assert "GGUF" in one_line_error(run_cli("verify", copy))


def test_other_source_is_refused(copy, tiny_fp8, tmp_path):
    from ideoquant.io.synthetic import write_synthetic_pipeline

    other = tmp_path / "other"
    write_synthetic_pipeline(other, size="tiny", seed=7)
    assert "not the source this folder was converted from" in one_line_error(run_cli("verify", copy, "--source", other))


def test_folder_without_report_or_card(tmp_path):
    assert "quantization_report.json: missing" in one_line_error(run_cli("verify", tmp_path))


# --- diffusers folders (INT8 W8A8, NF4) -----------------------------------------------------------

def fake_folder_writer(bs, source, options, outputs, progress) -> BranchResult:
    """A minimal INT8/NF4 branch writer in the diffusers layout: token linears quantized, the rest bf16."""
    folder = options.out / bs.branch
    tensors: dict[str, torch.Tensor] = {}
    reports = []
    for spec in bs.specs.values():
        w = bs.read_float32(spec.name)
        quantize = spec.kind == "linear" and spec.rows_per_image == "tokens"
        parts = to_layout_names(spec.name, "diffusers")
        decoded = []
        for key, part in zip(parts, w.chunk(len(parts))):
            module = key[: -len(".weight")]
            if quantize and options.fmt == "int8":
                scale = part.abs().amax(1, keepdim=True) / 127
                q = torch.round(part / scale).clamp(-127, 127).to(torch.int8)
                tensors[key], tensors[module + ".weight_scale"] = q, scale
                decoded.append(q.float() * scale)
            elif quantize:
                packed, absmax = quantize_nf4(part)
                tensors.update(nf4_serialized_tensors(module, packed, absmax, part.shape, torch.bfloat16, None))
                decoded.append(dequantize_nf4(packed, absmax, part.shape))
            else:
                tensors[key] = part.to(torch.bfloat16)
                decoded.append(tensors[key].float())
        approx = torch.cat(decoded)
        out_type = options.fmt if quantize else "bf16"
        reports.append(TensorReport(spec.name, spec.shape, out_type, approx.numel(), relative_error(approx, w)))
    weights = folder / "diffusion_pytorch_model.safetensors"
    save_safetensors(outputs, weights, tensors)
    method = {"int8": "compressed-tensors", "nf4": "bitsandbytes"}[options.fmt]
    config = {**bs.dims.to_config(), "quantization_config": {"quant_method": method}}
    outputs.write_text(folder / "config.json", json.dumps(config))
    protected = [s.module for s in bs.specs.values() if s.kind == "linear" and s.rows_per_image == "one_row"]
    recipe = {"protected": protected, "alpha": 0.5, "calibration": {"prompts": 4, "steps": 3}, "layout": "diffusers"}
    return BranchResult(bs.branch, [weights], reports, recipe, bs.checksum(), sum(bs.stored_nbytes(n) for n in bs.specs))


@pytest.fixture(scope="module", params=["int8", "nf4"])
def folder_output(request, converted, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr("ideoquant.export.convert.branch_writer", lambda fmt: fake_folder_writer)
    out = tmp_path_factory.mktemp(request.param)
    try:
        convert(str(converted[0]), ConvertOptions(fmt=request.param, out=out, quiet=True, base_model="ideogram-ai/ideogram-4-fp8"))
    finally:
        mp.undo()
    return request.param, out


def test_folder_outputs_get_a_diffusers_card_and_verify(folder_output, converted):
    from huggingface_hub import ModelCard

    fmt, out = folder_output
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and fmt in card.data.tags
    assert "`layers.{0-1}.adaln_modulation`" in card.text and "alpha = 0.5" in card.text and "prompts 4" in card.text
    table = parse_file_table(card.content)
    assert {"transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "LICENSE.md"} <= set(table)
    section = verify_folder(out, str(converted[0]))
    assert all(s["max_deviation_from_report"] <= 1e-9 for s in section["branches"].values())


def test_folder_output_without_quantization_config_fails(folder_output, tmp_path):
    _, out = folder_output
    dst = tmp_path / "damaged"
    shutil.copytree(out, dst)
    config = dst / "transformer" / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "quantization_config"}))
    restamp(dst, "transformer/config.json")
    with pytest.raises(IdeoquantError, match="no quantization_config"):
        verify_folder(dst)



def test_int8_conversion_verifies_against_its_source(converted, tmp_path):
    from huggingface_hub import ModelCard

    from ideoquant.calibrate.run import calibrate

    src = converted[0]
    stats = tmp_path / "stats.safetensors"
    calibrate(src, stats, synthetic=True, steps=1, resolution=32, synthetic_inputs=1, text_tokens=4, max_samples=16, quiet=True)
    out = tmp_path / "int8"
    convert(str(src), ConvertOptions(fmt="int8", out=out, quiet=True, calibration=stats, protect=2))
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and "int8" in card.data.tags
    assert "Protected for their measured error (2)" in card.text
    result = run_cli("verify", out, "--source", src)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "quantization_report.json").read_text())
    verified = report["verified"]["branches"]
    # The writer measures in its own float arithmetic: equal to rounding, not to the bit.
    assert all(v["tensors_compared"] > 0 and v["max_deviation_from_report"] <= 1e-6 for v in verified.values())
    # The stored SmoothQuant factors let every smoothed tensor be compared too.
    smoothed = {b for b, br in report["branches"].items() if any(a is not None for a in br["recipe"]["alphas"].values())}
    assert smoothed, "the tiny calibration smoothed nothing: the factors are not exercised"
    for branch in smoothed:
        assert (out / "smoothquant" / f"{branch}.safetensors").is_file()
        assert verified[branch]["tensors_skipped_smoothed"] == 0
        n_tensors = sum(1 for t in report["branches"][branch]["tensors"] if not t["name"].endswith("_scale"))
        assert verified[branch]["tensors_compared"] == n_tensors

    # Factors that are not the ones used: the smoothed weights no longer match the report.
    from safetensors.torch import load_file, save_file

    branch = sorted(smoothed)[0]
    name = f"smoothquant/{branch}.safetensors"
    factors = load_file(out / name)
    group = sorted(factors)[0]
    factors[group] = factors[group] * 1.5
    save_file(factors, out / name, metadata={"format": "pt"})
    restamp(out, name)
    assert "against the source, the report says" in one_line_error(run_cli("verify", out, "--source", src))

    flip_byte(out / "unconditional_transformer" / "diffusion_pytorch_model.safetensors", -3)
    assert "sha256 differs" in one_line_error(run_cli("verify", out))


# --- publish ----------------------------------------------------------------------------------------

class FakeHub:
    """Records the calls publish makes (huggingface_hub 2.x: upload_folder is the multi-commit upload)."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail = fail

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))
        if self.fail:
            raise RuntimeError("401 Client Error: Unauthorized\nmore detail")
        return f"https://huggingface.co/{args[0]}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))


class LegacyFakeHub(FakeHub):
    """A client that still has upload_large_folder (huggingface_hub before 2.0)."""

    def upload_large_folder(self, **kwargs):
        self.calls.append(("upload_large_folder", (), kwargs))


def test_publish_creates_repo_and_uploads_the_listed_files(copy):
    (copy / "notes.txt").write_text("not part of the conversion")
    hub = FakeHub()
    plan = publish_folder(copy, REPO, private=True, api=hub)
    (name, args, kwargs), (upload, _, up) = hub.calls
    assert (name, args, kwargs) == ("create_repo", (REPO,), {"repo_type": "model", "private": True, "exist_ok": True})
    assert upload == "upload_folder"
    assert up["repo_id"] == REPO and Path(up["folder_path"]) == copy and up["repo_type"] == "model"
    expected = ["LICENSE.md", "README.md", "ideogram4-Q8_0.gguf", "ideogram4-uncond-Q8_0.gguf", "quantization_report.json"]
    assert sorted(up["allow_patterns"]) == expected == [p for p, _ in plan.files]
    assert "Q8_0 GGUF" in up["commit_message"]


def test_publish_uses_upload_large_folder_where_the_client_has_it(copy):
    hub = LegacyFakeHub()
    publish_folder(copy, REPO, api=hub)
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_large_folder"]
    assert hub.calls[0][2]["private"] is None
    assert hub.calls[1][2]["repo_type"] == "model" and "README.md" in hub.calls[1][2]["allow_patterns"]


def test_publish_client_error_is_one_line(copy):
    with pytest.raises(IdeoquantError, match=r"^publishing to someone/ideogram-4-test failed: 401 Client Error: Unauthorized$"):
        publish_folder(copy, REPO, api=FakeHub(fail=True))


def test_publish_refuses_a_folder_without_card(copy):
    (copy / "README.md").unlink()
    hub = FakeHub()
    with pytest.raises(IdeoquantError, match="no model card"):
        publish_folder(copy, REPO, api=hub)
    assert hub.calls == []
    assert "no model card" in one_line_error(run_cli("publish", copy, "--repo-id", REPO, "--dry-run"))


def test_publish_refuses_a_folder_that_does_not_verify(copy):
    flip_byte(copy / "ideogram4-uncond-Q8_0.gguf", -10)
    hub = FakeHub()
    with pytest.raises(IdeoquantError, match="does not verify"):
        publish_folder(copy, REPO, api=hub)
    assert hub.calls == []
    assert "does not verify" in one_line_error(run_cli("publish", copy, "--repo-id", REPO))


def test_dry_run_lists_files_with_sizes_and_uploads_nothing(copy, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("dry run touched the Hub client")

    monkeypatch.setattr("huggingface_hub.HfApi", no_network)
    result = run_cli("publish", copy, "--repo-id", REPO, "--private", "--dry-run")
    assert result.exit_code == 0, result.output
    assert REPO in result.output and "private" in result.output
    for name in ["ideogram4-Q8_0.gguf", "ideogram4-uncond-Q8_0.gguf", "LICENSE.md", "README.md", "quantization_report.json"]:
        line = next(line for line in result.output.splitlines() if line.startswith(name + " "))
        assert str((copy / name).stat().st_size) in line.split()


def test_stored_factors_are_checked_before_use():
    from ideoquant.export.smoothing import recipe_from_factors
    from ideoquant.model.inventory import ModelDims

    dims = ModelDims(hidden=256, head_dim=64, intermediate=768, adaln_dim=256, llm_features=512, num_layers=2)
    ok = {"layers.0.attention.qkv": torch.ones(256), "layers.1.feed_forward.w2": torch.full((768,), 2.0)}
    recipe = recipe_from_factors(dims, ok, "f")
    w2 = torch.ones(256, 768)
    assert torch.equal(recipe.smooth_tensor("layers.1.feed_forward.w2.weight", w2), w2 * 2)
    for bad, message in [
        ({"layers.9.attention.qkv": torch.ones(256)}, "not a smoothing group"),
        ({"layers.0.attention.qkv": torch.ones(255)}, r"expected float32 \[256\]"),
        ({"layers.0.attention.qkv": torch.ones(256, dtype=torch.float64)}, "expected float32"),
        ({"layers.0.attention.qkv": torch.zeros(256)}, "not all finite and positive"),
    ]:
        with pytest.raises(IdeoquantError, match=message):
            recipe_from_factors(dims, bad, "f")


def test_smoothquant_folds_are_left_out_of_the_source_comparison():
    from ideoquant.export.verify import smoothed_tensors
    from ideoquant.model.inventory import ModelDims

    dims = ModelDims(hidden=256, head_dim=64, intermediate=768, adaln_dim=256, llm_features=512, num_layers=2)
    alphas = {"layers.0.attention.o": 0.5, "layers.1.feed_forward.w1+w3": 0.6, "llm_cond_proj": None}
    assert smoothed_tensors({"alphas": alphas}, dims) == {
        "layers.0.attention.o.weight", "layers.0.attention.qkv.weight",  # o's 1/s goes into the v rows of qkv
        "layers.1.feed_forward.w1.weight", "layers.1.feed_forward.w3.weight", "layers.1.ffn_norm1.weight",
    }
    assert smoothed_tensors({"alphas": {"llm_cond_proj": None}}, dims) == set()
    assert smoothed_tensors({"types": {}}, dims) == set()
