"""ggml's `_ref` encoders of the 32-weight block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (no
importance matrix) through the C++ library of `fused_kernel` (`ref32_encode`), with the eager
encoders of `blocks32` as fallback and reference.

Without an importance matrix these encoders are a min/max (or signed absmax) per block and
one rounding per weight: memory-bound work that eager torch spreads over a dozen passes
(reductions, scale, round, clamp, pack, concatenate). The C++ is ggml's scalar code block by
block, scan order included (the first of +a and -a, the sign of a zero min), and writes the
level bytes in place; the fp16 header is rounded here by torch, as the eager encoders do.

Exactness. Each encoder is checked bit for bit against the eager encoder it replaces once
per process, on blocks that probe the edges, and is not used when it differs or the library
cannot be built (a one-line warning; the eager encoder gives the same bytes, only slower).
IDEOQUANT_FUSED=0 turns it off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..native import failure_reason
from . import fused_kernel
from .base import store_fp16
from .scale_search import _adversarial_blocks

_F32 = torch.float32
# Blocks the self-check encodes (not a multiple of anything the kernel cares about).
PROBE_BLOCKS = 16411


def _probe_blocks(blocks: int) -> torch.Tensor:
    """[blocks, 32]: the edge cases of the scale searches plus ties of +a and -a in both orders,
    zero mins of either sign and all-zero blocks."""
    x, _ = _adversarial_blocks(blocks, seed=5)
    kind = torch.arange(blocks) % 16
    x[kind == 12] = torch.randint(-3, 4, (int((kind == 12).sum()), 32), generator=torch.Generator().manual_seed(6)).to(_F32)
    x[kind == 13, 3], x[kind == 13, 7] = 5.0, -5.0
    x[kind == 14, 3], x[kind == 14, 7] = -5.0, 5.0
    x[kind == 15] = -0.0
    # All-positive blocks with a zero min: +0.0 alone, then +0.0 before -0.0 and -0.0 before +0.0.
    positive, index = kind == 1, torch.arange(blocks)
    x[positive, 5] = 0.0
    x[positive & (index % 32 == 1), 9] = -0.0
    x[positive & (index % 32 == 17), 3] = -0.0
    return x


def _with_header(name: str, encoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    out, d, m = encoded
    store_fp16(out[:, 0:2], d)
    if name in ("Q4_1", "Q5_1"):
        store_fp16(out[:, 2:4], m)
    return out


@functools.cache
def compiled_encoder(name: str, eager: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The C++ `_ref` encoder of type `name` (blocks [n, 32] -> bytes), once it has written the
    same bytes as `eager` (the encoder it replaces) on probe blocks; else None."""
    kernel = fused_kernel.compiled_ref32()
    if kernel is None:
        return None

    def encode(blocks: torch.Tensor) -> torch.Tensor:
        return _with_header(name, fused_kernel.ref32_cpp(kernel, name, blocks))

    try:
        x = _probe_blocks(PROBE_BLOCKS)
        if torch.equal(encode(x), eager(x)):
            return encode
        reason = "its results differ from the eager code on this machine"
    except Exception as exc:  # noqa: BLE001 - a library without the symbol, say
        reason = failure_reason(exc)
    fused_kernel.log.warning("compiled %s kernel not used (%s); using the eager encoder", name, reason)
    return None


def encode_blocks(name: str, blocks: torch.Tensor, eager: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Encode float32 blocks [n, 32] with the C++ `_ref` encoder of `name`, or with `eager`
    where it is unavailable."""
    encode = compiled_encoder(name, eager)
    return eager(blocks) if encode is None else encode(blocks)
