"""Model card and quantization report: front matter, licence carried from the source, and every
number in the card equal to the conversion's own (sizes and sha256 recomputed here)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from ideoquant.export.convert import convert
from ideoquant.export.model_card import compact_modules, parse_file_table, recipe_lines
from ideoquant.export.options import ConvertOptions
from ideoquant.export.report import human_bytes

SOURCE_CARD = """---
license: other
license_name: ideogram-4-non-commercial
license_link: LICENSE.md
pipeline_tag: text-to-image
---

# Ideogram 4
"""
LICENSE_TEXT = "Ideogram 4 licence: non-commercial use only.\n"
BASE_MODEL = "ideogram-ai/ideogram-4-fp8"




def licensed_source(tiny_fp8: Path, dst: Path) -> Path:
    """The tiny source with a model card and a LICENSE.md, as a Hub snapshot has them."""
    shutil.copytree(tiny_fp8, dst)
    (dst / "README.md").write_text(SOURCE_CARD)
    (dst / "LICENSE.md").write_text(LICENSE_TEXT)
    return dst


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def q8_card(tiny_fp8, tmp_path_factory):
    base = tmp_path_factory.mktemp("card")
    src = licensed_source(tiny_fp8, base / "src")
    out = base / "out"
    results = convert(str(src), ConvertOptions(fmt="q8_0", out=out, quiet=True, base_model=BASE_MODEL))
    return out, results


def test_card_parses_with_every_front_matter_field(q8_card):
    out, _ = q8_card
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.base_model == BASE_MODEL
    assert data.base_model_relation == "quantized"
    assert data.license == "other"
    assert data.pipeline_tag == "text-to-image"
    assert data.library_name == "gguf"
    assert {"ideogram-4", "gguf", "q8_0"} <= set(data.tags)
    assert ModelCard(card.content).data.to_dict() == data.to_dict()


def test_licence_fields_and_file_carried_from_the_source_card(q8_card):
    out, _ = q8_card
    data = ModelCard.load(out / "README.md").data
    assert data.license_name == "ideogram-4-non-commercial"
    assert data.license_link == "LICENSE.md"
    assert (out / "LICENSE.md").read_text() == LICENSE_TEXT
    assert "LICENSE.md" in parse_file_table((out / "README.md").read_text())


def test_file_table_has_every_file_with_its_size_and_sha256(q8_card):
    out, results = q8_card
    table = parse_file_table((out / "README.md").read_text())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"README.md", "quantization_report.json"}
    assert set(table) == on_disk == {"ideogram4-Q8_0.gguf", "ideogram4-uncond-Q8_0.gguf", "LICENSE.md"}
    for name, (size, digest) in table.items():
        assert size == (out / name).stat().st_size
        assert digest == sha256_of(out / name)
    assert {p.name for r in results for p in r.files} <= set(table)


def test_nf4_card_lists_the_sha256_the_writer_computed_for_each_weight_file(tiny_fp8, tmp_path, monkeypatch):
    """The weight files' digests come from the writer (not read again) and are the bytes on disk."""
    from ideoquant.export import model_card

    reread = []
    real = model_card.sha256_file
    monkeypatch.setattr(model_card, "sha256_file", lambda path: reread.append(Path(path).name) or real(path))
    out = tmp_path / "out"
    convert(str(tiny_fp8), ConvertOptions(fmt="nf4", out=out, quiet=True))
    table = parse_file_table((out / "README.md").read_text())
    weights = [name for name in table if name.endswith(".safetensors")]
    assert len(weights) == 2
    for name, (size, digest) in table.items():
        assert size == (out / name).stat().st_size and digest == sha256_of(out / name)
    assert not any(name.endswith(".safetensors") for name in reread), reread


def test_errors_and_sizes_in_the_card_are_the_conversions(q8_card):
    out, results = q8_card
    text = (out / "README.md").read_text()
    for r in results:
        summary = r.error_summary()
        assert f"| {r.branch} | " in text
        assert f"{summary['mean']:.3e}" in text and f"{summary['max']:.3e}" in text
        worst = {t.name: t.rel_error for t in r.tensors}
        for name in summary["worst"]:
            assert f"`{name}` {worst[name]:.3e}" in text
        assert f"| {human_bytes(r.source_bytes)} | {human_bytes(r.output_bytes)} |" in text
        assert r.source_checksum in text
    total_out = sum(r.output_bytes for r in results)
    total_src = sum(r.source_bytes for r in results)
    assert f"| **total** | {human_bytes(total_src)} | {human_bytes(total_out)} | {100 * total_out / total_src:.1f}% |" in text


def test_card_tells_how_to_run_the_files(q8_card):
    text = (q8_card[0] / "README.md").read_text()
    assert "from ideoquant.runtime import load_pipeline, load_transformer" in text
    assert "--diffusion-model ideogram4-Q8_0.gguf" in text
    assert "--uncond-diffusion-model ideogram4-uncond-Q8_0.gguf" in text
    assert "ComfyUI-GGUF" in text
    assert "{{" not in text and "{%" not in text


def test_report_json_records_files_tensors_recipe_and_errors(q8_card):
    out, results = q8_card
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["format"] == "q8_0" and report["source"]["base_model"] == BASE_MODEL
    assert [f["path"] for f in report["files"]] == ["LICENSE.md"]
    for r in results:
        br = report["branches"][r.branch]
        assert [(f["path"], f["size"], f["sha256"]) for f in br["files"]] == [
            (p.name, p.stat().st_size, sha256_of(p)) for p in r.files
        ]
        assert [(t["name"], tuple(t["shape"]), t["out_type"], t["nbytes"], t["rel_error"]) for t in br["tensors"]] == [
            (t.name, t.shape, t.out_type, t.nbytes, t.rel_error) for t in r.tensors
        ]
        assert br["error_summary"] == r.error_summary()
        assert br["recipe"]["types"]["input_proj.bias"] == {"type": "F32", "reason": "1-D tensors stay F32"}
        assert br["source_checksum"] == r.source_checksum and br["source_bytes"] == r.source_bytes


def test_source_without_a_card_still_gets_a_valid_card(tiny_fp8, tmp_path):
    convert(str(tiny_fp8), ConvertOptions(fmt="q8_0", out=tmp_path, quiet=True, branches="cond"))
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.base_model is None and data.license == "other" and data.license_name
    assert not list(tmp_path.glob("LICENSE*"))
    assert set(parse_file_table((tmp_path / "README.md").read_text())) == {"ideogram4-Q8_0.gguf"}


def test_a_failed_card_leaves_no_outputs(tiny_fp8, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("template failure")

    monkeypatch.setattr("ideoquant.export.model_card.render_card", broken)
    with pytest.raises(RuntimeError):
        convert(str(tiny_fp8), ConvertOptions(fmt="q8_0", out=tmp_path, quiet=True))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_module_lists_are_compacted_by_block():
    names = [f"layers.{i}.feed_forward.w2" for i in (0, 1, 2, 5)] + ["llm_cond_proj", "layers.3.attention.o"]
    assert compact_modules(names) == "`layers.{0-2,5}.feed_forward.w2`, `llm_cond_proj`, `layers.3.attention.o`"


def test_int8_recipe_is_summarised_without_its_bulk():
    recipe = {
        "settings": {"alpha": None, "protect": 2, "alpha_grid": [0.4, 0.5]},
        "quantized": 11,
        "kept": {"adaln_proj": "one row per image", "layers.0.feed_forward.w2": "measured", "layers.1.feed_forward.w2": "measured"},
        "protected": ["layers.1.feed_forward.w2", "layers.0.feed_forward.w2"],
        "alphas": {"llm_cond_proj": None, "layers.0.attention.qkv": 0.5, "layers.1.attention.qkv": 0.7},
        "linears": {f"layers.{i}.attention.o": {"alpha": 0.5, "error": 0.01} for i in range(40)},
        "calibration": {"file": "stats.safetensors", "runs": [{"mode": "synthetic", "steps": 3}]},
    }
    lines = recipe_lines(recipe)
    assert lines == [
        "Kept in higher precision (3): `adaln_proj`, `layers.{0-1}.feed_forward.w2`",
        "Protected for their measured error (2): `layers.{0-1}.feed_forward.w2`",
        "Quantized linears: 11",
        "SmoothQuant: alpha searched per input group, 2 of 3 groups smoothed: min 0.50, median 0.70, max 0.70",
        "Calibration: file stats.safetensors, runs [mode synthetic, steps 3]",
        "settings: protect 2, alpha_grid 0.4/0.5",
    ]


def test_a_built_wheel_carries_the_card_template_and_prompt_sets(tmp_path):
    """A non-editable install finds the template and the prompt sets inside the package."""
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for name in ("ideoquant", "model_cards", "calibration_prompts"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(wheels), str(src)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("ideoquant-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    for name in ("model_cards/ideogram4-quantized.md", "calibration_prompts/calibration.jsonl",
                 "calibration_prompts/evaluation_quality.jsonl", "calibration_prompts/evaluation_text.jsonl"):
        assert f"ideoquant/{name}" in names
    modules = {p.relative_to(root).as_posix() for p in (root / "ideoquant").rglob("*.py")}
    assert modules <= names, f"missing from the wheel: {sorted(modules - names)}"
    probe = (
        "import ideoquant.export.model_card as m, ideoquant.calibrate.prompts as p; "
        "print(m.TEMPLATE_PATH.read_text()[:3]); print(len(p.load_prompts(p.PROMPTS_DIR / 'calibration.jsonl')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")},
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout.split()
    assert out == ["---", "130"]


def test_int8_card_states_the_budget_and_each_protected_gain():
    recipe = {
        "protected": ["final_layer.linear", "layers.1.feed_forward.w2"],
        "protection": {
            "describe": "budget 11.1% of the int8-eligible linear weights (1.50 MiB of bf16)",
            "budget_bytes": 1572864,
            "spent_bytes": 458752,
            "impact_rss_before": 0.0184,
            "impact_rss_after": 0.0063,
            "linears": {
                "final_layer.linear": {"bytes": 65536, "impact": 0.013, "share_of_squared_impact": 0.5},
                "layers.1.feed_forward.w2": {"bytes": 393216, "impact": 0.0016, "share_of_squared_impact": 0.01},
            },
            "patterns": ["layers.0.attention.o"],
        },
    }
    lines = recipe_lines(recipe)
    assert lines[1] == (
        "Protection: budget 11.1% of the int8-eligible linear weights (1.50 MiB of bf16); spent 448.00 KiB on 2 "
        "linears; measured W8A8 impact (root sum of squares over the measured linears) 0.0184 -> 0.0063"
    )
    assert lines[2] == ("Measured gain of each protected linear (impact removed, bf16 bytes): "
                        "`final_layer.linear` 0.013 (64.00 KiB), `layers.1.feed_forward.w2` 0.0016 (384.00 KiB)")
    assert lines[3] == "Kept by --protect-pattern, outside the budget: `layers.0.attention.o`"
    assert not any(line.startswith("protection:") for line in lines)
