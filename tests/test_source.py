"""The source reader: layouts, dtypes, shards, prefixes, validation, and the synthetic checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ideoquant.errors import IdeoquantError
from ideoquant.io.source import open_source
from ideoquant.io.synthetic import write_synthetic_pipeline
from ideoquant.model.inventory import (
    ModelDims,
    expected_tensors,
    linear_specs,
    to_layout_names,
)


def test_real_inventory_counts():
    specs = expected_tensors(ModelDims())
    assert len(specs) == 458
    assert len(linear_specs(ModelDims())) == 211
    linear_params = sum(s.numel for s in specs)
    assert linear_params == 9_279_288_448


def test_synthetic_branch_loads_into_diffusers_without_missing_keys(tiny_fp8_diffusers):
    from diffusers import Ideogram4Transformer2DModel

    bs = open_source(tiny_fp8_diffusers).branches["transformer"]
    model = Ideogram4Transformer2DModel.from_config(json.loads((tiny_fp8_diffusers / "transformer" / "config.json").read_text()))
    stored = load_file(tiny_fp8_diffusers / "transformer" / "diffusion_pytorch_model.safetensors")
    weight_keys = {k for k in stored if not k.endswith(".weight_scale")}
    assert weight_keys == set(model.state_dict())
    # Dequantized, the tensors load strictly (no missing, no unexpected keys).
    state = {}
    for name in bs.specs:
        value = bs.read_float32(name)
        parts = to_layout_names(name, "diffusers")
        for i, part in enumerate(parts):
            state[part] = value.chunk(len(parts))[i]
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_synthetic_is_deterministic_and_seeded(tmp_path):
    write_synthetic_pipeline(tmp_path / "a", seed=3)
    write_synthetic_pipeline(tmp_path / "b", seed=3)
    write_synthetic_pipeline(tmp_path / "c", seed=4)
    f = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
    # The two branches are separate-weight copies.
    a = open_source(tmp_path / "a")
    w = "layers.0.feed_forward.w1.weight"
    assert not torch.equal(a.branches["transformer"].read_float32(w), a.branches["unconditional_transformer"].read_float32(w))


def test_synthetic_weights_look_trained(tiny_fp8):
    bs = open_source(tiny_fp8).branches["transformer"]
    w = bs.read_float32("layers.0.feed_forward.w1.weight")
    row_absmax = w.abs().amax(dim=1)
    assert row_absmax.max() / row_absmax.min() > 3  # uneven row scales
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2
    assert kurtosis > 4  # heavier tails than a gaussian (3)
    norm = bs.read_float32("layers.0.attention_norm1.weight")
    assert norm.abs().max() > 5 * norm.abs().median()  # outlier channels feeding qkv


def test_fused_and_diffusers_layouts_read_identically(tiny_fp8, tiny_fp8_diffusers):
    a = open_source(tiny_fp8).branches["transformer"]
    b = open_source(tiny_fp8_diffusers).branches["transformer"]
    assert (a.layout, b.layout) == ("fused", "diffusers")
    for name in a.specs:
        assert torch.equal(a.read_float32(name), b.read_float32(name)), name


def test_fp8_dequantized_exactly_with_every_scale_shape(edit_source):
    name = "layers.0.attention.o.weight"
    original = {}

    def variants(t):
        original.update(t)
        return t

    src = edit_source(variants)
    w8, scale = original[name], original[name[:-7] + ".weight_scale"]
    expected = w8.float() * scale[:, None]
    assert torch.equal(open_source(src).branches["transformer"].read_float32(name), expected)
    for new_scale, want in [
        (scale[:, None].clone(), expected),
        (torch.tensor(0.5), w8.float() * 0.5),
        (torch.tensor([0.25]), w8.float() * 0.25),
    ]:
        def put(t, s=new_scale):
            t[name[:-7] + ".weight_scale"] = s
            return t

        src = edit_source(put)
        assert torch.equal(open_source(src).branches["transformer"].read_float32(name), want)


def test_bf16_source(tmp_path):
    write_synthetic_pipeline(tmp_path / "bf16", dtype="bf16")
    bs = open_source(tmp_path / "bf16").branches["transformer"]
    assert bs.source_dtype == "bfloat16"
    assert bs.read_float32("layers.0.attention.qkv.weight").dtype == torch.float32


def test_branch_selection(tiny_fp8):
    assert list(open_source(tiny_fp8, "cond").branches) == ["transformer"]
    assert list(open_source(tiny_fp8, "uncond").branches) == ["unconditional_transformer"]
    assert list(open_source(tiny_fp8).branches) == ["transformer", "unconditional_transformer"]
    # A lone branch folder or file works too.
    assert list(open_source(tiny_fp8 / "unconditional_transformer").branches) == ["unconditional_transformer"]


def test_single_file_with_prefix(tmp_path, tiny_fp8):
    tensors = load_file(tiny_fp8 / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file({"model.diffusion_model." + k: v for k, v in tensors.items()}, tmp_path / "ideogram4.safetensors")
    bs = open_source(tmp_path / "ideogram4.safetensors").branches["transformer"]
    ref = open_source(tiny_fp8).branches["transformer"]
    assert torch.equal(bs.read_float32("layers.1.feed_forward.w2.weight"), ref.read_float32("layers.1.feed_forward.w2.weight"))


def _shard(folder, tensors, n=3):
    names = sorted(tensors)
    weight_map = {}
    for i in range(n):
        part = {k: tensors[k] for k in names[i::n]}
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(part, folder / fname)
        weight_map.update({k: fname for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_and_stale_index(tmp_path, tiny_fp8):
    tensors = load_file(tiny_fp8 / "transformer" / "diffusion_pytorch_model.safetensors")
    ref = open_source(tiny_fp8).branches["transformer"]
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    _shard(sharded, tensors)
    bs = open_source(sharded).branches["transformer"]
    assert len(bs.files) == 3
    assert torch.equal(bs.read_float32("llm_cond_proj.weight"), ref.read_float32("llm_cond_proj.weight"))
    # A stale index naming missing shards is ignored when the single file is complete.
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copy(tiny_fp8 / "transformer" / "diffusion_pytorch_model.safetensors", stale)
    (stale / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "diffusion_pytorch_model-00001-of-00002.safetensors"}})
    )
    assert len(open_source(stale).branches["transformer"].files) == 1
    # ... but not when the shards are really missing.
    (sharded / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(IdeoquantError, match="00002-of-00003.*missing"):
        open_source(sharded)


def test_config_mismatch_is_an_error(tmp_path, tiny_fp8):
    dst = tmp_path / "cfg"
    shutil.copytree(tiny_fp8, dst)
    cfg_path = dst / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 1024
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(IdeoquantError, match="intermediate_size=1024 but tensors say 768"):
        open_source(dst)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: {k: v for k, v in t.items() if k != "layers.1.ffn_norm2.weight"}, "missing tensor layers.1.ffn_norm2.weight"),
        (lambda t: {**t, "layers.0.attention.o.weight": t["layers.0.attention.o.weight"][:, :128].contiguous()},
         r"layers.0.attention.o.weight has shape \[256, 128\], expected \[256, 256\]"),
        (lambda t: {k: v for k, v in t.items() if k != "layers.0.feed_forward.w2.weight_scale"},
         "FP8 weight layers.0.feed_forward.w2.weight has no layers.0.feed_forward.w2.weight_scale"),
        (lambda t: {**t, "layers.0.feed_forward.w2.weight_scale": torch.ones(7)}, "weight_scale has shape"),
    ],
)
def test_inventory_errors(edit_source, edit, message):
    with pytest.raises(IdeoquantError, match=message):
        open_source(edit_source(edit))


def test_unknown_extra_tensor_is_a_warning(edit_source):
    src = edit_source(lambda t: {**t, "some.extra.tensor": torch.zeros(3)})
    bs = open_source(src).branches["transformer"]
    assert any("some.extra.tensor" in w for w in bs.warnings)


def test_nan_weight_names_the_tensor(edit_source):
    def poison(t):
        w = t["layers.1.attention.qkv.weight"].float()
        w[3, 4] = float("nan")
        t["layers.1.attention.qkv.weight"] = w.to(torch.float8_e4m3fn)
        return t

    bs = open_source(edit_source(poison)).branches["transformer"]
    with pytest.raises(IdeoquantError, match="layers.1.attention.qkv.weight has 1 NaN/Inf"):
        bs.read_float32("layers.1.attention.qkv.weight")


def test_truncated_and_foreign_files(tmp_path, tiny_fp8):
    f = tmp_path / "t.safetensors"
    data = (tiny_fp8 / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(IdeoquantError, match="truncated"):
        open_source(f)
    g = tmp_path / "g.safetensors"
    g.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(IdeoquantError, match="not a safetensors file"):
        open_source(g)
    with pytest.raises(IdeoquantError, match="no such file or folder"):
        open_source(tmp_path / "nope")


def test_peak_memory_is_one_tensor_at_a_time(tiny_fp8):
    """Reading copies one tensor out and keeps no mapping: the source file is not held."""
    import gc

    bs = open_source(tiny_fp8).branches["transformer"]
    for name in bs.specs:
        bs.read_float32(name)
    gc.collect()
    import os

    maps = open(f"/proc/{os.getpid()}/maps").read() if os.path.exists("/proc/self/maps") else ""
    assert "diffusion_pytorch_model.safetensors" not in maps
