"""GGUF runtime: bytes stay resident, decoding matches the `gguf` package bit for bit, and the
velocity forward matches a float32 diffusers model built from the dequantized file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFWriter
from gguf import quants as gguf_quants

from ideoquant.codecs.ggml.registry import ggml_type
from ideoquant.errors import IdeoquantError
from ideoquant.model.build import resident_bytes
from ideoquant.model.inventory import ModelDims, expected_tensors, to_layout_names
from ideoquant.model.sequence import velocity_inputs
from ideoquant.runtime.gguf_loader import GGUFLinear
from ideoquant.runtime.linear import QuantizedLinear
from ideoquant.runtime.pipeline import load_transformer

# Widths that fit 256-weight K-quant blocks everywhere except input_proj (rows of 128).
DIMS = ModelDims(in_channels=128, hidden=256, head_dim=64, intermediate=512, adaln_dim=256, llm_features=256, num_layers=2)
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K"]
TYPES += ["Q3_K", "Q2_K", "IQ4_XS"]
FALLBACKS = (QT.Q8_0, QT.F16)


@lru_cache(maxsize=4)
def synthetic_tensors(dims: ModelDims, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 weights of one branch under canonical names, at trained-model magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for spec in expected_tensors(dims):
        if spec.kind == "linear":
            out[spec.name] = torch.randn(spec.shape, generator=gen) / spec.shape[1] ** 0.5
        elif spec.kind == "norm":
            out[spec.name] = 1.0 + 0.1 * torch.randn(spec.shape, generator=gen)
        else:
            out[spec.name] = 0.05 * torch.randn(spec.shape, generator=gen)
    return out


# Where each block type keeps its fp16 scale(s): (offset, count) in the block.
_SCALE_FIELDS = {QT.Q8_0: (0, 1), QT.Q4_0: (0, 1), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208, 1)}
_SCALE_FIELDS |= {QT.Q4_1: (0, 2), QT.Q5_0: (0, 1), QT.Q5_1: (0, 2), QT.IQ4_NL: (0, 1)}
_SCALE_FIELDS |= {QT.Q2_K: (80, 2), QT.Q3_K: (108, 1), QT.IQ4_XS: (0, 1)}
# Largest |code x sub-scale| of each type, to bring random blocks to about 1/sqrt(k) per weight.
_CODE_RANGE = {QT.Q8_0: 128, QT.Q4_0: 8, QT.Q4_K: 63 * 15, QT.Q5_K: 63 * 31, QT.Q6_K: 128 * 32}
_CODE_RANGE |= {QT.Q4_1: 15, QT.Q5_0: 16, QT.Q5_1: 31, QT.IQ4_NL: 127}
_CODE_RANGE |= {QT.Q2_K: 15 * 3, QT.Q3_K: 32 * 4, QT.IQ4_XS: 32 * 127}
# Types with a min: min / d that centres x = d*q - min (K-quants: d*sc*q - dmin*m) on zero
# for uniform random codes (Q4_1/Q5_1 add the min: a negative one).
_MIN_RATIO = {QT.Q4_K: 7.5, QT.Q5_K: 15.5, QT.Q2_K: 1.5, QT.Q4_1: -7.5, QT.Q5_1: -15.5}


_TORCH_FLOAT = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}


def random_blocks(qtype: QT, rows: int, cols: int, gen: torch.Generator) -> np.ndarray:
    """Valid ggml rows of random codes and sub-scales (every bit pattern a decoder can meet),
    with fp16 block scales set so that weights stay at a trained model's magnitude."""
    cls = ggml_type(qtype)
    n = rows * cols // cls.block_size
    data = torch.randint(0, 256, (n, cls.type_size), generator=gen, dtype=torch.uint8)
    start, count = _SCALE_FIELDS[qtype]
    d = (0.5 + torch.rand(n, count, generator=gen)) / (_CODE_RANGE[qtype] * cols**0.5)
    if count == 2:
        d[:, 1] = d[:, 0] * _MIN_RATIO[qtype]
    data[:, start : start + 2 * count] = d.to(torch.float16).view(torch.uint8)
    return data.reshape(rows, -1).numpy()


def gguf_entries(dims: ModelDims, qtype: str, seed: int = 0, layout: str = "fused") -> list[tuple[str, np.ndarray, QT]]:
    """(name, data, type) per stored tensor: linears in `qtype` (or a fallback that fits), the rest F32.

    Float types are encoded from random weights; block types get random valid blocks (the
    runtime is under test here, not the encoders)."""
    main = QT[qtype]
    gen = torch.Generator().manual_seed(seed + 1)
    entries = []
    for name, w in synthetic_tensors(dims, seed).items():
        if w.dim() == 1 or name == "embed_image_indicator.weight":
            entries.append((name, w.numpy().astype(np.float32), QT.F32))
            continue
        qt = next(t for t in (main, *FALLBACKS) if ggml_type(t).can_encode(w.shape[1]))
        if qt in _SCALE_FIELDS:
            data = random_blocks(qt, w.shape[0], w.shape[1], gen)
        else:
            data = w.to(_TORCH_FLOAT[qt]).view(torch.uint8).numpy()
        parts = to_layout_names(name, layout)
        rows = data.shape[0] // len(parts)
        for i, part in enumerate(parts):
            entries.append((part, data[i * rows : (i + 1) * rows], qt))
    return entries


def write_gguf(path: Path, entries, branch: str | None = "transformer", prefix: str = "") -> Path:
    """A GGUF file as the converter lays it out (bare names, ggml dim order, ideogram4 arch)."""
    writer = GGUFWriter(str(path), arch="ideogram4")
    if branch:
        writer.add_string("ideoquant.branch", branch)
    for name, data, qt in entries:
        writer.add_tensor(prefix + name, data, raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Diffusers-named float32 weights decoded by the `gguf` package's numpy dequantizers."""
    sd = {}
    for t in GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        raw = np.fromfile(path, dtype=np.uint8, count=int(t.n_bytes), offset=int(t.data_offset))
        if t.tensor_type in (QT.F32, QT.F16):
            values = raw.view(np.float32 if t.tensor_type == QT.F32 else np.float16).astype(np.float32)
        else:
            values = gguf_quants.dequantize(raw.reshape(-1, t.data.shape[-1]), t.tensor_type)
        values = values.astype(np.float32).reshape(shape)
        names = to_layout_names(t.name, "diffusers")
        rows = shape[0] // len(names)
        for i, n in enumerate(names):
            sd[n] = torch.from_numpy(values[i * rows : (i + 1) * rows].copy() if len(names) > 1 else values.copy())
    return sd


def reference_model(path: Path, config) -> torch.nn.Module:
    """A float32 diffusers model whose weights are the file's dequantized values."""
    from diffusers import Ideogram4Transformer2DModel

    model = Ideogram4Transformer2DModel(**{k: v for k, v in dict(config).items() if not k.startswith("_")})
    model.load_state_dict(reference_state_dict(path), strict=True)
    return model.eval()


def velocity(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def assert_close_velocity(got: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = (got.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert torch.isfinite(got).all()
    assert err <= rel * scale, f"max error {err:.3e} vs scale {scale:.3e}"


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    return {t: write_gguf(folder / f"ideogram4-{t}.gguf", gguf_entries(DIMS, t)) for t in TYPES}


@pytest.fixture(scope="module")
def loaded(gguf_files):
    """Each type loaded with float32 compute, and its float32 reference model."""
    out = {}
    for t, path in gguf_files.items():
        model = load_transformer(path, dtype=torch.float32)
        out[t] = (model, reference_model(path, model.config))
    return out


@pytest.mark.parametrize("qtype", TYPES)
def test_velocity_matches_dequantized_reference(loaded, qtype):
    model, ref = loaded[qtype]
    for unconditional in (False, True):
        inputs = velocity_inputs(model.config, seed=1, unconditional=unconditional)
        assert_close_velocity(velocity(model, inputs), velocity(ref, inputs), rel=2e-5)


@pytest.mark.parametrize("qtype", TYPES)
def test_runtime_decode_is_bit_exact_with_gguf_numpy(loaded, gguf_files, qtype):
    model, _ = loaded[qtype]
    ref = reference_state_dict(gguf_files[qtype])
    linears = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert len(linears) == 7 + 8 * DIMS.num_layers  # every nn.Linear, q/k/v split
    for name, module in linears.items():
        ours = module.dequantize(torch.float32)
        theirs = ref[name + ".weight"]
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), name
    # Norms and the embedding arrive unchanged in float32 compute.
    for name, p in model.named_parameters():
        assert torch.equal(p, ref[name]), name


@pytest.mark.parametrize("qtype", TYPES)
def test_stored_form_stays_quantized(loaded, gguf_files, qtype):
    model, _ = loaded[qtype]
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    # input_proj rows (128 weights) are too short for 256-weight blocks: Q8_0 there.
    expect = {QT[qtype], QT.Q8_0} if ggml_type(qtype).block_size > DIMS.in_channels else {QT[qtype]}
    seen = set()
    for m in model.modules():
        if isinstance(m, GGUFLinear):
            assert m.qweight.dtype == torch.uint8 and m.qweight.device.type == "cpu"
            seen.add(m.qtype)
    assert seen == expect
    # Only biases, norms and the embedding are float parameters.
    float_params = sum(p.numel() for p in model.parameters())
    assert float_params < 0.02 * sum(m.qweight.numel() for m in model.modules() if isinstance(m, GGUFLinear)) * 4


def assert_linears_run_off_cpu(model: torch.nn.Module) -> None:
    """Every quantized linear decodes and multiplies on the device its bytes are on.

    The meta device stands in for CUDA: an op mixing it with a CPU tensor (a constant
    built without `device=`) fails the same way it would on a GPU."""
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert linears
    for module in linears:
        module = module.to("meta")
        y = module(torch.empty(3, module.in_features, device="meta", dtype=torch.bfloat16))
        assert y.device.type == "meta" and y.shape == (3, module.out_features) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("qtype", TYPES)
def test_decoding_is_device_generic(gguf_files, qtype):
    assert_linears_run_off_cpu(load_transformer(gguf_files[qtype], dtype=torch.bfloat16))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q4_K", "Q6_K", "BF16", "Q2_K", "IQ4_XS"])
def test_resident_bytes_track_file_size(gguf_files, qtype):
    path = gguf_files[qtype]
    model = load_transformer(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ratio = resident_bytes(model) / path.stat().st_size
    assert 0.95 < ratio <= 1.0, ratio


@pytest.mark.parametrize("qtype", ["Q4_K", "BF16"])
def test_bf16_compute_matches_bf16_reference(gguf_files, qtype):
    path = gguf_files[qtype]
    model = load_transformer(path, dtype=torch.bfloat16)
    ref = reference_model(path, model.config).to(torch.bfloat16)
    # Rotary frequencies stay float32 in the runtime (positions start at 65536); the same for the reference.
    ref.rotary_emb.inv_freq = model.rotary_emb.inv_freq.clone()
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    inputs = velocity_inputs(model.config, seed=2, dtype=torch.bfloat16)
    got = velocity(model, inputs)
    assert got.dtype == torch.bfloat16
    assert_close_velocity(got, velocity(ref, inputs).float(), rel=2e-2)


def test_row_chunked_forward_matches_single_pass(loaded):
    model, _ = loaded["Q5_K"]
    inputs = velocity_inputs(model.config, seed=3)
    whole = velocity(model, inputs)
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    try:
        for m in linears:
            m.chunk_weights = 100 * m.in_features  # 100 rows per chunk, uneven last chunk
        chunked = velocity(model, inputs)
    finally:
        for m in linears:
            del m.chunk_weights
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_diffusers_names_and_prefix_load_the_same(tmp_path, gguf_files, loaded):
    path = write_gguf(tmp_path / "split.gguf", gguf_entries(DIMS, "Q8_0", layout="diffusers"), prefix="model.diffusion_model.")
    model = load_transformer(path, dtype=torch.float32)
    inputs = velocity_inputs(model.config, seed=4)
    torch.testing.assert_close(velocity(model, inputs), velocity(loaded["Q8_0"][0], inputs), rtol=0, atol=0)


def test_branch_from_metadata_file_name_and_folder(tmp_path):
    entries = gguf_entries(DIMS, "Q8_0")
    cond = write_gguf(tmp_path / "ideogram4-Q8_0.gguf", entries)
    uncond = write_gguf(tmp_path / "ideogram4-uncond-Q8_0.gguf", gguf_entries(DIMS, "Q8_0", seed=1), branch=None)
    assert load_transformer(cond).ideoquant_source["branch"] == "transformer"
    assert load_transformer(uncond).ideoquant_source["branch"] == "unconditional_transformer"
    assert load_transformer(tmp_path, branch="uncond").ideoquant_source["path"] == str(uncond)
    assert load_transformer(tmp_path).ideoquant_source["path"] == str(cond)
    with pytest.raises(IdeoquantError, match="holds the unconditional_transformer branch"):
        load_transformer(uncond, branch="transformer")


def _edited(tmp_path: Path, edit) -> Path:
    return write_gguf(tmp_path / "edited.gguf", edit(gguf_entries(DIMS, "Q8_0")))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: [x for x in e if x[0] != "layers.1.ffn_norm2.weight"], "missing tensor layers.1.ffn_norm2.weight"),
        (lambda e: [x for x in e if x[0] != "layers.0.attention.qkv.weight"], "missing tensor layers.0.attention.qkv.weight"),
        (
            lambda e: [(n, d[:-32] if n == "layers.1.feed_forward.w1.weight" else d, t) for n, d, t in e],
            r"layers.1.feed_forward.w1.weight has shape \[480, 256\], expected \[512, 256\]",
        ),
        (lambda e: [x for x in e if x[0] != "embed_image_indicator.weight"], "not an Ideogram 4 checkpoint"),
        (
            lambda e: [
                (n, np.zeros((256, 66), np.uint8), QT.IQ2_XXS) if n == "layers.0.attention.o.weight" else (n, d, t)
                for n, d, t in e
            ],
            "ggml type IQ2_XXS",
        ),
    ],
    ids=["missing-norm", "missing-qkv", "misshaped", "not-ideogram", "unknown-type"],
)
def test_bad_files_raise_one_line_errors(tmp_path, edit, message):
    path = _edited(tmp_path, edit)
    with pytest.raises(IdeoquantError, match=message) as info:
        load_transformer(path)
    assert "\n" not in str(info.value)


def test_garbage_and_missing_paths_raise(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(IdeoquantError, match="not a readable GGUF file"):
        load_transformer(junk)
    with pytest.raises(IdeoquantError, match="no such file"):
        load_transformer(tmp_path / "absent.gguf")
    with pytest.raises(IdeoquantError, match="branch must be"):
        load_transformer(junk, branch="left")


def test_converter_output_loads(tmp_path, tiny_fp8):
    """Files written by `ideoquant convert` load per branch from their folder."""
    from ideoquant.export.convert import convert
    from ideoquant.export.options import ConvertOptions

    out = tmp_path / "q8_0"
    convert(str(tiny_fp8), ConvertOptions(fmt="q8_0", out=out, quiet=True))
    for branch in ("transformer", "unconditional_transformer"):
        model = load_transformer(out, branch=branch, dtype=torch.float32)
        assert model.ideoquant_source["branch"] == branch
        assert {m.qtype.name for m in model.modules() if isinstance(m, GGUFLinear)} == {"Q8_0"}
        ref = reference_model(Path(model.ideoquant_source["path"]), model.config)
        inputs = velocity_inputs(model.config, seed=5, unconditional=branch != "transformer")
        assert_close_velocity(velocity(model, inputs), velocity(ref, inputs), rel=2e-5)
