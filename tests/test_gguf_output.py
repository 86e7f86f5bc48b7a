"""GGUF files: layout every reader needs, type policy, metadata, and ggml-identical Q8_0."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf import quants as gguf_quants

from ideoquant.codecs.ggml.registry import ggml_type
from ideoquant.export.convert import convert
from ideoquant.export.options import ConvertOptions
from ideoquant.io.source import open_source
from ideoquant.model.inventory import expected_tensors
from ideoquant.recipes import gguf_policy
from ideoquant.recipes.gguf_policy import gguf_tensor_types

from .conftest import DATA, gguf_files


@pytest.fixture(scope="module")
def q8_out(tiny_fp8, tmp_path_factory):
    out = tmp_path_factory.mktemp("q8")
    results = convert(str(tiny_fp8), ConvertOptions(fmt="q8_0", out=out, quiet=True))
    return out, results


def test_one_file_per_branch_with_uncond_in_name(q8_out):
    out, results = q8_out
    assert [p.name for p in gguf_files(out)] == ["ideogram4-Q8_0.gguf", "ideogram4-uncond-Q8_0.gguf"]
    assert not list(out.glob("*.partial"))
    assert [r.branch for r in results] == ["transformer", "unconditional_transformer"]


def test_reader_sees_every_tensor_in_ggml_order_and_policy(q8_out, tiny_fp8):
    out, _ = q8_out
    bs = open_source(tiny_fp8).branches["transformer"]
    specs = expected_tensors(bs.dims)
    reader = GGUFReader(out / "ideogram4-Q8_0.gguf")
    assert reader.get_field("GGUF.version").contents() == 3
    assert reader.get_field("general.alignment").contents() == 32
    assert [t.name for t in reader.tensors] == [s.name for s in specs]
    offset = reader.data_offset
    for t, s in zip(reader.tensors, specs):
        assert list(t.shape) == list(reversed(s.shape))  # ggml order: ne = [in, out]
        assert t.tensor_type == (QT.F32 if len(s.shape) == 1 else QT.Q8_0)
        assert t.data_offset == offset  # contiguous, each tensor padded to the alignment
        offset += -(-int(t.n_bytes) // 32) * 32
        assert not t.name.startswith("model.")


def test_metadata(q8_out, tiny_fp8):
    out, _ = q8_out
    reader = GGUFReader(out / "ideogram4-uncond-Q8_0.gguf")
    field = lambda k: reader.get_field(k).contents()  # noqa: E731
    assert field("general.architecture") == "ideogram4"
    assert field("general.file_type") == 7
    assert field("general.quantization_version") == 2
    assert field("ideoquant.branch") == "unconditional_transformer"
    assert field("ideoquant.format") == "q8_0"
    assert field("ideoquant.source.checksum") == open_source(tiny_fp8).branches["unconditional_transformer"].checksum()
    recipe = json.loads(field("ideoquant.recipe"))
    assert recipe["layers.0.feed_forward.w2.weight"]["type"] == "Q8_0"
    assert recipe["layers.0.ffn_norm1.weight"]["type"] == "F32"


def test_q8_0_bytes_equal_ggml(q8_out, tiny_fp8):
    """Every Q8_0 tensor equals the gguf package's encoder, which is byte-identical to ggml."""
    out, _ = q8_out
    bs = open_source(tiny_fp8).branches["transformer"]
    reader = GGUFReader(out / "ideogram4-Q8_0.gguf")
    for t in reader.tensors:
        if t.tensor_type != QT.Q8_0:
            continue
        src = bs.read_float32(t.name).numpy()
        expected = gguf_quants.quantize(src, QT.Q8_0)
        assert np.array_equal(np.asarray(t.data).reshape(expected.shape), expected), t.name


@pytest.mark.parametrize("qtype", ["Q8_0", "F16", "BF16", "F32"])
def test_encoders_match_ggml_vectors(qtype):
    vectors = np.load(DATA / "ggml_quants.npz")
    cls = ggml_type(qtype)
    cases = [k.rsplit("/", 1)[0] for k in vectors.files if k.endswith("/input")]
    for case in cases:
        rows = vectors[case + "/input"]
        ours = cls.quantize_rows(torch.from_numpy(rows)).numpy()
        if qtype == "Q8_0":
            assert np.array_equal(ours, vectors[case + "/Q8_0"]), case
        else:
            theirs = gguf_quants.quantize(rows, QT[qtype]) if qtype != "F32" else rows
            theirs = theirs.astype(np.float16) if qtype == "F16" else theirs
            assert ours.tobytes() == np.ascontiguousarray(theirs).tobytes(), case
        decoded = cls.dequantize_rows(torch.from_numpy(ours)).numpy()
        if qtype not in ("F32", "F16"):
            ref = gguf_quants.dequantize(ours, QT[qtype])
            assert np.array_equal(decoded.view(np.uint32), ref.reshape(decoded.shape).view(np.uint32)), case


FORMAT_BITS = [("f32", 32.0), ("f16", 16.0), ("bf16", 16.0), ("q8_0", 8.5)]
FORMAT_BITS += [("q5_1", 6.0), ("q5_0", 5.5), ("q4_1", 5.0), ("iq4_nl", 4.5)]


@pytest.mark.parametrize("fmt, bits", FORMAT_BITS)
def test_formats_decode_close_to_source(tiny_fp8, tmp_path, fmt, bits):
    results = convert(str(tiny_fp8), ConvertOptions(fmt=fmt, out=tmp_path, branches="cond", quiet=True))
    r = results[0]
    bs = open_source(tiny_fp8).branches["transformer"]
    quantized = [t for t in r.tensors if len(t.shape) == 2]
    bound = {"f32": 0.0, "f16": 1e-3, "bf16": 5e-3, "q8_0": 1e-2, "q5_1": 0.05, "q5_0": 0.06, "q4_1": 0.1, "iq4_nl": 0.12}[fmt]
    assert all(t.rel_error <= bound for t in quantized)
    data_bits = 8 * sum(t.nbytes for t in quantized) / sum(np.prod(t.shape) for t in quantized)
    assert data_bits == pytest.approx(bits, abs=0.01)
    # The reported error is the file's: decode the file with the gguf package and compare.
    reader = GGUFReader(r.files[0])
    t = next(t for t in reader.tensors if t.name == "layers.1.feed_forward.w3.weight")
    decoded = gguf_quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(768, 256)
    src = bs.read_float32(t.name).numpy()
    err = np.linalg.norm(decoded - src) / np.linalg.norm(src)
    reported = next(x.rel_error for x in r.tensors if x.name == t.name)
    assert err == pytest.approx(reported, rel=1e-5, abs=1e-12)


def test_diffusers_layout_source_gives_identical_tensor_data(tiny_fp8, tiny_fp8_diffusers, tmp_path):
    a = convert(str(tiny_fp8), ConvertOptions(fmt="q8_0", out=tmp_path / "a", branches="cond", quiet=True))[0]
    b = convert(str(tiny_fp8_diffusers), ConvertOptions(fmt="q8_0", out=tmp_path / "b", branches="cond", quiet=True))[0]
    ra, rb = GGUFReader(a.files[0]), GGUFReader(b.files[0])
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert ta.name == tb.name and np.array_equal(np.asarray(ta.data), np.asarray(tb.data))


def test_k_quant_policy_falls_back_for_short_rows():
    from ideoquant.io.synthetic import TINY

    choices = {c.name: c for c in gguf_tensor_types(TINY, "q4_k")}
    assert choices["input_proj.weight"].qtype == QT.Q8_0  # rows of 128 cannot hold a 256 block
    assert "fallback" in choices["input_proj.weight"].reason
    # Q4_K/Q5_K/Q6_K keep Q8_0 there, as their files always had; the types below 4 bits take IQ4_NL
    for fmt, want in (("q5_k", QT.Q8_0), ("q6_k", QT.Q8_0), ("q5_k_m", QT.Q8_0), ("q3_k", QT.IQ4_NL), ("q2_k", QT.IQ4_NL),
                      ("iq4_xs", QT.IQ4_NL)):
        assert {c.name: c for c in gguf_tensor_types(TINY, fmt)}["input_proj.weight"].qtype == want, fmt
    # the 32-weight types fit every tensor of the model: no fallback
    for fmt, want in (("q4_1", QT.Q4_1), ("q5_0", QT.Q5_0), ("q5_1", QT.Q5_1), ("iq4_nl", QT.IQ4_NL)):
        plan = gguf_tensor_types(TINY, fmt)
        assert all(c.qtype == want for c in plan if len(c.shape) == 2), fmt
        assert not any("fallback" in c.reason for c in plan), fmt
    assert choices["layers.0.attention.qkv.weight"].qtype == QT.Q4_K
    mixed = {c.name: c for c in gguf_tensor_types(TINY, "q4_k_m")}
    assert mixed["layers.1.feed_forward.w2.weight"].qtype == QT.Q5_K
    assert mixed["layers.1.feed_forward.w1.weight"].qtype == QT.Q4_K


def test_importance_matrix_paths(tiny_fp8, tmp_path):
    """--imatrix ones is stable-diffusion.cpp's encoding, --imatrix STATS uses E[x^2] per
    input channel, and a linear without statistics (the uncond llm_cond_proj) falls back
    to the plain path; every tensor's bytes equal the encoder's for the same weights."""
    from ideoquant.calibrate.run import calibrate
    from ideoquant.calibrate.statistics import load_importance

    stats = tmp_path / "stats.safetensors"
    calibrate(tiny_fp8, stats, synthetic=True, steps=2, resolution=64, synthetic_inputs=2, text_tokens=8,
              max_samples=32, quiet=True)
    q4k = ggml_type("Q4_K")
    source = open_source(tiny_fp8)
    for imatrix in ("ones", str(stats)):
        out = tmp_path / imatrix.replace("/", "_")
        convert(str(tiny_fp8), ConvertOptions(fmt="q4_k", out=out, imatrix=imatrix, quiet=True))
        for branch, fname in [("transformer", "ideogram4-Q4_K.gguf"), ("unconditional_transformer", "ideogram4-uncond-Q4_K.gguf")]:
            reader = GGUFReader(out / fname)
            assert reader.get_field("ideoquant.imatrix").contents() == imatrix
            bs = source.branches[branch]
            for name in ("layers.0.feed_forward.w2.weight", "llm_cond_proj.weight"):
                t = next(t for t in reader.tensors if t.name == name)
                w = bs.read_float32(name)
                module = name.rsplit(".", 1)[0]
                weights = torch.ones(w.shape[1]) if imatrix == "ones" else load_importance(stats, module, branch)
                if branch == "unconditional_transformer" and name.startswith("llm_cond") and imatrix != "ones":
                    assert weights is None
                expected = q4k.quantize_rows(w, weights).numpy()
                assert np.array_equal(np.asarray(t.data).reshape(expected.shape), expected), (imatrix, branch, name)
    plain = q4k.quantize_rows(source.branches["transformer"].read_float32("layers.0.feed_forward.w2.weight")).numpy()
    imat = load_importance(stats, "layers.0.feed_forward.w2", "transformer")
    assert not np.array_equal(plain, q4k.quantize_rows(source.branches["transformer"].read_float32("layers.0.feed_forward.w2.weight"), imat).numpy())


@pytest.mark.parametrize("fmt", ["q4_1", "q5_0", "q5_1", "iq4_nl"])
def test_32_weight_formats_through_the_cli(tiny_fp8, tmp_path, fmt):
    """convert (with stable-diffusion.cpp's all-ones importance), inspect --plan, the card,
    the report and verify against the source, for each 32-weight format."""
    from click.testing import CliRunner

    from ideoquant import cli

    def run(*args):
        return CliRunner().invoke(cli.main, [str(a) for a in args])

    qtype = fmt.upper()
    plan = run("inspect", tiny_fp8, "--plan", fmt)
    assert plan.exit_code == 0, plan.output
    assert "layers.0.feed_forward.w2.weight" in plan.output and qtype in plan.output
    out = tmp_path / "out"
    result = run("convert", tiny_fp8, "--format", fmt, "--imatrix", "ones", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    cond = out / f"ideogram4-{qtype}.gguf"
    reader = GGUFReader(cond)
    linear_types = {QT(t.tensor_type) for t in reader.tensors if len(t.shape) == 2 and t.name != "embed_image_indicator.weight"}
    assert linear_types == {QT[qtype]}
    assert int(reader.get_field("general.file_type").contents()) == int(gguf_policy.FILE_TYPES[fmt])
    card = (out / "README.md").read_text()
    assert f"{qtype} GGUF" in card and f"| {qtype} |" in card
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["branches"]["transformer"]["tensors"]
    verified = run("verify", out, "--source", tiny_fp8)
    assert verified.exit_code == 0, verified.output
