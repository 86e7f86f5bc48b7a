"""The `ideoquant` command line."""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__
from .errors import IdeoquantError, printable
from .recipes.formats import ALL_FORMATS, DEFAULT_LAYOUT, LAYOUTS

log = logging.getLogger("ideoquant")


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {printable(record.getMessage())}"


def _setup_logging(quiet: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    # diffusers imports bitsandbytes when installed; its CPU backend warns about an optional
    # kernel package on import, which says nothing about this tool's work.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


class Interrupted(KeyboardInterrupt):
    """A termination signal, raised where the program is so that every cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# Signals that end a run the way Ctrl-C does: staged and finished outputs removed, one line.
ENDING_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def _on_signal(signum, frame) -> None:
    # A second signal must not cut the cleanup of the first short.
    for s in ENDING_SIGNALS:
        if signal.getsignal(s) is _on_signal:
            signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def _ending_signals_raise():
    """While a command runs, SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # A signal ignored when the command started (`nohup`, a background job) stays ignored.
    previous = {s: h for s in ENDING_SIGNALS if (h := signal.getsignal(s)) is not signal.SIG_IGN}
    for s in previous:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _echo_error(text: str) -> None:
    try:
        click.echo(printable(f"error: {text}"), err=True)
    except OSError:  # the terminal went away (SIGHUP): the exit status still tells
        pass


def one_line_errors(func):
    """Turn project errors (and interrupts, termination signals, full disks, memory exhaustion)
    into one line and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with _ending_signals_raise():
                return func(*args, **kwargs)
        except IdeoquantError as e:
            _echo_error(str(e))
            sys.exit(1)
        except KeyboardInterrupt as e:
            signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
            _echo_error(f"interrupted ({signal.Signals(signum).name}); partial outputs removed")
            sys.exit(128 + int(signum))
        except MemoryError:
            _echo_error("out of memory")
            sys.exit(1)
        except OSError as e:
            _echo_error(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ideoquant")
def main() -> None:
    """Convert Ideogram 4 weights to INT8 W8A8, GGUF and NF4 checkpoints."""


# --- synth -------------------------------------------------------------------------------

@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layers", type=click.IntRange(1, 64), default=None, help="Blocks (default: 2 tiny, 34 full).")
@click.option("--size", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True)
@click.option("--dtype", type=click.Choice(["fp8", "bf16"]), default="fp8", show_default=True)
@click.option("--layout", type=click.Choice(LAYOUTS), default="fused", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace existing files.")
@one_line_errors
def synth(out: Path, layers: int | None, size: str, dtype: str, layout: str, seed: int, overwrite: bool) -> None:
    """Write a synthetic Ideogram-4-shaped pipeline folder (both branches)."""
    from .io.synthetic import write_synthetic_pipeline

    _setup_logging()
    dims = write_synthetic_pipeline(out, size=size, layers=layers, dtype=dtype, layout=layout, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {out} ({size}, {dims.num_layers} blocks, hidden {dims.hidden}, {dtype}, {layout} names)")


# --- inspect -----------------------------------------------------------------------------

@main.command()
@click.argument("path", type=str)
@click.option("--plan", "plan_fmt", type=click.Choice(ALL_FORMATS), default=None,
              help="For a source: show the per-tensor type a format would choose.")
@click.option("--max-size", default=None, metavar="SIZE",
              help="With --plan (GGUF): the types `convert --max-size SIZE` would choose (11GiB, 11GB or bytes).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --plan (GGUF): statistics file; shows which tensors get activation-aware codes.")
@click.option("--metadata/--no-metadata", default=True, show_default=True, help="Print file metadata.")
@one_line_errors
def inspect(path: str, plan_fmt: str | None, max_size: str | None, calibration: Path | None, metadata: bool) -> None:
    """Print a table of a source or an output: name, shape, dtype/type, bytes; metadata; totals."""
    from .export.inspect import inspect_path
    from .recipes.gguf_budget import parse_max_size

    _setup_logging(quiet=True)
    click.echo(inspect_path(path, plan_fmt=plan_fmt, show_metadata=metadata,
                            max_size=None if max_size is None else parse_max_size(max_size), calibration=calibration))


# --- convert -----------------------------------------------------------------------------

@main.command()
@click.argument("src", type=str)
@click.option("--format", "fmt", type=click.Choice(ALL_FORMATS), required=True, help="Output format.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--branches", type=click.Choice(["cond", "uncond", "both"]), default="both", show_default=True)
@click.option("--imatrix", default=None,
              help="GGUF K-quants, Q4_0/Q4_1/Q5_0/Q5_1, IQ4_NL, IQ4_XS: 'ones' or a calibration statistics file.")
@click.option("--calibration", type=click.Path(path_type=Path), default=None, help="INT8, and GGUF q4_0/q4_k/q5_k/q6_k/q8_0/q4_k_m/q5_k_m (activation-aware codes): statistics from `calibrate`.")
@click.option("--max-size", default=None,
              help="GGUF: both files together at most this size (11GiB, 11GB, or bytes); the type of every "
                   "tensor (Q3_K..Q8_0) chosen from its measured sensitivity.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=None, help="INT8: fixed SmoothQuant alpha.")
@click.option("--rounding", type=click.Choice(["error_feedback", "nearest"]), default="error_feedback", show_default=True,
              help="INT8: weight rounding: GPTQ error feedback on the calibration rows, or to nearest (the paper's).")
@click.option("--protect-budget", default=None,
              help="INT8: bf16 bytes per branch for the linears with the best measured error reduction per byte: "
                   "a fraction of the int8-eligible linear weights (0.11, 11%) or a size (1.5GiB). "
                   "Default: the paper's share, 17 of 34 feed_forward.w2 (about 11%).")
@click.option("--protect", type=click.IntRange(0), default=None,
              help="INT8: instead of a budget, keep the N linears with the largest measured impact in bf16.")
@click.option("--protect-pattern", "protect_patterns", multiple=True,
              help="Keep linears matching this glob in bf16 (INT8: on top of the budget).")
@click.option("--all-linears", is_flag=True, help="NF4: quantize the one-row adaLN linears too.")
@click.option("--double-quant", is_flag=True, help="NF4: quantize the absmax statistics too.")
@click.option("--layout", type=click.Choice(LAYOUTS), default=DEFAULT_LAYOUT, show_default=True,
              help="INT8/NF4 tensor names.")
@click.option("--base-model", default=None, help="Hub id of the source, for the model card.")
@click.option("--clamp-overflow", is_flag=True,
              help="GGUF f16/bf16 tensors: store values beyond the type's range as its largest value "
                   "(counted in the report and card) instead of refusing.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def convert(src: str, fmt: str, out: Path, branches: str, imatrix: str | None, calibration: Path | None,
            max_size: str | None, alpha: float | None, rounding: str, protect_budget: str | None, protect: int | None, protect_patterns: tuple[str, ...], all_linears: bool,
            double_quant: bool, layout: str, base_model: str | None, clamp_overflow: bool, overwrite: bool,
            quiet: bool) -> None:
    """Convert SRC (folder, file or Hub repo id) to FORMAT under OUT, then verify it."""
    from .export.convert import convert as run_convert
    from .export.options import ConvertOptions
    from .export.report import summary_table

    from .recipes.gguf_budget import parse_max_size
    from .recipes.int8_policy import DEFAULT_PROTECT_BUDGET, parse_protect_budget

    _setup_logging(quiet)
    if protect is not None and protect_budget is not None:
        raise IdeoquantError("give --protect N or --protect-budget, not both")
    budget = DEFAULT_PROTECT_BUDGET if protect_budget is None else parse_protect_budget(protect_budget)
    options = ConvertOptions(
        fmt=fmt, out=out, branches=branches, overwrite=overwrite, quiet=quiet, imatrix=imatrix,
        calibration=calibration, alpha=alpha, rounding=rounding, protect_budget=budget, protect=protect,
        protect_patterns=protect_patterns, all_linears=all_linears, double_quant=double_quant, layout=layout,
        base_model=base_model, clamp_overflow=clamp_overflow,
        max_size=None if max_size is None else parse_max_size(max_size),
    )
    results = run_convert(src, options)
    click.echo(summary_table(results))
    if fmt == "int8":
        from .export.model_card import protection_lines

        for r in results:
            for line in protection_lines(r.recipe.get("protection"))[:1]:
                click.echo(f"{r.branch}: {line}")


# --- calibrate ---------------------------------------------------------------------------

@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Statistics file (.safetensors).")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="JSON-lines prompt file (e.g. calibration_prompts/calibration.jsonl): runs the full pipeline.")
@click.option("--synthetic", is_flag=True,
              help="Random latents and text features at timesteps over [0, 1] (default: 4 inputs x 4 steps at 256 px).")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Sampling steps per prompt or synthetic input (default: 20 with --prompts, 4 with --synthetic).")
@click.option("--resolution", type=click.IntRange(64), default=None,
              help="Image side (default: each prompt's size; 256 with --synthetic).")
@click.option("--inputs", "synthetic_inputs", type=click.IntRange(1), default=None,
              help="--synthetic: how many random inputs (default: 4).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--branches", type=click.Choice(["cond", "uncond", "both"]), default="both", show_default=True)
@click.option("--max-samples", type=click.IntRange(1), default=512, show_default=True,
              help="Input rows kept per linear (reservoir sample).")
@click.option("--device", default=None, help="torch device (default: cuda when available).")
@click.option("--shard", default=None, help="I/N: keep every N-th input from the I-th (merge the shards later).")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", is_flag=True)
@one_line_errors
def calibrate(inputs: tuple[str, ...], out: Path, prompts: Path | None, synthetic: bool, steps: int | None,
              resolution: int | None, synthetic_inputs: int | None, seed: int, branches: str, max_samples: int, device: str | None,
              shard: str | None, overwrite: bool, quiet: bool) -> None:
    """Record activation statistics: `calibrate SRC --out STATS` or `calibrate merge A B ... --out STATS`."""
    from .calibrate.run import CalibrateOptions
    from .calibrate.run import calibrate as run_calibration
    from .calibrate.statistics import merge_statistics

    _setup_logging(quiet)
    if inputs[0] == "merge":
        if len(inputs) < 2:
            raise IdeoquantError("calibrate merge needs statistics files to merge")
        merge_statistics(list(inputs[1:]), out, overwrite=overwrite)
        click.echo(f"merged {len(inputs) - 1} statistics files into {out}")
        return
    if len(inputs) != 1:
        raise IdeoquantError("calibrate takes one source (or `merge` and statistics files)")
    shard_pair = None
    if shard:
        try:
            i, n = (int(v) for v in shard.split("/"))
            shard_pair = (i, n)
        except ValueError:
            raise IdeoquantError(f"--shard must look like 0/4, not {shard!r}") from None
    if synthetic_inputs is not None and not synthetic:
        raise IdeoquantError("--inputs counts synthetic inputs: use it with --synthetic")
    extra = {} if synthetic_inputs is None else {"synthetic_inputs": synthetic_inputs}
    options = CalibrateOptions(
        prompts=prompts, synthetic=synthetic, steps=steps, resolution=resolution, seed=seed, branches=branches,
        max_samples=max_samples, device=device, shard=shard_pair, overwrite=overwrite, quiet=quiet, **extra,
    )
    run_calibration(inputs[0], out, options)
    click.echo(f"wrote {out}")


# --- compare -----------------------------------------------------------------------------

@main.command()
@click.argument("a", type=click.Path(exists=True, path_type=Path))
@click.argument("b", type=click.Path(exists=True, path_type=Path))
@click.option("--images", is_flag=True, help="A and B are folders of same-named images: PSNR and SSIM.")
@click.option("--resamples", type=click.IntRange(100), default=10000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--confidence", type=click.FloatRange(0.5, 0.999), default=0.95, show_default=True)
@one_line_errors
def compare(a: Path, b: Path, images: bool, resamples: int, seed: int, confidence: float) -> None:
    """Paired comparison of two variants: per-prompt score CSVs (B - A, bootstrap CI), or --images."""
    from .export.compare import (
        compare_image_dirs,
        compare_score_files,
        format_comparison,
    )

    if images:
        click.echo(format_comparison(compare_image_dirs(a, b)))
    else:
        click.echo(format_comparison(compare_score_files(a, b, resamples=resamples, seed=seed, confidence=confidence)))


# --- demo --------------------------------------------------------------------------------

@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True)
@click.option("--formats", default=None, help="Comma-separated subset of formats (default: all).")
@one_line_errors
def demo(out: Path, formats: str | None) -> None:
    """Build a tiny synthetic FP8 checkpoint, convert it to every format, print a summary."""
    from .export.demo import DEMO_FORMATS, run_demo

    _setup_logging(quiet=True)
    log.setLevel(logging.ERROR)  # a synthetic source has no card or base model to warn about
    chosen = tuple(f.strip() for f in formats.split(",")) if formats else DEMO_FORMATS
    click.echo(run_demo(out, chosen))


# --- verify ------------------------------------------------------------------------------

@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--source", default=None, help="Recompute every tensor's error against this source (folder, file or Hub id).")
@one_line_errors
def verify(folder: Path, source: str | None) -> None:
    """Check a converted FOLDER against its model card and report (and the source); record the result."""
    from .export.verify import record_verification, verify_folder

    _setup_logging()
    section = verify_folder(folder, source)
    record_verification(folder, section)
    line = f"verified {folder}: {section['files']} files, sha256 match"
    for branch, stats in section.get("branches", {}).items():
        line += f"; {branch}: {stats['tensors_compared']} tensors match the source (worst rel err {stats['max']:.2e})"
        if stats["tensors_skipped_smoothed"]:
            line += f", {stats['tensors_skipped_smoothed']} smoothed by SmoothQuant not compared"
    click.echo(line)


# --- publish -----------------------------------------------------------------------------

@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="Hub model repo to create or update (owner/name).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--dry-run", is_flag=True, help="Verify and list what would be uploaded; upload nothing.")
@one_line_errors
def publish(folder: Path, repo_id: str, private: bool, dry_run: bool) -> None:
    """Upload a converted FOLDER that verifies to a Hub model repo (the files its card lists)."""
    from .export.publish import publish_folder
    from .export.report import human_bytes

    _setup_logging()
    plan = publish_folder(folder, repo_id, private=private, dry_run=dry_run)
    if dry_run:
        click.echo("dry run, nothing uploaded; would upload to " + plan.describe())
    else:
        click.echo(f"uploaded {len(plan.files)} files ({human_bytes(plan.total_bytes)}) to https://huggingface.co/{repo_id}")


if __name__ == "__main__":
    main()
