"""Formats q2_k, q3_k, iq4_xs and the q3_k_s/m/l mixes: policy, files, verify, inspect, card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf import quants as gguf_quants

from ideoquant import cli
from ideoquant.codecs.ggml.registry import ggml_type
from ideoquant.io.source import open_source
from ideoquant.io.synthetic import TINY
from ideoquant.recipes.formats import ALL_FORMATS
from ideoquant.recipes.gguf_policy import gguf_tensor_types

PLAIN = {"q2_k": QT.Q2_K, "q3_k": QT.Q3_K, "iq4_xs": QT.IQ4_XS}
BLOCK_LINEARS = ("attention.qkv", "attention.o", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaln_modulation")


def run_cli(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def test_new_formats_are_listed():
    for fmt in ("q2_k", "q3_k", "iq4_xs", "q3_k_s", "q3_k_m", "q3_k_l"):
        assert fmt in ALL_FORMATS


@pytest.mark.parametrize("fmt", sorted(PLAIN))
def test_plain_formats_store_every_block_linear_in_their_type(fmt):
    choices = {c.name: c for c in gguf_tensor_types(TINY, fmt)}
    for i in range(TINY.num_layers):
        for kind in BLOCK_LINEARS:
            c = choices[f"layers.{i}.{kind}.weight"]
            assert (c.qtype, c.reason) == (PLAIN[fmt], "requested type")
    # rows of 128 cannot hold a 256-weight block: the nearest type that fits, with the reason
    c = choices["input_proj.weight"]
    assert c.qtype == QT.IQ4_NL and "do not fit" in c.reason and PLAIN[fmt].name in c.reason
    assert all(c.qtype == QT.F32 for c in choices.values() if len(c.shape) == 1)


OUTSIDE = ("t_embedding.mlp_in.weight", "t_embedding.mlp_out.weight", "adaln_proj.weight",
           "embed_image_indicator.weight", "final_layer.linear.weight", "final_layer.adaln_modulation.weight")
# The measured q3_k mixes (bench/kquant_mix_sensitivity.py): tensor suffix -> type.
MIXES = {
    "q3_k_s": {},
    "q3_k_m": {
        "layers.0.adaln_modulation.weight": QT.Q4_K,
        "layers.1.adaln_modulation.weight": QT.Q4_K,
        **dict.fromkeys(OUTSIDE, QT.Q5_K),
    },
    "q3_k_l": {
        "layers.0.attention.qkv.weight": QT.Q4_K,
        "layers.1.adaln_modulation.weight": QT.Q5_K,
        **dict.fromkeys(OUTSIDE, QT.Q5_K),
    },
}


@pytest.mark.parametrize("fmt", sorted(MIXES))
def test_q3_k_mixes_keep_the_measured_linears_higher(fmt):
    choices = {c.name: c for c in gguf_tensor_types(TINY, fmt)}
    raised = MIXES[fmt]
    for name, c in choices.items():
        if len(c.shape) == 1 or name == "input_proj.weight":
            continue
        want = raised.get(name)
        if want is None and name.startswith("layers.") and (".feed_forward." in name or ".attention.o." in name):
            want = QT.Q3_K  # never raised
        if want is None and name == "llm_cond_proj.weight":
            want = QT.Q3_K
        if want is not None:
            assert c.qtype == want, name
            if want != QT.Q3_K:
                steps = {QT.Q4_K: "one type higher", QT.Q5_K: "two types higher"}[want]
                assert c.reason.startswith(f"{fmt} keeps") and c.reason.endswith(steps), c.reason
    if fmt == "q3_k_s":
        assert all(c.qtype == QT.Q3_K for n, c in choices.items() if n.startswith("layers.") and len(c.shape) == 2)


@pytest.fixture(scope="module")
def converted(tiny_fp8, tmp_path_factory):
    """The cond branch of the tiny checkpoint in each new plain format and one mix (q3_k_m with ones)."""
    base = tmp_path_factory.mktemp("lowbit")
    out = {}
    for fmt, extra in (("q2_k", []), ("q3_k_m", ["--imatrix", "ones"]), ("iq4_xs", [])):
        folder = base / fmt
        result = run_cli("convert", tiny_fp8, "--format", fmt, "--out", folder, "--branches", "cond", "--quiet", *extra)
        assert result.exit_code == 0, result.output
        out[fmt] = folder
    return out


@pytest.mark.parametrize("fmt,bound", [("q2_k", 0.45), ("q3_k_m", 0.25), ("iq4_xs", 0.12)])
def test_converted_file_holds_the_planned_types_and_decodes_near_the_source(converted, tiny_fp8, fmt, bound):
    folder = converted[fmt]
    path = folder / f"ideogram4-{fmt.upper()}.gguf"
    reader = GGUFReader(path)
    planned = {c.name: c.qtype for c in gguf_tensor_types(TINY, fmt)}
    assert {t.name: t.tensor_type for t in reader.tensors} == planned
    recipe = json.loads(reader.get_field("ideoquant.recipe").contents())
    assert {n: r["type"] for n, r in recipe.items()} == {n: q.name for n, q in planned.items()}
    bs = open_source(tiny_fp8).branches["transformer"]
    for t in reader.tensors:
        if t.tensor_type not in (QT.Q2_K, QT.Q3_K, QT.IQ4_XS):
            continue
        src = bs.read_float32(t.name)
        decoded = gguf_quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(src.shape)
        err = np.linalg.norm(decoded - src.numpy()) / np.linalg.norm(src.numpy())
        assert 0 < err < bound, t.name
        # the file's bytes are the encoder's (byte-identical to ggml: test_ggml_lowbit.py)
        imatrix = torch.ones(src.shape[1]) if "imatrix" in fmt or fmt == "q3_k_m" else None
        ours = ggml_type(t.tensor_type).quantize_rows(src, imatrix).numpy()
        assert np.array_equal(np.asarray(t.data).reshape(ours.shape), ours), t.name


@pytest.mark.parametrize("fmt", ["q2_k", "q3_k_m", "iq4_xs"])
def test_verify_card_and_inspect_handle_the_format(converted, tiny_fp8, fmt):
    folder = converted[fmt]
    result = run_cli("verify", folder, "--source", tiny_fp8)
    assert result.exit_code == 0, result.output
    card = (folder / "README.md").read_text()
    assert f"ideogram4-{fmt.upper()}.gguf" in card
    report = json.loads((folder / "quantization_report.json").read_text())
    types = {t["out_type"] for b in report["branches"].values() for t in b["tensors"]}
    assert {q.name for q in (PLAIN.get(fmt, QT.Q3_K),)} <= types
    plan = run_cli("inspect", tiny_fp8, "--plan", fmt)
    assert plan.exit_code == 0, plan.output
    line = next(l for l in plan.output.splitlines() if l.startswith("layers.0.feed_forward.w1.weight"))
    assert PLAIN.get(fmt, QT.Q3_K).name in line
