"""Calibration: run the model and record what every nn.Linear sees at its input.

Per linear input channel (keyed by canonical module name; q/k/v share the `attention.qkv`
input and w1/w3 share the `feed_forward.w1` input, so each is recorded once):

* absmax, overall and per timestep bin (SmoothQuant, and to see how activations move
  along the sampling schedule);
* sum of squares and token count (E[x^2]: the importance matrix of GGUF K-quants);
* a bounded uniform sample of input rows (to search alpha and measure quantization error).

Per block, the energy of the residual stream entering it and of what its attention and
MLP branches add: a block linear's error reaches the stream scaled by that ratio.

Rows the model masks out carry no information and are skipped: text positions at
`input_proj` and `final_layer.linear`, image positions at `llm_cond_proj`, and padding
positions everywhere (their outputs never reach an image token).

Row sampling is bottom-k by a random key per row, each key drawn from a stream seeded by
(seed, input, branch, forward call, module). A row's key does not depend on which process
saw it or in what order, so shards merge exactly: keep the k smallest keys of the union.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import IdeoquantError
from ..io.source import BranchSource, Source, open_source
from ..model.inventory import BRANCH_ALIASES, ModelDims
from .collector import StatisticsCollector
from .distributed import rank_and_world, reduce_statistics
from .inputs import CalibrationPrompt, guidance_schedule, read_prompts, synthetic_calls
from .source_model import load_source_transformer
from .statistics import (
    DEFAULT_MAX_SAMPLES,
    SAMPLE_DTYPE,
    STATS_FORMAT,
    STATS_VERSION,
    CalibrationStatistics,
    stable_int,
    timestep_bin_edges,
)

log = logging.getLogger("ideoquant")

# Square image size when neither the command nor the prompt file gives one.
DEFAULT_RESOLUTION = 1024
# Sampling steps per prompt of a --prompts run.
DEFAULT_STEPS = 20
# A --synthetic run: random inputs at timesteps over [0, 1] need fewer and smaller forwards
# than images (statistics, not pictures), and a tiny model finishes in seconds.
SYNTHETIC_INPUTS = 4
SYNTHETIC_STEPS = 4
SYNTHETIC_RESOLUTION = 256
SYNTHETIC_TEXT_TOKENS = 64
# Text tokens a prompt is assumed to take when estimating the time of a --prompts run.
ESTIMATE_TEXT_TOKENS = 256
# Above this estimate a CPU run warns before it starts.
SLOW_RUN_SECONDS = 600







# --- the command -----------------------------------------------------------------------------

def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclass
class CalibrateOptions:
    """Everything a calibration run can be told; the defaults are the command's."""

    prompts: str | Path | None = None
    synthetic: bool = False
    steps: int | None = None  # None: DEFAULT_STEPS with prompts, SYNTHETIC_STEPS with --synthetic
    resolution: int | None = None  # None: each prompt's size, SYNTHETIC_RESOLUTION with --synthetic
    seed: int = 0
    branches: str = "both"
    synthetic_inputs: int = SYNTHETIC_INPUTS
    text_tokens: int = SYNTHETIC_TEXT_TOKENS
    max_samples: int = DEFAULT_MAX_SAMPLES
    max_sequence_length: int = 2048
    device: str | torch.device | None = None
    dtype: torch.dtype | None = None
    offload: bool | None = None
    keep_fp8: bool | None = None
    shard: tuple[int, int] | None = None
    overwrite: bool = False
    quiet: bool = False


def calibrate(src: str | Path, out: str | Path, options: CalibrateOptions | None = None, **settings) -> CalibrationStatistics:
    """Run the model over prompts (full pipeline) or synthetic inputs and write the statistics file.

    `shard=(i, n)` keeps every n-th input from the i-th, for runs on separate machines that
    `merge_statistics` combines later; under torchrun the ranks split the inputs further.
    `settings` are CalibrateOptions fields, for calls that set only a few of them.
    A progress bar counts the run's transformer forwards; on a CPU the run first logs its
    estimated compute time.
    """
    o = dataclasses.replace(options or CalibrateOptions(), **settings)
    prompts, synthetic, steps, resolution, seed, branches = o.prompts, o.synthetic, o.steps, o.resolution, o.seed, o.branches
    synthetic_inputs, text_tokens, max_samples = o.synthetic_inputs, o.text_tokens, o.max_samples
    device, dtype, keep_fp8, shard_index, shard_count = o.device, o.dtype, o.keep_fp8, *(o.shard or (0, 1))
    if (prompts is None) == (not synthetic):
        raise IdeoquantError("calibrate needs exactly one of --prompts FILE or --synthetic")
    if steps is None:
        steps = SYNTHETIC_STEPS if synthetic else DEFAULT_STEPS
    if synthetic and resolution is None:
        resolution = SYNTHETIC_RESOLUTION
    if synthetic_inputs < 1:
        raise IdeoquantError(f"--inputs must be at least 1, not {synthetic_inputs}")
    if steps < 1:
        raise IdeoquantError(f"--steps must be at least 1, not {steps}")
    if resolution is not None and (resolution < 16 or resolution % 16):
        raise IdeoquantError(f"--resolution must be a positive multiple of 16, not {resolution}")
    if branches not in BRANCH_ALIASES:
        raise IdeoquantError(f"--branches must be cond, uncond or both, not {branches!r}")
    if not 0 <= shard_index < shard_count:
        raise IdeoquantError(f"shard {shard_index} of {shard_count} does not exist")
    out = Path(out)
    rank, world = rank_and_world()
    device = torch.device(device) if device is not None else _default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # FP8 kept in memory where it matters (GPU); on the CPU, fp8 -> float per forward is slow.
    keep_fp8 = device.type == "cuda" if keep_fp8 is None else keep_fp8
    if out.exists() and not o.overwrite:
        raise IdeoquantError(f"{out} already exists (use --overwrite to replace it)")
    wanted = BRANCH_ALIASES[branches]
    # Read the prompts before the (slow) source: a wrong file fails at once.
    records = read_prompts(prompts)[shard_index::shard_count] if prompts is not None else []
    # The prompt path runs both transformers (guidance mixes them), whatever is recorded.
    source = open_source(src, "both" if prompts is not None else branches)
    collector = StatisticsCollector(seed, max_samples, device=device)
    quiet = o.quiet or rank != 0

    if prompts is not None:
        ids = [r.id for r in records]
        mine = records[rank::world]
        sizes = [((resolution or r.height or DEFAULT_RESOLUTION), (resolution or r.width or DEFAULT_RESOLUTION)) for r in mine]
        work = [(bs.dims, h // 16 * (w // 16) + ESTIMATE_TEXT_TOKENS) for bs in source.branches.values()
                for h, w in sizes for _ in range(steps)]
        _announce(work, device, dtype, quiet)
        _run_pipeline(source, collector, wanted, mine, steps, resolution, seed, device, dtype,
                      o.max_sequence_length, o.offload, keep_fp8, quiet, len(work))
        run = {"mode": "prompts", "prompts_file": str(prompts), "prompts": [r.text for r in records], "steps": steps,
               "resolution": resolution or "per prompt", "seed": seed, "max_sequence_length": o.max_sequence_length}
    else:
        chosen = list(range(synthetic_inputs))[shard_index::shard_count]
        ids = [f"synthetic:{seed}:{i}" for i in chosen]
        mine = list(zip(chosen, ids))[rank::world]
        image_tokens = (resolution // 16) ** 2
        work = [(source.branches[b].dims, image_tokens + (text_tokens if b == "transformer" else 0))
                for b in wanted for _ in range(len(mine) * steps)]
        _announce(work, device, dtype, quiet)
        with _progress(len(work), quiet) as bar:
            for branch in wanted:
                _run_synthetic(source.branches[branch], collector, mine, steps, resolution, text_tokens, seed, device,
                               dtype, keep_fp8, bar)
        run = {"mode": "synthetic", "prompts": None, "inputs": len(chosen), "steps": steps,
               "resolution": resolution, "seed": seed, "text_tokens": text_tokens}
    run["shard"] = [shard_index, shard_count]
    collector.detach()
    stats = {b: collector.stats.get(b, {}) for b in wanted}
    energies = {b: collector.energies.get(b, {}) for b in wanted}
    if world > 1:
        reduce_statistics(stats, energies, max_samples)
    stats = {b: {k: v.to("cpu") for k, v in modules.items() if v.count} for b, modules in stats.items()}
    energies = {b: {k: v.cpu() for k, v in blocks.items()} for b, blocks in energies.items()}
    run.update({"world_size": world, "dtype": str(dtype).replace("torch.", "")})
    metadata = {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "source": source.name,
        "checksums": {b: source.branches[b].checksum() for b in wanted},
        "branches": list(wanted),
        "timestep_bins": timestep_bin_edges(),
        "max_samples": max_samples,
        "sample_dtype": str(SAMPLE_DTYPE).replace("torch.", ""),
        "inputs": ids,
        "runs": [run],
    }
    result = CalibrationStatistics(stats, metadata, energies)
    if rank == 0:
        result.save(out, overwrite=o.overwrite)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result


def calibrate_synthetic(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A quick synthetic calibration (demo and tests): small images, a few timesteps; returns `out`."""
    calibrate(src, out, synthetic=True, steps=4, resolution=128, synthetic_inputs=4, text_tokens=16,
              max_samples=256, overwrite=overwrite, quiet=True)
    return Path(out)


def _progress(total: int, quiet: bool):
    """One bar over every transformer forward of the run, with its rate and ETA."""
    from tqdm import tqdm

    return tqdm(total=total, desc="calibrate", unit="forward", disable=quiet)


def forward_flops(dims: ModelDims, tokens: int) -> float:
    """Multiply-adds x 2 of one transformer forward over `tokens` rows: the token linears and attention."""
    H, F = dims.hidden, dims.intermediate
    per_block = 2 * tokens * (4 * H * H + 3 * H * F) + 4 * tokens * tokens * H
    outside = 2 * tokens * (dims.in_channels * H + dims.llm_features * H + H * dims.in_channels)
    return dims.num_layers * per_block + outside


def _matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a float GEMM on this device, measured in a fraction of a second."""
    a = torch.randn(512, 1024, device=device, dtype=dtype)
    b = torch.randn(1024, 1024, device=device, dtype=dtype)
    a @ b
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < 0.1:
        a @ b
        reps += 1
    return 2 * 512 * 1024 * 1024 * reps / (time.perf_counter() - start)


def estimate_seconds(work: list[tuple], device: torch.device, dtype: torch.dtype) -> float:
    """Estimated compute time of a list of (dims, tokens) forwards on this device."""
    return sum(forward_flops(d, t) for d, t in work) / _matmul_rate(device, dtype)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _announce(work: list[tuple], device: torch.device, dtype: torch.dtype, quiet: bool) -> None:
    """On a CPU, say how long the run should take before it starts (a full-size model runs for hours)."""
    if device.type != "cpu" or not work:
        return
    seconds = estimate_seconds(work, device, dtype)
    line = f"calibrate: {len(work)} forwards, estimated {_duration(seconds)} on this CPU"
    if seconds > SLOW_RUN_SECONDS:
        log.warning("%s; a GPU (--device cuda), fewer --steps or a smaller --resolution shorten it", line)
    elif not quiet:
        log.info(line)


@torch.no_grad()
def _run_synthetic(bs: BranchSource, collector: StatisticsCollector, inputs: list[tuple[int, str]], steps: int,
                   resolution: int, text_tokens: int, seed: int, device: torch.device, dtype: torch.dtype,
                   keep_fp8: bool, bar) -> None:
    model = load_source_transformer(bs, device=device, dtype=dtype, keep_fp8=keep_fp8)
    collector.attach(model, bs.branch)
    bar.set_postfix_str(bs.branch, refresh=False)
    for index, input_id in inputs:
        collector.begin_input(input_id)
        for call in synthetic_calls(bs.dims, index, seed, steps, resolution, text_tokens, bs.branch):
            call = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in call.items()}
            model(**call, return_dict=False)
            bar.update(1)
    collector.detach()
    del model


@torch.no_grad()
def _run_pipeline(source: Source, collector: StatisticsCollector, wanted: tuple[str, ...],
                  prompts: list[CalibrationPrompt],
                  steps: int, resolution: int | None, seed: int, device: torch.device, dtype: torch.dtype,
                  max_sequence_length: int, offload: bool | None, keep_fp8: bool, quiet: bool, forwards: int) -> None:
    from diffusers import Ideogram4Pipeline

    if source.repo_id is None and not (source.root / "model_index.json").is_file():
        raise IdeoquantError(
            f"{source.origin}: --prompts needs a pipeline folder (model_index.json, text_encoder/, tokenizer/)"
        )
    offload = device.type == "cuda" if offload is None else offload
    load_device = torch.device("cpu") if offload else device
    models = {b: load_source_transformer(source.branches[b], load_device, dtype, keep_fp8) for b in source.branches}
    try:
        pipe = Ideogram4Pipeline.from_pretrained(
            source.repo_id or str(source.root), transformer=models["transformer"],
            unconditional_transformer=models["unconditional_transformer"], torch_dtype=dtype,
        )
    except (OSError, ValueError) as e:
        raise IdeoquantError(f"{source.origin}: cannot load the pipeline ({str(e).splitlines()[0]})") from None
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for branch in wanted:
        collector.attach(models[branch], branch)
    with _progress(forwards, quiet) as bar:
        # Every transformer forward advances the bar (guidance may skip one branch on some steps).
        counters = [m.register_forward_pre_hook(lambda module, args: bar.update(1)) for m in models.values()]
        for p in prompts:
            collector.begin_input(p.id)
            generator = torch.Generator().manual_seed(stable_int(seed, p.id if p.seed is None else p.seed))
            height = resolution or p.height or DEFAULT_RESOLUTION
            width = resolution or p.width or DEFAULT_RESOLUTION
            pipe(
                prompt=p.text, height=height, width=width, num_inference_steps=steps,
                guidance_schedule=guidance_schedule(steps), max_sequence_length=max_sequence_length,
                generator=generator, output_type="latent",
            )
        for h in counters:
            h.remove()
    collector.detach()
