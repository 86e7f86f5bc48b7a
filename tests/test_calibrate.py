"""Calibration statistics: what is recorded, masking, merging, torch.distributed, the prompt path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ideoquant.calibrate.inputs import synthetic_calls
from ideoquant.calibrate.run import calibrate
from ideoquant.calibrate.source_model import load_source_transformer
from ideoquant.calibrate.statistics import (
    load_importance,
    load_statistics,
    merge_statistics,
    residual_gains,
)
from ideoquant.errors import IdeoquantError
from ideoquant.io import synthetic as synth
from ideoquant.io.source import open_source
from ideoquant.model.fp8_linear import FP8Linear
from ideoquant.model.inventory import ModelDims

# Small enough for a 2-core machine; still several timesteps, both branches, text and image rows.
SYNTH = dict(synthetic=True, steps=3, resolution=64, synthetic_inputs=4, text_tokens=8, max_samples=48, quiet=True)
IMAGE_TOKENS = (64 // 16) ** 2




@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("calib") / "pipeline"
    synth.write_synthetic_pipeline(root)
    return root


@pytest.fixture(scope="module")
def single(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "stats.safetensors"
    calibrate(src, out, **SYNTH)
    return out


def test_records_every_linear_input_once(single):
    stats = load_statistics(single)
    cond, uncond = stats.branch("transformer"), stats.branch("unconditional_transformer")
    # 19 linears at 2 blocks; to_q/to_k/to_v (qkv) and w1/w3 share an input each.
    assert len(cond) == 17 and "layers.0.attention.qkv" in cond and "layers.0.feed_forward.w3" not in cond
    # The unconditional branch never sees text: no llm_cond_proj statistics at all.
    assert set(cond) - set(uncond) == {"llm_cond_proj"}
    calls = SYNTH["synthetic_inputs"] * SYNTH["steps"]
    assert cond["input_proj"].count == calls * IMAGE_TOKENS
    assert cond["final_layer.linear"].count == calls * IMAGE_TOKENS
    assert cond["llm_cond_proj"].count == calls * SYNTH["text_tokens"]
    assert cond["layers.1.attention.o"].count == calls * (IMAGE_TOKENS + SYNTH["text_tokens"])
    assert cond["layers.0.adaln_modulation"].count == calls
    for s in list(cond.values()) + list(uncond.values()):
        assert s.samples.shape[0] == min(SYNTH["max_samples"], s.count)
        assert torch.all(s.sample_keys[1:] >= s.sample_keys[:-1])
        assert int(s.bin_count.sum()) == s.count
        assert torch.equal(s.bin_absmax.amax(dim=0), s.absmax)
        assert torch.all(s.samples.float().abs().amax(dim=0) <= s.absmax.to(torch.bfloat16).float())
    # Timesteps spread over [0, 1]: more than one bin is populated.
    assert int((cond["layers.0.attention.qkv"].bin_count > 0).sum()) >= 2
    meta = stats.metadata
    src_checksum = meta["checksums"]["transformer"]
    assert len(src_checksum) == 64 and meta["runs"][0]["steps"] == 3 and meta["runs"][0]["seed"] == 0
    assert len(meta["inputs"]) == SYNTH["synthetic_inputs"]


def test_masked_rows_are_left_out(src, single):
    """input_proj sees only image rows (the latents), llm_cond_proj only text rows."""
    bs = open_source(src, "cond").branches["transformer"]
    image_rows, text_rows = [], []
    for i in range(SYNTH["synthetic_inputs"]):
        for call in synthetic_calls(bs.dims, i, 0, SYNTH["steps"], SYNTH["resolution"], SYNTH["text_tokens"], "transformer"):
            image = call["indicator"][0] == 2
            image_rows.append(call["hidden_states"][0, image])
            text_rows.append(call["encoder_hidden_states"][0, ~image])
    latents = torch.cat(image_rows)
    stats = load_statistics(single).branch("transformer")
    assert torch.equal(stats["input_proj"].absmax, latents.abs().amax(dim=0))
    torch.testing.assert_close(stats["input_proj"].sumsq, latents.double().square().sum(dim=0), rtol=1e-10, atol=0)
    # llm_cond_proj sees llm_cond_norm(text): rows are nonzero and there are exactly text-many.
    assert stats["llm_cond_proj"].count == torch.cat(text_rows).shape[0]
    assert torch.all(stats["llm_cond_proj"].samples.float().abs().amax(dim=1) > 0)


def test_block_energies_give_residual_gains(single):
    stats = load_statistics(single)
    for branch in ("transformer", "unconditional_transformer"):
        energies = stats.energies[branch]
        assert set(energies) == {"layers.0", "layers.1"}
        assert all(float(e.min()) > 0 for e in energies.values())
        gains = residual_gains(energies)
        assert set(gains) == {f"layers.{i}.{m}" for i in range(2) for m in
                              ("attention.qkv", "attention.o", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
        # adaLN gates near zero at init: each branch adds a small part of the stream.
        assert all(0 < g < 1 for g in gains.values())
        assert gains["layers.0.attention.qkv"] == gains["layers.0.attention.o"]


def test_importance_is_mean_square(single):
    stats = load_statistics(single).branch("transformer")
    imp = load_importance(single, "layers.0.feed_forward.w3")
    w1 = stats["layers.0.feed_forward.w1"]
    torch.testing.assert_close(imp, (w1.sumsq / w1.count).float())
    # diffusers names resolve to the shared qkv input.
    qkv = load_importance(single, "layers.1.attention.qkv")
    torch.testing.assert_close(load_importance(single, "layers.1.attention.to_v"), qkv)
    assert load_importance(single, "llm_cond_proj", branch="unconditional_transformer") is None
    assert load_importance(single, "llm_cond_proj", branch="transformer").shape == (512,)


def _assert_same_statistics(a: Path, b: Path) -> None:
    sa, sb = load_statistics(a), load_statistics(b)
    assert sa.branches.keys() == sb.branches.keys()
    for branch in sa.branches:
        assert sa.branch(branch).keys() == sb.branch(branch).keys()
        for module, x in sa.branch(branch).items():
            y = sb.branch(branch)[module]
            assert x.count == y.count and torch.equal(x.bin_count, y.bin_count), module
            assert torch.equal(x.absmax, y.absmax) and torch.equal(x.bin_absmax, y.bin_absmax), module
            # Sums are the only order-dependent part: float64, merged in another order.
            torch.testing.assert_close(x.sumsq, y.sumsq, rtol=1e-12, atol=0)
            assert torch.equal(x.sample_keys, y.sample_keys) and torch.equal(x.samples, y.samples), module
        assert sa.energies[branch].keys() == sb.energies[branch].keys()
        for block, energy in sa.energies[branch].items():
            torch.testing.assert_close(energy, sb.energies[branch][block], rtol=1e-12, atol=0)


def test_merge_of_shards_equals_single_run(src, single, tmp_path):
    for i in range(2):
        calibrate(src, tmp_path / f"part{i}.safetensors", shard=(i, 2), **SYNTH)
    merged = merge_statistics([tmp_path / "part1.safetensors", tmp_path / "part0.safetensors"], tmp_path / "merged.safetensors")
    _assert_same_statistics(single, tmp_path / "merged.safetensors")
    assert sorted(merged.metadata["inputs"]) == sorted(load_statistics(single).metadata["inputs"])
    with pytest.raises(IdeoquantError, match="shares"):
        merge_statistics([tmp_path / "part0.safetensors", tmp_path / "merged.safetensors"], tmp_path / "twice.safetensors")


def _gloo_worker(rank: int, world: int, init_file: str, src: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        calibrate(src, out, **SYNTH)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_run_equals_single_run(src, single, tmp_path):
    import multiprocessing
    import time

    import torch.multiprocessing as mp

    out = tmp_path / "dist.safetensors"
    # fork, where the platform has it: the children reuse the parent's imports (diffusers
    # takes seconds to import); each sets one thread before touching torch ops.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_gloo_worker, args=(2, str(tmp_path / "rendezvous"), str(src), str(out)),
                             nprocs=2, join=False, start_method=method)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("distributed calibration did not finish")
    _assert_same_statistics(single, out)
    meta = load_statistics(out).metadata
    assert meta["runs"][0]["world_size"] == 2


def test_argument_errors(src, single, tmp_path):
    with pytest.raises(IdeoquantError, match="exactly one"):
        calibrate(src, tmp_path / "x.safetensors", quiet=True)
    with pytest.raises(IdeoquantError, match="exactly one"):
        calibrate(src, tmp_path / "x.safetensors", prompts=tmp_path / "p.jsonl", synthetic=True)
    with pytest.raises(IdeoquantError, match="already exists"):
        calibrate(src, single, **SYNTH)
    with pytest.raises(IdeoquantError, match="pipeline folder"):
        (tmp_path / "p.jsonl").write_text('{"id": "p1", "category": "scene", "prompt": "a cat"}\n')
        calibrate(src / "transformer", tmp_path / "x.safetensors", prompts=tmp_path / "p.jsonl", steps=1, resolution=64)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(IdeoquantError):
        load_statistics(tmp_path / "bad.safetensors")


def test_fp8_linear_matches_dequantized_weights(src):
    bs = open_source(src, "cond").branches["transformer"]
    model = load_source_transformer(bs, keep_fp8=True)
    layer = model.layers[0].feed_forward.w2
    assert isinstance(layer, FP8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(5, layer.in_features)
    expected = x @ bs.read_float32("layers.0.feed_forward.w2.weight").t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert model.dtype == torch.float32


# --- the prompt path: a tiny Ideogram4Pipeline built locally -------------------------------------

TEXT_HIDDEN = 32  # 13 tapped layers x 32 = the transformer's llm_features_dim
TOKEN_WORDS = [
    "<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "user", "assistant",
    "a", "red", "cat", "on", "the", "sign", "says", "hello",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}{{ c['text'] }}{% endfor %}"
    " <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def _tiny_text_stack(root: Path) -> None:
    """Write a tiny Qwen3-VL-style text encoder, tokenizer, VAE and scheduler next to the transformers."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import (
        QWEN3_VL_ACTIVATION_LAYERS,
    )
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLModel

    torch.manual_seed(0)
    # The pipeline taps decoder layers up to index 35: the encoder needs 36 of them.
    text_config = dict(
        vocab_size=len(TOKEN_WORDS), hidden_size=TEXT_HIDDEN, intermediate_size=64,
        num_hidden_layers=max(QWEN3_VL_ACTIVATION_LAYERS) + 1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
    )
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                         deepstack_visual_indexes=[])
    Qwen3VLModel(Qwen3VLConfig(text_config=text_config, vision_config=vision_config)).save_pretrained(root / "text_encoder")
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(TOKEN_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "tokenizer")
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, latent_channels=32, norm_num_groups=4,
    )
    vae.save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler().save_pretrained(root / "scheduler")
    index = json.loads((root / "model_index.json").read_text())
    index.update({
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
        "text_encoder": ["transformers", "Qwen3VLModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    })
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def test_prompt_calibration_runs_the_pipeline(tmp_path):
    dims = ModelDims(**{**synth.TINY.as_dict(), "llm_features": 13 * TEXT_HIDDEN})
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(synth.SIZES, "tiny", dims)
        synth.write_synthetic_pipeline(tmp_path / "pipe", layers=1)
    _tiny_text_stack(tmp_path / "pipe")
    prompts = tmp_path / "prompts.jsonl"
    texts = ["a red cat", "the sign says hello"]
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "category": "scene", "prompt": p}) + "\n" for i, p in enumerate(texts)))
    steps, seq = 2, 24
    stats = calibrate(tmp_path / "pipe", tmp_path / "stats.safetensors", prompts=prompts, steps=steps, resolution=32,
                      max_sequence_length=seq, max_samples=32, quiet=True)
    cond, uncond = stats.branch("transformer"), stats.branch("unconditional_transformer")
    image_tokens = (32 // 4) ** 2  # VAE factor 2, patch 2
    assert cond["input_proj"].count == len(texts) * steps * image_tokens
    assert uncond["input_proj"].count == len(texts) * steps * image_tokens
    # Text rows: every prompt's chat-formatted tokens at every step; the left padding is left out.
    text_rows = cond["llm_cond_proj"].count
    assert 0 < text_rows < len(texts) * steps * seq and text_rows % steps == 0
    assert cond["layers.0.attention.qkv"].count == text_rows + len(texts) * steps * image_tokens
    assert "llm_cond_proj" not in uncond and uncond["layers.0.attention.qkv"].count == len(texts) * steps * image_tokens
    saved = load_statistics(tmp_path / "stats.safetensors")
    run = saved.metadata["runs"][0]
    assert run["mode"] == "prompts" and run["prompts"] == texts and run["steps"] == steps
    assert saved.metadata["checksums"]["transformer"] == open_source(tmp_path / "pipe").branches["transformer"].checksum()


def test_command_line_calibrates_and_merges_shards(src, tmp_path):
    """`ideoquant calibrate` through the CLI: two shards, merged, hold the inputs of one run."""
    from click.testing import CliRunner

    from ideoquant.cli import main

    runner = CliRunner()
    parts = []
    for i in range(2):
        part = tmp_path / f"part{i}.safetensors"
        res = runner.invoke(main, ["calibrate", str(src), "--synthetic", "--steps", "1", "--resolution", "64",
                                   "--branches", "cond", "--shard", f"{i}/2", "--out", str(part), "--quiet"])
        assert res.exit_code == 0, res.output
        parts.append(part)
    merged = tmp_path / "merged.safetensors"
    res = runner.invoke(main, ["calibrate", "merge", *map(str, parts), "--out", str(merged)])
    assert res.exit_code == 0, res.output
    stats = load_statistics(merged)
    shards = [load_statistics(p) for p in parts]
    assert sorted(stats.metadata["inputs"]) == sorted(shards[0].metadata["inputs"] + shards[1].metadata["inputs"])
    module = "layers.0.feed_forward.w2"
    counts = [s.branches["transformer"][module].count for s in shards]
    assert stats.branches["transformer"][module].count == sum(counts) > 0
    res = runner.invoke(main, ["calibrate", str(src), "--synthetic", "--shard", "2/2", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "shard 2 of 2 does not exist" in res.output


def _cli(*args: str):
    from click.testing import CliRunner

    from ideoquant.cli import main

    return CliRunner().invoke(main, list(args))


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_cli_synthetic_defaults_are_small_with_a_forward_progress_bar(src, tmp_path):
    out = tmp_path / "defaults.safetensors"
    result = _cli("calibrate", str(src), "--synthetic", "--branches", "cond", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    run = load_statistics(out).metadata["runs"][0]
    assert (run["inputs"], run["steps"], run["resolution"]) == (4, 4, 256)
    # One bar over the run's forwards (4 inputs x 4 steps, one branch), and the estimate first.
    assert "16/16" in result.stderr and "forward" in result.stderr
    assert "calibrate: 16 forwards, estimated" in result.stderr
    assert result.stderr.index("estimated") < result.stderr.index("16/16")


def test_estimate_counts_the_model_work():
    from ideoquant.calibrate.run import forward_flops

    dims = ModelDims(in_channels=2, hidden=4, head_dim=2, intermediate=8, adaln_dim=4, llm_features=3, num_layers=1)
    # Per block 2*T*(4*16 + 3*32) + 4*T^2*4, outside 2*T*(2*4 + 3*4 + 4*2), worked out at T = 10.
    assert forward_flops(dims, 10) == 2 * 10 * 160 + 4 * 100 * 4 + 2 * 10 * 28


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: d / "missing.jsonl", "no such prompt file"),
        (lambda d: (d / "bin.jsonl").write_bytes(b"\xff\xfe\x00binary") and d / "bin.jsonl", "not a UTF-8 text file"),
        (lambda d: (d / "bad.jsonl").write_text("{not json\n") and d / "bad.jsonl", "bad.jsonl:1: invalid JSON"),
    ],
)
def test_cli_bad_prompt_file_is_one_line(src, tmp_path, make, needle):
    out = tmp_path / "stats.safetensors"
    result = _cli("calibrate", str(src), "--prompts", str(make(tmp_path)), "--out", str(out))
    assert result.exit_code == 1 and len(_error_lines(result)) == 1, result.stderr
    assert needle in _error_lines(result)[0] and not out.exists()


def test_cli_inputs_needs_synthetic(src, tmp_path):
    result = _cli("calibrate", str(src), "--prompts", "p.jsonl", "--inputs", "3", "--out", str(tmp_path / "s.safetensors"))
    assert result.exit_code == 1 and "--inputs counts synthetic inputs" in _error_lines(result)[0]
