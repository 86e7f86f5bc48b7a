"""NF4 runtime: packed codes stay packed, decoding matches bitsandbytes bit for bit, the velocity
forward matches a float32 model built from the dequantized weights, and no bitsandbytes is needed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ideoquant.codecs.nf4 import (
    double_quantize_absmax,
    nf4_serialized_tensors,
    quantize_nf4,
)
from ideoquant.errors import IdeoquantError
from ideoquant.model.build import resident_bytes
from ideoquant.model.inventory import ModelDims, expected_tensors, to_layout_names
from ideoquant.model.sequence import velocity_inputs
from ideoquant.runtime.linear import DenseLinear
from ideoquant.runtime.nf4_loader import NF4Linear
from ideoquant.runtime.pipeline import load_transformer

from .test_runtime_gguf import (
    assert_close_velocity,
    assert_linears_run_off_cpu,
    synthetic_tensors,
    velocity,
)

DIMS = ModelDims(in_channels=128, hidden=256, head_dim=64, intermediate=512, adaln_dim=256, llm_features=256, num_layers=2)
# Widths whose q/k/v row boundaries and tensor ends fall inside 64-weight blocks (and that avoid
# shapes such as [36, 16] where bitsandbytes 0.50 CPU dequantize_4bit itself misdecodes).
ODD = ModelDims(in_channels=20, hidden=36, head_dim=18, intermediate=40, adaln_dim=24, llm_features=20, num_layers=2)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def nf4_config(dims: ModelDims, double_quant: bool, skipped: list[str]) -> dict:
    return {
        **dims.to_config(),
        "_diffusers_version": "0.42.1",
        "quantization_config": {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": "bfloat16",
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": skipped,
        },
    }


def write_nf4_branch(
    folder: Path, dims: ModelDims, layout: str = "diffusers", double_quant: bool = False, all_linears: bool = False, seed: int = 0
) -> Path:
    """A branch folder in the bitsandbytes layout: every linear NF4 except (by default) the
    one-row adaLN linears, kept bf16 and listed in the skip list; biases and norms bf16."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skipped = []
    specs = {s.name: s for s in expected_tensors(dims)}
    for name, w in synthetic_tensors(dims, seed).items():
        names = to_layout_names(name, layout)
        if specs[name].kind != "linear":
            tensors[names[0]] = w.to(torch.bfloat16)
            continue
        if specs[name].rows_per_image == "one_row" and not all_linears:
            tensors[names[0]] = w.to(torch.bfloat16)
            skipped.append(names[0][: -len(".weight")])
            continue
        rows = w.shape[0] // len(names)
        for i, n in enumerate(names):
            part = w[i * rows : (i + 1) * rows]
            packed, absmax = quantize_nf4(part)
            nested = double_quantize_absmax(absmax) if double_quant else None
            tensors.update(nf4_serialized_tensors(n[: -len(".weight")], packed, absmax, part.shape, torch.bfloat16, nested))
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(nf4_config(dims, double_quant, skipped), indent=2))
    return folder


def bnb_reference_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Diffusers-named float32 weights decoded by bitsandbytes itself (CPU)."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    stored = load_file(folder / WEIGHTS)
    sd = {}
    for key, value in stored.items():
        if not key.endswith(".quant_state.bitsandbytes__nf4"):
            continue
        weight = key[: -len(".quant_state.bitsandbytes__nf4")]
        companions = {k[len(weight) + 1 :]: v for k, v in stored.items() if k.startswith(weight + ".")}
        state = QuantState.from_dict(companions, torch.device("cpu"))
        state.dtype = torch.float32
        sd[weight] = dequantize_4bit(stored[weight], state)
    for key, value in stored.items():
        if key.rsplit(".", 1)[-1] in ("weight", "bias") and key not in sd and value.is_floating_point():
            sd[key] = value.to(torch.float32)
    out = {}
    for key, value in sd.items():
        names = to_layout_names(key, "diffusers")
        rows = value.shape[0] // len(names)
        for i, n in enumerate(names):
            out[n] = value[i * rows : (i + 1) * rows].clone()
    return out


def bnb_reference_model(folder: Path, config) -> torch.nn.Module:
    from diffusers import Ideogram4Transformer2DModel

    model = Ideogram4Transformer2DModel(**{k: v for k, v in dict(config).items() if not k.startswith("_")})
    model.load_state_dict(bnb_reference_state_dict(folder), strict=True)
    return model.eval()


CASES = {
    "diffusers": (DIMS, "diffusers", False),
    "fused-double": (DIMS, "fused", True),
    "odd-fused": (ODD, "fused", False),
    "odd-fused-double": (ODD, "fused", True),
}


@pytest.fixture(scope="module")
def nf4_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nf4")
    return {case: write_nf4_branch(root / case / "transformer", dims, layout, dq) for case, (dims, layout, dq) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_velocity_matches_bnb_dequantized_reference(nf4_folders, case):
    folder = nf4_folders[case]
    model = load_transformer(folder, dtype=torch.float32)
    ref = bnb_reference_model(folder, model.config)
    for unconditional in (False, True):
        inputs = velocity_inputs(model.config, seed=1, unconditional=unconditional)
        assert_close_velocity(velocity(model, inputs), velocity(ref, inputs), rel=2e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_decode_is_bit_exact_with_bitsandbytes(nf4_folders, case):
    folder = nf4_folders[case]
    model = load_transformer(folder, dtype=torch.float32)
    ref = bnb_reference_state_dict(folder)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (NF4Linear, DenseLinear))}
    assert len(linears) == 7 + 8 * CASES[case][0].num_layers
    assert sum(isinstance(m, NF4Linear) for m in linears.values()) == 3 + 7 * CASES[case][0].num_layers
    for name, module in linears.items():
        assert torch.equal(module.dequantize(torch.float32).view(torch.int32), ref[name + ".weight"].view(torch.int32)), name
    for name, p in model.named_parameters():
        assert torch.equal(p, ref[name]), name


@pytest.mark.parametrize("case", ["diffusers", "fused-double"])
def test_stored_form_stays_packed_and_resident_bytes_track_the_file(nf4_folders, case):
    folder = nf4_folders[case]
    model = load_transformer(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    for m in model.modules():
        if isinstance(m, NF4Linear):
            assert m.double_quant == (case == "fused-double")
            assert all(b.dtype == torch.uint8 for b in m.buffers(recurse=False))
            assert m.qweight.numel() == m.in_features * m.out_features // 2
    ratio = resident_bytes(model) / (folder / WEIGHTS).stat().st_size
    assert 0.97 < ratio <= 1.0, ratio


@pytest.mark.parametrize("case", ["fused-double", "odd-fused-double", "odd-fused"])
def test_decoding_is_device_generic(nf4_folders, case):
    assert_linears_run_off_cpu(load_transformer(nf4_folders[case], dtype=torch.bfloat16))


def test_cast_keeps_scales_exact(nf4_folders):
    model = load_transformer(nf4_folders["fused-double"], dtype=torch.float32)
    before = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    for n, m in model.named_modules():
        if isinstance(m, NF4Linear):
            assert torch.equal(m.dequantize(), before[n]), n


def test_fused_qkv_split_into_row_ranges(nf4_folders):
    model = load_transformer(nf4_folders["odd-fused"], dtype=torch.float32)
    attn = model.layers[1].attention
    # 36 x 36 rows: q starts at weight 0, k at 1296 (block 20 + 16), v at 2592 (block 40 + 32).
    assert [attn.to_q.skip, attn.to_k.skip, attn.to_v.skip] == [0, 16, 32]
    assert all(m.out_features == 36 for m in (attn.to_q, attn.to_k, attn.to_v))


def test_loads_and_runs_without_bitsandbytes(nf4_folders, monkeypatch):
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # any import of it now fails
    model = load_transformer(nf4_folders["fused-double"], dtype=torch.bfloat16)
    out = velocity(model, velocity_inputs(model.config, dtype=torch.bfloat16))
    assert torch.isfinite(out).all()
    assert "bitsandbytes" not in [m for m, v in sys.modules.items() if v is not None]


def test_output_folder_branch_choice(tmp_path):
    root = tmp_path / "out"
    write_nf4_branch(root / "transformer", ODD, seed=0)
    write_nf4_branch(root / "unconditional_transformer", ODD, seed=1)
    cond = load_transformer(root, dtype=torch.float32)
    uncond = load_transformer(root, branch="unconditional_transformer", dtype=torch.float32)
    assert cond.ideoquant_source["path"].endswith("transformer") and "unconditional" not in cond.ideoquant_source["path"]
    assert uncond.ideoquant_source["path"].endswith("unconditional_transformer")
    assert not torch.equal(cond.input_proj.dequantize(), uncond.input_proj.dequantize())
    with pytest.raises(IdeoquantError, match="a transformer folder, not unconditional_transformer"):
        load_transformer(root / "transformer", branch="uncond")


def _edit_folder(src: Path, dst: Path, tensors=None, config=None) -> Path:
    dst.mkdir(parents=True)
    stored = load_file(src / WEIGHTS)
    cfg = json.loads((src / "config.json").read_text())
    save_file(tensors(stored) if tensors else stored, dst / WEIGHTS)
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    return dst


def _set_qc(**changes):
    def edit(cfg):
        cfg["quantization_config"].update(changes)
        return cfg

    return edit


def _drop(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


@pytest.mark.parametrize(
    "tensors, config, message",
    [
        (None, _set_qc(bnb_4bit_quant_type="fp4"), "only 'nf4' is supported"),
        (None, _set_qc(load_in_4bit=False, load_in_8bit=True), "8-bit checkpoints are not supported"),
        (None, _set_qc(quant_method="awq"), "quantization method 'awq' is not supported"),
        (_drop("layers.1.attention.norm_k.weight"), None, "missing tensor layers.1.attention.norm_k.weight"),
        (_drop("layers.0.attention.qkv.weight.absmax"), None, "absmax"),
        (
            lambda t: {**t, "layers.0.feed_forward.w2.weight": t["layers.0.feed_forward.w2.weight"][:-8]},
            None,
            "bytes for shape",
        ),
        (None, lambda c: {**c, "intermediate_size": 48}, "config.json intermediate_size=48 but tensors say 40"),
    ],
    ids=["fp4", "8bit", "other-method", "missing-norm", "missing-absmax", "short-data", "config-mismatch"],
)
def test_bad_folders_raise_one_line_errors(nf4_folders, tmp_path, tensors, config, message):
    folder = _edit_folder(nf4_folders["odd-fused"], tmp_path / "bad", tensors, config)
    with pytest.raises(IdeoquantError, match=message) as info:
        load_transformer(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("layout, double_quant", [("diffusers", False), ("fused", True)])
def test_converter_output_loads(tmp_path, tiny_fp8, layout, double_quant):
    """Folders written by `ideoquant convert --format nf4` load and match bitsandbytes' decoding."""
    pytest.importorskip("ideoquant.export.nf4_branch")
    from ideoquant.export.convert import convert
    from ideoquant.export.options import ConvertOptions

    out = tmp_path / "nf4"
    convert(str(tiny_fp8), ConvertOptions(fmt="nf4", out=out, branches="uncond", layout=layout, double_quant=double_quant, quiet=True))
    model = load_transformer(out, branch="uncond", dtype=torch.float32)
    assert any(isinstance(m, NF4Linear) and m.double_quant == double_quant for m in model.modules())
    ref = bnb_reference_model(out / "unconditional_transformer", model.config)
    inputs = velocity_inputs(model.config, seed=6, unconditional=True)
    assert_close_velocity(velocity(model, inputs), velocity(ref, inputs), rel=2e-5)
