"""`load_pipeline`: quantized transformers plus the other components of a base pipeline folder,
end to end on a tiny locally built pipeline (no downloads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ideoquant.calibrate.run import calibrate
from ideoquant.calibrate.source_model import load_source_transformer
from ideoquant.errors import IdeoquantError
from ideoquant.export.convert import convert
from ideoquant.export.options import ConvertOptions
from ideoquant.io.source import open_source
from ideoquant.io.synthetic import write_synthetic_pipeline
from ideoquant.model.inventory import ModelDims
from ideoquant.runtime.gguf_loader import GGUFLinear
from ideoquant.runtime.int8_loader import Int8Linear
from ideoquant.runtime.nf4_loader import NF4Linear
from ideoquant.runtime.pipeline import branch_paths, load_pipeline, load_transformer

from .test_runtime_gguf import gguf_entries, reference_model, write_gguf
from .test_runtime_nf4 import write_nf4_branch

TEXT_WIDTH = 16
# in_channels = 4 VAE latent channels x 2 x 2 patch; text features = 13 tapped layers x width.
DIMS = ModelDims(in_channels=16, hidden=64, head_dim=32, intermediate=128, adaln_dim=32, llm_features=13 * TEXT_WIDTH, num_layers=2)
CALL = dict(
    prompt="a red cube",
    height=32,
    width=32,
    num_inference_steps=2,
    guidance_scale=3.0,
    guidance_schedule=None,
    max_sequence_length=24,
)


def tiny_base_pipeline(folder: Path) -> Path:
    """Text encoder (Qwen3-VL, 36 layers of width 16), tokenizer with a chat template, VAE and
    scheduler saved as a pipeline folder; its transformer folders are removed afterwards."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Ideogram4Pipeline,
    )
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLModel

    from ideoquant.model.build import build_meta_transformer

    torch.manual_seed(0)
    text = dict(
        vocab_size=64,
        hidden_size=TEXT_WIDTH,
        intermediate_size=32,
        num_hidden_layers=36,  # the pipeline taps layers 0, 3, ..., 33, 35
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_WIDTH, deepstack_visual_indexes=[])
    text_encoder = Qwen3VLModel(Qwen3VLConfig(text_config=text, vision_config=vision)).eval()
    chars = list("abcdefghijklmnopqrstuvwxyz<>|_ :{}\"',.\n")
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(["<unk>", "<pad>", *chars])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}<|a|>{% endif %}"
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,
    )
    placeholder = build_meta_transformer(DIMS).to_empty(device="cpu")
    pipe = Ideogram4Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=placeholder,
        unconditional_transformer=placeholder,
    )
    pipe.save_pretrained(folder)
    for branch in ("transformer", "unconditional_transformer"):
        shutil.rmtree(folder / branch)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_base_pipeline(tmp_path_factory.mktemp("base") / "pipeline")


@pytest.fixture(scope="module")
def gguf_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf_out")
    write_gguf(out / "ideogram4-Q8_0.gguf", gguf_entries(DIMS, "Q8_0", seed=0), branch="transformer")
    write_gguf(out / "ideogram4-uncond-Q8_0.gguf", gguf_entries(DIMS, "Q8_0", seed=1), branch="unconditional_transformer")
    return out


def test_gguf_pipeline_makes_an_image(base, gguf_out):
    pipe = load_pipeline(gguf_out, base=base, dtype=torch.float32)
    for name in ("transformer", "unconditional_transformer"):
        model = getattr(pipe, name)
        assert model.ideoquant_source["branch"] == name
        assert any(isinstance(m, GGUFLinear) for m in model.modules())
    image = pipe(**CALL, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_pipeline_latents_match_dequantized_reference_transformers(base, gguf_out):
    """The same denoising run with float32 diffusers transformers built from the files' values."""
    from diffusers import Ideogram4Pipeline

    pipe = load_pipeline(gguf_out, base=base, dtype=torch.float32)
    ref = Ideogram4Pipeline.from_pretrained(
        base,
        transformer=reference_model(gguf_out / "ideogram4-Q8_0.gguf", pipe.transformer.config),
        unconditional_transformer=reference_model(gguf_out / "ideogram4-uncond-Q8_0.gguf", pipe.transformer.config),
    )
    got = pipe(**CALL, output_type="latent", generator=torch.Generator().manual_seed(1)).images
    want = ref(**CALL, output_type="latent", generator=torch.Generator().manual_seed(1)).images
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mixed_formats_by_branch_and_bf16(base, gguf_out, tmp_path):
    nf4_root = tmp_path / "nf4"
    write_nf4_branch(nf4_root / "unconditional_transformer", DIMS, seed=1)
    paths = {"cond": gguf_out / "ideogram4-Q8_0.gguf", "unconditional_transformer": nf4_root}
    pipe = load_pipeline(paths, base=base, dtype=torch.bfloat16)
    assert pipe.transformer.dtype == pipe.unconditional_transformer.dtype == torch.bfloat16
    assert any(isinstance(m, NF4Linear) for m in pipe.unconditional_transformer.modules())
    latents = pipe(**{**CALL, "num_inference_steps": 1}, output_type="latent", generator=torch.Generator().manual_seed(2)).images
    assert latents.shape == (1, 64, DIMS.in_channels) and torch.isfinite(latents).all()


def test_branch_paths_forms(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert branch_paths([a, b]) == {"transformer": (a, "transformer"), "unconditional_transformer": (b, "unconditional_transformer")}
    assert branch_paths(tmp_path)["unconditional_transformer"] == (tmp_path, "unconditional_transformer")
    with pytest.raises(IdeoquantError, match="expected two paths"):
        branch_paths([a])
    with pytest.raises(IdeoquantError, match="no path given for the unconditional_transformer branch"):
        branch_paths({"transformer": a})


def test_bad_base_raises(gguf_out, tmp_path):
    with pytest.raises(IdeoquantError, match="cannot load the base pipeline"):
        load_pipeline(gguf_out, base=tmp_path / "no-such-pipeline", dtype=torch.float32)


# Relative distance of the INT8 pipeline's latents to the bf16 source pipeline's (two denoising
# steps from the same noise, the default recipe), measured 0.0044, and 0.0044 of what the
# transformers moved the latents by; the bf16 pipeline from another noise lies 1.27 away.
INT8_LATENT_BOUND = 0.02
INT8_MOVE_BOUND = 0.02


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """An FP8 source of the tiny pipeline's dims, calibrated, converted to INT8 with the defaults."""
    root = tmp_path_factory.mktemp("int8_pipeline")
    write_synthetic_pipeline(root / "source", dims=DIMS, seed=5)
    calibrate(root / "source", root / "stats.safetensors", synthetic=True, steps=2, resolution=64,
              synthetic_inputs=2, text_tokens=8, max_samples=64, quiet=True)
    convert(str(root / "source"), ConvertOptions(fmt="int8", out=root / "int8", calibration=root / "stats.safetensors", quiet=True))
    return root


def test_int8_pipeline_latents_match_the_bf16_pipeline(base, int8_run):
    """No mocks: the INT8 folder through load_pipeline against the source transformers in bf16."""
    from diffusers import Ideogram4Pipeline

    pipe = load_pipeline(int8_run / "int8", base=base, dtype=torch.bfloat16)
    source = open_source(int8_run / "source")
    for name in ("transformer", "unconditional_transformer"):
        linears = [m for m in getattr(pipe, name).modules() if isinstance(m, Int8Linear)]
        assert linears and all(m.weight.dtype == torch.int8 for m in linears)
    ref = Ideogram4Pipeline.from_pretrained(
        base,
        transformer=load_source_transformer(source.branches["transformer"], dtype=torch.bfloat16, keep_fp8=False),
        unconditional_transformer=load_source_transformer(source.branches["unconditional_transformer"], dtype=torch.bfloat16, keep_fp8=False),
        torch_dtype=torch.bfloat16,
    )
    noise = torch.randn((1, 64, DIMS.in_channels), generator=torch.Generator().manual_seed(1))

    def latents(p, start):
        return p(**CALL, latents=start.clone(), output_type="latent").images.float()

    got, want = latents(pipe, noise), latents(ref, noise)
    other = latents(ref, torch.randn(noise.shape, generator=torch.Generator().manual_seed(2)))
    assert got.shape == want.shape == noise.shape and torch.isfinite(got).all()
    error = float((got - want).norm() / want.norm())
    assert error < INT8_LATENT_BOUND < float((other - want).norm() / want.norm()), error
    # What the transformers moved the latents by, not only the shared starting noise.
    moved = float((got - want).norm() / (want - noise).norm())
    assert moved < INT8_MOVE_BOUND, moved


def test_int8_folders_go_to_the_int8_loader(tmp_path, monkeypatch):
    import ideoquant.runtime.int8_loader as int8

    calls = []
    monkeypatch.setattr(int8, "load_int8_transformer", lambda folder, device, dtype: calls.append((folder, device, dtype)) or "model")
    for branch in ("transformer", "unconditional_transformer"):
        (tmp_path / branch).mkdir()
        config = {**DIMS.to_config(), "quantization_config": {"quant_method": "compressed-tensors", "format": "int-quantized"}}
        (tmp_path / branch / "config.json").write_text(json.dumps(config))
    assert load_transformer(tmp_path, branch="uncond", device="cpu", dtype=torch.float16) == "model"
    assert load_transformer(tmp_path / "transformer") == "model"
    assert calls == [(tmp_path / "unconditional_transformer", "cpu", torch.float16), (tmp_path / "transformer", "cpu", torch.bfloat16)]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"in_channels": 16}, "has no quantization_config; not an INT8 or NF4 output"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization method 'gptq' is not supported"),
        (None, "no .gguf file, config.json or branch folder"),
    ],
)
def test_unrecognised_folders_raise(tmp_path, config, message):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(IdeoquantError, match=message):
        load_transformer(tmp_path)
    with pytest.raises(IdeoquantError, match="not a .gguf file"):
        (tmp_path / "weights.safetensors").write_bytes(b"x")
        load_transformer(tmp_path / "weights.safetensors")


@pytest.mark.parametrize(("lengths", "grid", "max_text"), [((5, 3), (4, 4), 8), ((1,), (2, 3), 1), ((0, 7, 2), (3, 2), 7)])
def test_packed_sequence_is_the_pipeline_layout(lengths, grid, max_text):
    """The packed [pad][text][image] sequence equals diffusers' own packing, value for value."""
    from diffusers import Ideogram4Pipeline

    from ideoquant.model.sequence import packed_sequence

    want = Ideogram4Pipeline._prepare_ids(list(lengths), grid[0], grid[1], max_text, torch.device("cpu"))
    got = packed_sequence(lengths, grid[0], grid[1], max_text)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
