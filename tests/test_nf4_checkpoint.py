"""`--format nf4` folders: bitsandbytes' own bytes and loader, diffusers' config, shards and index,
layouts, --all-linears, --double-quant, the runtime, the CLI and `verify`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from ideoquant import cli
from ideoquant.codecs.nf4 import dequantize_nf4, parse_nf4_serialized, quantize_nf4
from ideoquant.errors import IdeoquantError
from ideoquant.export import nf4_branch as nf4_checkpoint
from ideoquant.export.convert import convert
from ideoquant.export.error_meter import relative_error
from ideoquant.export.nf4_branch import (
    AbsmaxMean,
    BlockStream,
    NF4Encoder,
    quantization_config,
    write_nf4_branch,
)
from ideoquant.export.options import ConvertOptions, Progress
from ideoquant.io.source import open_source
from ideoquant.io.staging import OutputSet
from ideoquant.model.inventory import (
    expected_tensors,
    to_canonical_name,
    to_layout_names,
)
from ideoquant.model.sequence import velocity_inputs
from ideoquant.recipes.linears import one_row_linears
from ideoquant.runtime.nf4_loader import NF4Linear
from ideoquant.runtime.pipeline import load_transformer

from .test_runtime_gguf import assert_close_velocity, velocity

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

STATE = ".quant_state.bitsandbytes__nf4"
# NF4 of the synthetic (heavy-tailed) weights: ~0.07-0.10 measured; gaussian weights give 0.092.
NF4_ERROR_BOUND = 0.12
# Small enough that the tiny model's branch spans several shards.
SHARD_BYTES = 256 * 1024

# name: (branch selection, options)
CASES = {
    "diffusers": ("both", dict(max_shard_bytes=SHARD_BYTES)),
    "fused-double": ("cond", dict(layout="fused", double_quant=True)),
    "all-double": ("cond", dict(all_linears=True, double_quant=True)),
}




@pytest.fixture(scope="module")
def outputs(tiny_fp8, tmp_path_factory) -> dict[str, tuple[Path, list]]:
    root = tmp_path_factory.mktemp("nf4out")
    done = {}
    for case, (branches, extra) in CASES.items():
        out = root / case
        results = convert(str(tiny_fp8), ConvertOptions(fmt="nf4", out=out, branches=branches, quiet=True, **extra))
        done[case] = (out, results)
    return done


@pytest.fixture(scope="module")
def source(tiny_fp8):
    return open_source(tiny_fp8)


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a branch folder, across its shards."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                assert key not in tensors, key
                tensors[key] = f.get_tensor(key)
    return tensors


def companions(tensors: dict[str, torch.Tensor], weight: str) -> dict[str, torch.Tensor]:
    """The quant-state tensors bitsandbytes stores next to a packed weight, prefix stripped."""
    return {k[len(weight) + 1 :]: v for k, v in tensors.items() if k.startswith(weight + ".")}


def source_weight(bs, name: str) -> torch.Tensor:
    """The float32 source of a stored weight name (a q/k/v name is its rows of qkv)."""
    canonical, part = to_canonical_name(name)
    w = bs.read_float32(canonical)
    if part is None:
        return w
    rows = w.shape[0] // 3
    return w[part * rows : (part + 1) * rows]


def quantized_weights(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(STATE)] for k in tensors if k.endswith(STATE))


# --- bitsandbytes is the reference --------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_every_4bit_weight_is_bitsandbytes_own(outputs, source, case):
    out, _ = outputs[case]
    double = CASES[case][1].get("double_quant", False)
    bs = source.branches["transformer"]
    tensors = stored_tensors(out / "transformer")
    weights = quantized_weights(tensors)
    assert weights
    for name in weights:
        w = source_weight(bs, name)
        param = bnb.nn.Params4bit.from_prequantized(tensors[name], companions(tensors, name), device="cpu")
        assert param.quant_state.nested == double and param.quant_state.shape == w.shape
        assert param.quant_state.dtype == torch.bfloat16
        param.quant_state.dtype = torch.float32
        decoded = F.dequantize_4bit(param.data, param.quant_state)
        assert decoded.shape == w.shape
        assert 0 < relative_error(decoded, w) < NF4_ERROR_BOUND, name

        ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double)
        assert torch.equal(tensors[name], ref_packed), name
        if double:
            assert torch.equal(tensors[name + ".absmax"], ref_state.absmax)
            assert torch.equal(tensors[name + ".nested_absmax"], ref_state.state2.absmax)
            assert float(ref_state.offset) == json.loads(bytes(tensors[name + STATE].tolist()))["nested_offset"]
        else:
            assert torch.equal(tensors[name + ".absmax"].view(torch.int32), ref_state.absmax.view(torch.int32))
        # The state dict bitsandbytes itself writes for this weight, key for key, when it quantizes a bf16 model.
        ref_state.dtype = torch.bfloat16
        ref_sd = ref_state.as_dict(packed=True)
        assert set(companions(tensors, name)) == set(ref_sd), name
        assert bytes(tensors[name + STATE].tolist()) == bytes(ref_sd["quant_state.bitsandbytes__nf4"].tolist())


def test_split_qkv_has_the_bytes_of_the_fused_rows(outputs, source):
    split = stored_tensors(outputs["diffusers"][0] / "transformer")
    fused = stored_tensors(outputs["fused-double"][0] / "transformer")
    bs = source.branches["transformer"]
    for i in range(bs.dims.num_layers):
        qkv = f"layers.{i}.attention.qkv.weight"
        parts = to_layout_names(qkv, "diffusers")
        packed, absmax = quantize_nf4(bs.read_float32(qkv))
        # Packed codes do not depend on double quantization; the float absmax of the fused weight is the parts' in turn.
        assert torch.equal(torch.cat([split[p] for p in parts]), fused[qkv]) and torch.equal(fused[qkv], packed)
        assert torch.equal(torch.cat([split[p + ".absmax"] for p in parts]), absmax)


def test_source_layout_does_not_change_the_output(outputs, tiny_fp8_diffusers, tmp_path):
    out = tmp_path / "from-diffusers"
    convert(str(tiny_fp8_diffusers), ConvertOptions(fmt="nf4", out=out, branches="cond", quiet=True))
    ours = stored_tensors(out / "transformer")
    ref = stored_tensors(outputs["diffusers"][0] / "transformer")
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k].view(torch.uint8), ref[k].view(torch.uint8)) for k in ref)


# --- folder structure ---------------------------------------------------------------------

def test_shards_and_index_list_every_key(outputs):
    out, results = outputs["diffusers"]
    for branch in ("transformer", "unconditional_transformer"):
        folder = out / branch
        shards = sorted(folder.glob("*.safetensors"))
        assert len(shards) > 1
        index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
        held = {}
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                held.update({k: shard.name for k in f.keys()})
                assert f.metadata()["ideoquant.format"] == "nf4"
        assert index["weight_map"] == held
        # diffusers loads shard by shard: a packed weight and its quant state must share a shard.
        for key, shard in held.items():
            if key.endswith(STATE):
                weight = key[: -len(STATE)]
                assert {held[k] for k in held if k == weight or k.startswith(weight + ".")} == {shard}, weight
        assert index["metadata"]["total_size"] == sum(s.stat().st_size for s in shards) - sum(_header_len(s) for s in shards)
    result = next(r for r in results if r.branch == "transformer")
    assert {p.name for p in result.files} == {p.name for p in (out / "transformer").iterdir()}


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("case", list(CASES))
def test_config_is_diffusers_bitsandbytes_config(outputs, source, case):
    from diffusers import BitsAndBytesConfig

    out, _ = outputs[case]
    options = CASES[case][1]
    bs = source.branches["transformer"]
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert {k: v for k, v in config.items() if k in bs.dims.to_config()} == bs.dims.to_config()
    qc = config["quantization_config"]
    parsed = BitsAndBytesConfig.from_dict(qc)
    assert parsed.load_in_4bit and parsed.bnb_4bit_quant_type == "nf4" and parsed.quant_method == "bitsandbytes"
    assert parsed.bnb_4bit_use_double_quant == options.get("double_quant", False)
    assert parsed.bnb_4bit_compute_dtype == torch.bfloat16 and parsed.bnb_4bit_quant_storage == torch.uint8
    # Exactly what diffusers itself writes, key for key.
    assert qc == parsed.to_dict()
    assert list(qc) == list(parsed.to_dict())
    layout = options.get("layout", "diffusers")
    expected_skip = [] if options.get("all_linears") else [m for m in one_row_linears(bs.dims)]
    assert qc["llm_int8_skip_modules"] == [n for m in expected_skip for n in (x[:-7] for x in to_layout_names(m + ".weight", layout))]
    tensors = stored_tensors(out / "transformer")
    for module in qc["llm_int8_skip_modules"]:
        assert tensors[module + ".weight"].dtype == torch.bfloat16 and module + ".weight" + STATE not in tensors


def test_quantization_config_matches_diffusers_for_every_setting():
    from diffusers import BitsAndBytesConfig

    for double, dtype, skip in [(False, "bfloat16", ["a", "b.c"]), (True, "float16", [])]:
        ref = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double,
            bnb_4bit_compute_dtype=getattr(torch, dtype), bnb_4bit_quant_storage="uint8", llm_int8_skip_modules=skip,
        ).to_dict()
        assert quantization_config(skip, double, dtype) == ref


def test_layouts_name_attention_as_requested(outputs):
    split = stored_tensors(outputs["diffusers"][0] / "transformer")
    fused = stored_tensors(outputs["fused-double"][0] / "transformer")
    assert "layers.1.attention.to_k.weight" in split and "layers.1.attention.to_out.0.weight" in split
    assert not any(".attention.qkv." in k or ".attention.o." in k for k in split)
    assert "layers.1.attention.qkv.weight" in fused and "layers.1.attention.o.weight" in fused
    assert not any(".attention.to_" in k for k in fused)


def test_default_keeps_one_row_linears_and_all_linears_quantizes_them(outputs, source):
    dims = source.branches["transformer"].dims
    linears = [s for s in expected_tensors(dims) if s.kind == "linear"]
    one_row = set(one_row_linears(dims))
    default = quantized_weights(stored_tensors(outputs["diffusers"][0] / "transformer"))
    every = quantized_weights(stored_tensors(outputs["all-double"][0] / "transformer"))
    # 7 top-level linears + 8 per block in diffusers names (qkv is three).
    assert len(every) == 7 + 8 * dims.num_layers
    assert len(default) == len(every) - len(one_row)
    assert {to_canonical_name(n)[0][:-7] for n in every} == {s.module for s in linears}
    assert not {to_canonical_name(n)[0][:-7] for n in default} & one_row


def test_double_quant_state(outputs):
    tensors = stored_tensors(outputs["fused-double"][0] / "transformer")
    for name in quantized_weights(tensors):
        state = json.loads(bytes(tensors[name + STATE].tolist()))
        assert state["nested_blocksize"] == 256 and state["nested_dtype"] == "float32" and state["dtype"] == "bfloat16"
        assert tensors[name + ".absmax"].dtype == torch.uint8 and tensors[name + ".nested_quant_map"].shape == (256,)
    plain = stored_tensors(outputs["diffusers"][0] / "transformer")
    assert not any(k.endswith(".nested_absmax") for k in plain)


def test_unquantized_tensors_are_bf16_casts_of_the_source(outputs, source):
    bs = source.branches["transformer"]
    tensors = stored_tensors(outputs["diffusers"][0] / "transformer")
    for spec in expected_tensors(bs.dims):
        names = to_layout_names(spec.name, "diffusers")
        if names[0] + STATE in tensors:
            continue
        assert torch.equal(tensors[names[0]], bs.read_float32(spec.name).to(torch.bfloat16)), spec.name


# --- report -------------------------------------------------------------------------------

def test_report_gives_types_sizes_errors_and_recipe(outputs, source):
    out, results = outputs["diffusers"]
    result = next(r for r in results if r.branch == "transformer")
    bs = source.branches["transformer"]
    tensors = stored_tensors(out / "transformer")
    reports = {t.name: t for t in result.tensors}
    assert set(reports) == {n for s in expected_tensors(bs.dims) for n in to_layout_names(s.name, "diffusers")}
    for name in quantized_weights(tensors):
        t = reports[name]
        stored = [tensors[name], *companions(tensors, name).values()]
        assert t.out_type == "NF4" and t.nbytes == sum(v.numel() * v.element_size() for v in stored)
        nf4 = parse_nf4_serialized(tensors, name[:-7])
        decoded = dequantize_nf4(nf4.packed, nf4.absmax, nf4.shape)
        assert t.rel_error == pytest.approx(relative_error(decoded, source_weight(bs, name)), rel=1e-4)
    bf16 = [t for t in result.tensors if t.out_type == "BF16"]
    assert bf16 and all(t.rel_error is None or t.rel_error < 5e-3 for t in bf16)
    assert sum(t.nbytes for t in result.tensors) == sum(v.numel() * v.element_size() for v in tensors.values())
    recipe = result.recipe
    assert recipe["kept"] == one_row_linears(bs.dims)  # no attention among them: the same names in both layouts
    assert recipe["double_quant"] is False and recipe["blocksize"] == 64 and recipe["compute_dtype"] == "bfloat16"
    assert recipe["all_linears"] is False and recipe["quantized"] == len(quantized_weights(tensors))


# --- loading --------------------------------------------------------------------------------

def dequantized_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Diffusers-named float32 weights of a folder, 4-bit ones decoded by bitsandbytes."""
    tensors = stored_tensors(folder)
    sd = {}
    for name in quantized_weights(tensors):
        param = bnb.nn.Params4bit.from_prequantized(tensors[name], companions(tensors, name), device="cpu")
        param.quant_state.dtype = torch.float32  # decode in float32, as the runtime does, not in the compute dtype
        sd[name] = F.dequantize_4bit(param.data, param.quant_state)
    for key, value in tensors.items():
        if key not in sd and key.rsplit(".", 1)[-1] in ("weight", "bias") and value.is_floating_point():
            sd[key] = value.to(torch.float32)
    out = {}
    for key, value in sd.items():
        names = to_layout_names(key, "diffusers")
        rows = value.shape[0] // len(names)
        out.update({n: value[i * rows : (i + 1) * rows] for i, n in enumerate(names)})
    return out


@pytest.mark.parametrize("case", ["diffusers", "fused-double"])
def test_runtime_velocity_matches_float32_model_of_dequantized_weights(outputs, case):
    from diffusers import Ideogram4Transformer2DModel

    out, _ = outputs[case]
    model = load_transformer(out, dtype=torch.float32)
    assert any(isinstance(m, NF4Linear) for m in model.modules())
    ref = Ideogram4Transformer2DModel(**{k: v for k, v in dict(model.config).items() if not k.startswith("_")})
    ref.load_state_dict(dequantized_state_dict(out / "transformer"), strict=True)
    inputs = velocity_inputs(model.config, seed=3)
    assert_close_velocity(velocity(model, inputs), velocity(ref.eval(), inputs), rel=2e-5)


# --- CLI and verify ---------------------------------------------------------------------------

def test_cli_convert_then_verify(tiny_fp8, tmp_path):
    out = tmp_path / "cli"
    runner = CliRunner()
    result = runner.invoke(cli.main, ["convert", str(tiny_fp8), "--format", "nf4", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "transformer" / "config.json").is_file() and (out / "unconditional_transformer" / "config.json").is_file()
    result = runner.invoke(cli.main, ["verify", str(out), "--source", str(tiny_fp8)])
    assert result.exit_code == 0, result.output
    assert "tensors match the source" in result.output
    verified = json.loads((out / "quantization_report.json").read_text())["verified"]["branches"]
    assert all(v["tensors_compared"] > 0 and v["max_deviation_from_report"] <= 1e-6 for v in verified.values())


@pytest.mark.parametrize("case", ["fused-double", "all-double"])
def test_fused_and_double_quant_folders_verify_against_the_source(outputs, tiny_fp8, case):
    from ideoquant.export.verify import verify_folder

    section = verify_folder(outputs[case][0], str(tiny_fp8))
    stats = section["branches"]["transformer"]
    assert stats["tensors_compared"] > 0 and stats["max_deviation_from_report"] <= 1e-6 and stats["max"] < NF4_ERROR_BOUND


def test_bad_options_are_one_line_errors(source, tmp_path):
    bs = source.branches["transformer"]
    for options, message in [
        (dict(layout="split"), "--layout must be one of"),
        (dict(compute_dtype="int4"), "compute dtype must be one of"),
    ]:
        opts = ConvertOptions(fmt="nf4", out=tmp_path, quiet=True, **options)
        with pytest.raises(IdeoquantError, match=message) as info:
            write_nf4_branch(bs, source, opts, OutputSet(), Progress("x", 0, True))
        assert "\n" not in str(info.value)


def test_block_stream_regroups_any_piece_sizes():
    class Collect(BlockStream):
        def __init__(self):
            super().__init__(64)
            self.segments = []

        def consume(self, segment):
            self.segments.append(segment.clone())

    values = torch.arange(1000, dtype=torch.float32)
    stream = Collect()
    for lo, hi in [(0, 10), (10, 11), (11, 200), (200, 200), (200, 777), (777, 1000)]:
        stream.push(values[lo:hi])
    stream.close()
    assert all(s.numel() % 64 == 0 for s in stream.segments[:-1]) and stream.segments[-1].numel() == 1000 % 64
    assert torch.equal(torch.cat(stream.segments), values)


@pytest.mark.parametrize("double", [False, True])
def test_encoder_fed_in_odd_pieces_gives_bitsandbytes_bytes(double):
    # 39000 weights: rows straddle 64-blocks, the last block is partial, and there are several 256-block groups.
    w = torch.randn(300, 130, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.1, 3, 300)[:, None]
    flat = w.reshape(-1)
    cuts = [0, 7, 100, 16384, 16390, 30000, 38999, 39000]
    offset = None
    if double:
        mean = AbsmaxMean(flat.numel())
        for lo, hi in zip(cuts, cuts[1:]):
            mean.push(flat[lo:hi])
        mean.close()
        offset = mean.mean()
    enc = NF4Encoder(flat.numel(), offset)
    for lo, hi in zip(cuts, cuts[1:]):
        enc.push(flat[lo:hi])
    nested = enc.finish("w")
    ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double)
    assert torch.equal(enc.packed, ref_packed.view(-1))
    if double:
        assert nested.offset == float(ref_state.offset)
        assert torch.equal(nested.codes, ref_state.absmax) and torch.equal(nested.nested_absmax, ref_state.state2.absmax)
    else:
        assert nested is None and torch.equal(enc.absmax.view(torch.int32), ref_state.absmax.view(torch.int32))
    ref_state.dtype = torch.float32
    assert enc.meter.relative() == pytest.approx(relative_error(F.dequantize_4bit(ref_packed, ref_state), w), rel=1e-5)


def test_small_source_chunks_change_nothing(outputs, tiny_fp8, tmp_path, monkeypatch):
    # Reads of 3 rows: pieces straddle the q/k/v boundaries and the 16384-weight double-quant groups.
    monkeypatch.setattr(nf4_checkpoint, "CHUNK_WEIGHTS", 1000)
    out = tmp_path / "small-chunks"
    convert(str(tiny_fp8), ConvertOptions(fmt="nf4", out=out, branches="cond", quiet=True, all_linears=True, double_quant=True))
    ours = stored_tensors(out / "transformer")
    ref = stored_tensors(outputs["all-double"][0] / "transformer")
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k].view(torch.uint8), ref[k].view(torch.uint8)) for k in ref)
