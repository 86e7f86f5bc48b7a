"""The convert pipeline: source -> (calibration, smoothing) -> quantize -> write -> verify -> card.

Each format supplies one branch writer with the signature of `BranchWriter`; this module
runs it for every selected branch, inside one `OutputSet` so that a failure anywhere
leaves no finished-looking output behind.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from ..errors import IdeoquantError
from ..io.memory import reuse_freed_memory
from ..io.source import open_source
from ..io.staging import OutputSet, check_apart
from ..recipes.formats import ALL_FORMATS, is_gguf_format
from .options import BranchResult, BranchWriter, ConvertOptions, Progress

log = logging.getLogger("ideoquant")


def branch_writer(fmt: str) -> BranchWriter:
    """The branch writer of a format."""
    if is_gguf_format(fmt):
        from .gguf_branch import write_gguf_branch

        return write_gguf_branch
    if fmt == "int8":
        from .int8_branch import write_int8_branch

        return write_int8_branch
    if fmt == "nf4":
        from .nf4_branch import write_nf4_branch

        return write_nf4_branch
    raise IdeoquantError(f"unknown format {fmt!r}; choose one of {', '.join(ALL_FORMATS)}")


def convert(src: str, options: ConvertOptions, on_branch_done: Callable[[BranchResult], None] | None = None) -> list[BranchResult]:
    """Convert the selected branches of SRC to one format under options.out."""
    writer = branch_writer(options.fmt)
    if options.imatrix is not None and not is_gguf_format(options.fmt):
        raise IdeoquantError(f"--imatrix applies to GGUF q4_0 and K-quant formats, not {options.fmt}")
    if options.calibration is not None and options.fmt == "nf4":
        raise IdeoquantError("--calibration applies to int8 and the GGUF q4_0/q4_k/q5_k/q6_k/q8_0 formats, not nf4")
    if options.clamp_overflow and not is_gguf_format(options.fmt):
        raise IdeoquantError(f"--clamp-overflow applies to GGUF f16/bf16 tensors, not {options.fmt}")
    if options.base_model is not None:
        from .model_card import check_repo_id

        check_repo_id(options.base_model, "--base-model")
    if options.max_size is not None and not is_gguf_format(options.fmt):
        raise IdeoquantError(f"--max-size applies to GGUF formats, not {options.fmt}")
    reuse_freed_memory()
    source = open_source(src, options.branches)
    check_apart(options.out, source.root, [f.path for bs in source.branches.values() for f in bs.files])
    if options.max_size is not None:
        from .gguf_calibration import plan_max_size

        options.type_plan = plan_max_size(source, options)
    outputs = OutputSet(overwrite=options.overwrite)
    results: list[BranchResult] = []
    # Hash the sources in the background: the second branch's checksum is ready by the
    # time its header is written (hashing releases the GIL).
    threading.Thread(target=lambda: [bs.checksum() for bs in source.branches.values()], daemon=True).start()
    # One run at a time per output folder; a failure anywhere removes what this run made.
    with outputs.locked(options.out):
        for branch, bs in source.branches.items():
            t0 = time.perf_counter()
            progress = Progress(branch, sum(bs.stored_nbytes(n) for n in bs.specs), options.quiet)
            try:
                result = writer(bs, source, options, outputs, progress)
            finally:
                progress.close()
            result.seconds = time.perf_counter() - t0
            result.weights = bs.total_weights
            results.append(result)
            if on_branch_done:
                on_branch_done(result)
        if options.max_size is not None:
            written = sum(r.output_bytes for r in results)
            if written > options.max_size:
                raise IdeoquantError(f"--max-size {options.max_size} bytes: the files came to {written} bytes")
        from .model_card import write_model_card

        write_model_card(source, options, results, outputs)
    return results
