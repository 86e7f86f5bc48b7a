"""Runtime benchmark: load time, resident bytes against file size, and velocity-forward step
time for every output format, against the same model in bf16 loaded by diffusers.

CPU: the tiny synthetic model (2 blocks, width 256) on a 16x16 latent grid with 32 text
tokens. GPU (when CUDA is available): full width (4608) with 2 blocks on a 32x32 grid with
64 text tokens; peak memory of one step is reported as well. Every format is converted
from the same synthetic FP8 source by `ideoquant convert` (conditional branch only).

Usage: python bench/bench_runtime.py [--formats q8_0,q4_k,nf4] [--steps 5] [--work bench_out/runtime] [--no-gpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ideoquant.errors import IdeoquantError  # noqa: E402
from ideoquant.export.convert import convert
from ideoquant.export.options import ConvertOptions
from ideoquant.io.synthetic import write_synthetic_pipeline
from ideoquant.model.build import resident_bytes
from ideoquant.model.sequence import velocity_inputs
from ideoquant.recipes.formats import is_gguf_format
from ideoquant.runtime.pipeline import load_transformer

FORMATS = ("bf16", "f16", "q8_0", "q6_k", "q5_k", "q4_k", "q4_0", "nf4", "int8")
BASELINE = "bf16 (diffusers)"


@dataclass
class Setting:
    """One benchmark setting: where it runs and at which model size and input size."""

    name: str
    device: str
    size: str
    layers: int
    grid: int
    text_tokens: int


@dataclass
class Row:
    setting: str
    fmt: str
    file_bytes: int
    resident_bytes: int
    load_s: float
    step_ms: float
    step_min_ms: float = float("nan")
    peak_step_bytes: int | None = None
    note: str = ""


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synthetic_sources(work: Path, s: Setting) -> tuple[Path, Path]:
    """The FP8 pipeline to convert from and the same weights in bf16 with diffusers names."""
    fp8 = work / f"{s.name}-source-fp8"
    bf16 = work / f"{s.name}-source-bf16"
    for folder, dtype, layout in ((fp8, "fp8", "fused"), (bf16, "bf16", "diffusers")):
        if not (folder / "model_index.json").exists():
            write_synthetic_pipeline(folder, size=s.size, layers=s.layers, dtype=dtype, layout=layout, seed=0, overwrite=True)
    return fp8, bf16


def nf4_folder_without_converter(src: Path, out: Path) -> list[Path]:
    """The NF4 branch folder the converter writes (diffusers names, one-row adaLN linears kept
    bf16), built with `ideoquant.formats.nf4` for checkouts whose NF4 writer is not there yet."""
    from safetensors.torch import save_file

    from ideoquant.codecs.nf4 import nf4_serialized_tensors, quantize_nf4
    from ideoquant.io.source import open_source
    from ideoquant.model.inventory import to_layout_names

    bs = open_source(src, "cond").branches["transformer"]
    tensors, skipped = {}, []
    for spec in bs.specs.values():
        w = bs.read_float32(spec.name)
        names = to_layout_names(spec.name, "diffusers")
        if spec.kind != "linear" or spec.rows_per_image == "one_row":
            tensors[names[0]] = w.to(torch.bfloat16)
            skipped += [names[0][: -len(".weight")]] if spec.kind == "linear" else []
            continue
        for part, n in zip(w.chunk(len(names)), names):
            packed, absmax = quantize_nf4(part)
            tensors.update(nf4_serialized_tensors(n[: -len(".weight")], packed, absmax, part.shape, torch.bfloat16, None))
    folder = out / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
          "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": skipped}
    (folder / "config.json").write_text(json.dumps({**bs.dims.to_config(), "quantization_config": qc}))
    return [folder / "diffusion_pytorch_model.safetensors"]


def converted(work: Path, s: Setting, src: Path, fmt: str) -> tuple[Path, int]:
    """Convert the conditional branch to `fmt` (cached); returns (path to load, bytes on disk)."""
    out = work / f"{s.name}-{fmt}"
    done = out / ".done"
    if not done.exists() and fmt == "nf4" and importlib.util.find_spec("ideoquant.formats.nf4_checkpoint") is None:
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps([str(p) for p in nf4_folder_without_converter(src, out)]))
    if not done.exists():
        options = ConvertOptions(fmt=fmt, out=out, branches="cond", overwrite=True, quiet=True)
        if fmt == "int8":
            from ideoquant.calibrate.run import calibrate

            stats = work / f"{s.name}-calibration.safetensors"
            if not stats.exists():
                calibrate(src, stats, synthetic=True, steps=2, synthetic_inputs=2, resolution=256, branches="cond", quiet=True)
            options.calibration = stats
        results = convert(str(src), options)
        files = [p for r in results for p in r.files if p.suffix in (".gguf", ".safetensors")]
        done.write_text(json.dumps([str(p) for p in files]))
    files = [Path(p) for p in json.loads(done.read_text())]
    path = files[0] if is_gguf_format(fmt) else out / "transformer"
    return path, sum(p.stat().st_size for p in files)


def step_inputs(config, s: Setting) -> dict[str, torch.Tensor]:
    """One conditional denoising call at the setting's grid and text length, in bf16."""
    return velocity_inputs(
        config, text_lengths=(s.text_tokens,), grid=(s.grid, s.grid), max_text_tokens=s.text_tokens,
        dtype=torch.bfloat16, device=s.device,
    )


def warm_step(model: torch.nn.Module, s: Setting, inputs) -> int | None:
    """One untimed forward; on CUDA, the peak bytes it allocates above the resident weights."""
    if s.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        model(**inputs, return_dict=False)
    _sync(s.device)
    return torch.cuda.max_memory_allocated() - base if s.device.startswith("cuda") else None


def timed_step(model: torch.nn.Module, s: Setting, inputs) -> float:
    """Seconds of one velocity forward."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(**inputs, return_dict=False)
        _sync(s.device)
    return time.perf_counter() - t0


def timed_load(load, device: str) -> tuple[torch.nn.Module, float]:
    """Load twice (the first warms the file cache and imports) and time the second."""
    load()
    _sync(device)
    t0 = time.perf_counter()
    model = load()
    _sync(device)
    return model, time.perf_counter() - t0


def bench_setting(work: Path, s: Setting, formats: list[str], steps: int) -> list[Row]:
    """Load every format (timed), then time forwards in interleaved rounds so that a burst of
    load on the machine hits all formats alike; report median and fastest step."""
    from diffusers import Ideogram4Transformer2DModel

    fp8, bf16 = synthetic_sources(work, s)
    rows: list[Row] = []
    models: dict[str, torch.nn.Module] = {}
    branch = bf16 / "transformer"
    models[BASELINE], load_s = timed_load(
        lambda: Ideogram4Transformer2DModel.from_pretrained(branch, torch_dtype=torch.bfloat16).to(s.device), s.device
    )
    file_bytes = sum(p.stat().st_size for p in branch.glob("*.safetensors"))
    rows.append(Row(s.name, BASELINE, file_bytes, resident_bytes(models[BASELINE]), load_s, float("nan")))
    for fmt in formats:
        try:
            path, file_bytes = converted(work, s, fp8, fmt)
        except (IdeoquantError, ImportError) as e:
            rows.append(Row(s.name, fmt, 0, 0, float("nan"), float("nan"), note=f"not converted: {e}"))
            continue
        models[fmt], load_s = timed_load(lambda: load_transformer(path, device=s.device, dtype=torch.bfloat16), s.device)
        rows.append(Row(s.name, fmt, file_bytes, resident_bytes(models[fmt]), load_s, float("nan")))
    inputs = step_inputs(models[BASELINE].config, s)
    by_fmt = {r.fmt: r for r in rows}
    for fmt, model in models.items():
        by_fmt[fmt].peak_step_bytes = warm_step(model, s, inputs)
    times: dict[str, list[float]] = {fmt: [] for fmt in models}
    for _ in range(steps):
        for fmt, model in models.items():
            times[fmt].append(timed_step(model, s, inputs))
    for fmt, ts in times.items():
        by_fmt[fmt].step_ms = 1000 * statistics.median(ts)
        by_fmt[fmt].step_min_ms = 1000 * min(ts)
    for r in rows:
        print(_line(r), flush=True)
    models.clear()
    if s.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _line(r: Row) -> str:
    if r.note:
        return f"{r.setting:>4} {r.fmt:<17} {r.note}"
    return (f"{r.setting:>4} {r.fmt:<17} file {_mib(r.file_bytes):>8} MiB  resident {_mib(r.resident_bytes):>8} MiB "
            f"({r.resident_bytes / r.file_bytes:6.1%})  load {r.load_s * 1000:7.1f} ms  step {r.step_ms:8.1f} ms "
            f"(min {r.step_min_ms:.1f})")


def table(rows: list[Row]) -> str:
    """A markdown table with each format's step time relative to the bf16 baseline of its setting."""
    base = {r.setting: r.step_min_ms for r in rows if r.fmt == BASELINE}
    out = [
        "| setting | format | file MiB | resident MiB | resident / file | load ms | step ms (median) | step ms (min) "
        "| step vs bf16 (min) | step peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.note:
            out.append(f"| {r.setting} | {r.fmt} | {r.note} ||||||||")
            continue
        out.append(
            f"| {r.setting} | {r.fmt} | {_mib(r.file_bytes)} | {_mib(r.resident_bytes)} | {r.resident_bytes / r.file_bytes:.1%} "
            f"| {r.load_s * 1000:.1f} | {r.step_ms:.1f} | {r.step_min_ms:.1f} | {r.step_min_ms / base[r.setting]:.2f}x "
            f"| {_mib(r.peak_step_bytes)} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS), help="Comma-separated output formats.")
    parser.add_argument("--steps", type=int, default=10, help="Timed forwards per format (median and min reported).")
    parser.add_argument("--work", type=Path, default=Path("bench_out/runtime"))
    parser.add_argument("--no-gpu", action="store_true", help="Skip the GPU setting even when CUDA is available.")
    parser.add_argument("--cpu-threads", type=int, default=None, help="torch threads on the CPU (default: torch's).")
    args = parser.parse_args()
    logging.getLogger("ideoquant").setLevel(logging.ERROR)  # the converter's model-card notes
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    args.work.mkdir(parents=True, exist_ok=True)

    settings = [Setting("cpu", "cpu", "tiny", 2, 16, 32)]
    if torch.cuda.is_available() and not args.no_gpu:
        settings.append(Setting("gpu", "cuda", "full", 2, 32, 64))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if len(settings) > 1 else ", no CUDA"))
    rows = []
    for s in settings:
        rows += bench_setting(args.work, s, formats, args.steps)
    print()
    print(table(rows))
    (args.work / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
