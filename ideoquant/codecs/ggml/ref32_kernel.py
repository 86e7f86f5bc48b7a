"""Compiled CPU kernels for ggml's 32-weight block types: the `_ref` encoders of Q4_0, Q4_1,
Q5_0 and Q5_1 (with an importance matrix, Q4_0 and Q5_0 run make_qx_quants through
`fused_kernel`'s C++).

Without an importance matrix these encoders are a min/max (or signed absmax) per block and
one rounding per weight: memory-bound work that eager torch spreads over a dozen passes
(reductions, scale, round, clamp, pack, concatenate). Each function below spells one
encoder out from float32 blocks [B, 32] to its block bytes [B, type_size], which
torch.compile (inductor) turns into one or two loops over the blocks.

Exactness. The functions are ggml's float32 arithmetic, in its order, with no reductions
other than min and max (exact in any order); inductor's C++ keeps IEEE semantics (no fused
multiply-adds, no fast-math). Where ggml's scan order decides the result (the sign of a zero
min, the first of +a and -a), the kernel flags the block and the eager encoder re-encodes
it. Still, each compiled encoder is checked bit for bit against
the eager encoder it replaces once per process, on blocks that probe the edges, and is not
used when it differs or cannot be compiled (a one-line warning; the eager encoder gives the
same bytes, only slower). IDEOQUANT_FUSED=0 turns the kernels off.

Shapes are static: one bucket of `bucket_blocks()` per call, the last one padded with zero
blocks, so each type compiles one kernel per thread count, once (torch caches it on disk).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from . import fused_kernel
from .scale_search import _adversarial_blocks

_F32 = torch.float32

# Blocks per compiled call and torch thread: a few MB per call, so that the Python overhead
# of a call (tens of microseconds) stays small against its work.
BLOCKS_PER_THREAD = 16384

def _fp16_le_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 [B] -> the two little-endian bytes of its fp16 rounding, uint8 [B, 2]."""
    h = v.to(torch.float16).view(torch.int16).to(torch.int32)
    return torch.stack(((h & 0xFF), ((h >> 8) & 0xFF)), dim=1).to(torch.uint8)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """ggml's `d ? 1.0f/d : 0.0f` (a true division: `1.0 / d` would multiply by a reciprocal)."""
    return torch.where(d != 0, torch.div(torch.ones_like(d), d), torch.zeros_like(d))


def _packed(level: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, fifth_bit: bool) -> list[torch.Tensor]:
    """The level bytes of blocks x [B, 32], level(x part) giving int32 levels: [qh [B, 4]] if
    fifth_bit, then qs [B, 16] = L[j] | L[j+16] << 4 (low 4 bits). The levels are computed
    where they are packed, never stored."""
    parts = []
    if fifth_bit:
        # Bit j of the little-endian uint32 qh is bit 4 of L[j]: byte k holds positions
        # 8k..8k+7, so bit j of every byte comes from the strided slice x[:, j::8].
        qh = None
        for j in range(8):
            bit = ((level(x[:, j::8]) >> 4) & 1) << j
            qh = bit if qh is None else qh | bit
        parts.append(qh.to(torch.uint8))
    parts.append(((level(x[:, :16]) & 0xF) | ((level(x[:, 16:]) & 0xF) << 4)).to(torch.uint8))
    return parts


def _absmax_kernel(x: torch.Tensor, nmax: int, fifth_bit: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Q4_0 (nmax 15) / Q5_0 (nmax 31): with half = (nmax + 1)/2, d = max / -half and levels
    MIN(nmax, (int8_t)(x*id + half + 0.5f)), max the signed element of largest |x|."""
    half = (nmax + 1) // 2
    hi = x.amax(dim=1)
    lo = x.amin(dim=1)
    # The element of largest |x|; where +a and -a tie, ggml takes the first of them, which
    # the eager encoder finds (`redo`).
    mx = torch.where(-lo > hi, lo, hi)
    mx = torch.where(torch.maximum(hi, -lo) > 0, mx, torch.zeros_like(mx))
    d = mx / -half
    idv = _inverse(d)

    def level(part: torch.Tensor) -> torch.Tensor:
        return torch.clamp((part * idv.unsqueeze(1) + (half + 0.5)).to(torch.int32), max=nmax)

    return torch.cat([_fp16_le_bytes(d), *_packed(level, x, fifth_bit)], dim=1), (-lo == hi) & (hi > 0)


def q4_0_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """quantize_row_q4_0_ref: x [B, 32] float32 -> (uint8 [B, 18], redo)."""
    return _absmax_kernel(x, 15, False)


def q5_0_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """quantize_row_q5_0_ref: x [B, 32] float32 -> (uint8 [B, 22], redo)."""
    return _absmax_kernel(x, 31, True)


def _min_max_kernel(x: torch.Tensor, nmax: int, fifth_bit: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Q4_1 (nmax 15) / Q5_1 (nmax 31): d = (max - min)/nmax, levels MIN(nmax, (int8)((x - min)*id + 0.5)).

    Of +0.0 and -0.0 the min and max are whichever amin/amax return, not always ggml's first
    one, which sets the sign of a zero min and of d: blocks whose min is zero are flagged
    (`redo`) for the eager encoder."""
    mn = x.amin(dim=1)
    mx = x.amax(dim=1)
    d = (mx - mn) / nmax
    idv = _inverse(d)

    def level(part: torch.Tensor) -> torch.Tensor:
        return torch.clamp(((part - mn.unsqueeze(1)) * idv.unsqueeze(1) + 0.5).to(torch.int32), max=nmax)

    return torch.cat([_fp16_le_bytes(d), _fp16_le_bytes(mn), *_packed(level, x, fifth_bit)], dim=1), mn == 0


def q4_1_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """quantize_row_q4_1_ref up to the sign of a zero min: x [B, 32] float32 -> (uint8 [B, 20], redo)."""
    return _min_max_kernel(x, 15, False)


def q5_1_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """quantize_row_q5_1_ref up to the sign of a zero min: x [B, 32] float32 -> (uint8 [B, 24], redo)."""
    return _min_max_kernel(x, 31, True)


# Each kernel returns (block bytes, blocks to re-encode with the eager encoder or None).
KERNELS: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]] = {
    "Q4_0": q4_0_ref,
    "Q4_1": q4_1_ref,
    "Q5_0": q5_0_ref,
    "Q5_1": q5_1_ref,
}


def bucket_blocks(threads: int | None = None) -> int:
    """Blocks per call of a compiled `_ref` encoder for this many torch threads."""
    threads = torch.get_num_threads() if threads is None else threads
    return BLOCKS_PER_THREAD * max(1, threads)


def _probe_blocks(blocks: int) -> torch.Tensor:
    """[blocks, 32]: the edge cases of the scale searches plus ties of +a and -a in both orders."""
    x, _ = _adversarial_blocks(blocks, seed=5)
    kind = torch.arange(blocks) % 16
    x[kind == 12] = torch.randint(-3, 4, (int((kind == 12).sum()), 32), generator=torch.Generator().manual_seed(6)).to(_F32)
    x[kind == 13, 3], x[kind == 13, 7] = 5.0, -5.0
    x[kind == 14, 3], x[kind == 14, 7] = -5.0, 5.0
    x[kind == 15] = -0.0
    return x


@functools.cache
def compiled_encoder(
    name: str, blocks: int, eager: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The compiled `_ref` encoder of type `name` for buckets of `blocks`, once it has written
    the same bytes as `eager` (the encoder it replaces) on probe blocks; else None."""
    if not fused_kernel.fused_requested():
        return None
    try:
        compiled = torch.compile(KERNELS[name], dynamic=False, fullgraph=True)

        def step(t: torch.Tensor) -> torch.Tensor:
            # Inference mode keeps the compiled graph's guards the same on every call.
            with torch.inference_mode():
                out, redo = compiled(t)
                if redo is not None:
                    redo = redo.nonzero().squeeze(1)
                    if redo.numel():
                        out[redo] = eager(t[redo])
            return out

        x = _probe_blocks(blocks)
        if torch.equal(step(x), eager(x)):
            return step
        reason = "its results differ from the eager code on this machine"
    except Exception as exc:  # noqa: BLE001 - compile errors surface on the first call
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    fused_kernel.log.warning("compiled %s kernel not used (%s); using the eager encoder", name, reason)
    return None


def encode_blocks(
    name: str, blocks: torch.Tensor, eager: Callable[[torch.Tensor], torch.Tensor], type_size: int
) -> torch.Tensor:
    """Encode float32 blocks [n, 32] with the compiled `_ref` encoder of `name` in buckets
    (the last one padded with zero blocks); with `eager` where the kernel is unavailable or
    the input is too small for a bucket to pay off."""
    n = blocks.shape[0]
    bucket = bucket_blocks()
    step = compiled_encoder(name, bucket, eager) if n >= bucket // 4 else None
    if step is None:
        return eager(blocks)
    out = torch.empty((n, type_size), dtype=torch.uint8)
    for a in range(0, n, bucket):
        b = min(n, a + bucket)
        x = blocks[a:b]
        if b - a != bucket:
            if b - a < bucket // 4:
                out[a:b] = eager(x)
                continue
            x = torch.cat([x, x.new_zeros(bucket - (b - a), 32)])
        out[a:b] = step(x.contiguous())[: b - a]
    return out
