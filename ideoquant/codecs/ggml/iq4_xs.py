"""ggml's IQ4_XS: the IQ4_NL non-linear 4-bit codebook in super-blocks of 256 weights.

Each 32-weight sub-block has its own 6-bit scale relative to one fp16 super-block scale.
The encoder is byte-identical to ggml's `quantize_iq4_xs` (its `_ref` is the same search
without an importance matrix: weights x*x); the decoder is bit-equal to gguf-py's. Blocks are
processed in the gapped 33-row position-major layout of `scale_search`, so the sequential sums
over 32 weights are two 16-row chains. The 16 candidate scales of every 32-weight block run
through IQ4_NL's C++ candidate sums (`iq4`), in chunks of whole super-blocks.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from . import iq4
from .base import fp16_bytes, fp16_from_bytes
from .iq4 import KVALUES_IQ4NL, iq4_block_scales, iq4_index
from .kquants import _KQuant, _superblocks_pos_major
from .kquants23 import importance_weights, superblock_sum_sq
from .scale_search import QK_K, exact_div, nearest_int_bits, ungap33

_F32 = torch.float32

_VALUES = torch.tensor(KVALUES_IQ4NL, dtype=_F32)


def _encode_iq4_xs(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    nsb = x.shape[0]
    X3 = _superblocks_pos_major(x, 32, 33)  # [33, 8, nsb] gapped, row 16 scratch
    X = X3.view(33, -1)
    if qw is None:
        W = X * X
    else:
        QW = _superblocks_pos_major(qw, 32, 33)
        sigma2 = superblock_sum_sq(x) * (2.0 / QK_K)  # sigma2 *= 2.f/256, exact
        W = importance_weights(X3, QW, sigma2).view(33, -1)
    scales, _ = iq4_block_scales(X, W)
    scales = scales.view(8, nsb)
    _, arg = scales.abs().max(dim=0)
    max_scale = scales.gather(0, arg.unsqueeze(0)).squeeze(0)
    d = torch.div(-max_scale, 32.0)
    idn = torch.where(d != 0, exact_div(1.0, d), torch.zeros_like(d))
    l = nearest_int_bits(idn * scales).clamp_(-32, 31)  # [8, nsb]
    dl = (d * l.to(_F32)).view(-1)
    idl = torch.where(dl != 0, exact_div(1.0, dl), torch.zeros_like(dl))
    L = iq4_index(ungap33(X) * idl).to(torch.uint8).view(32, 8, nsb)  # [pos, sub, nsb]
    qs = L[0:16] | (L[16:32] << 4)  # [16, 8, nsb]: byte 16*ib + j
    ls = (l + 32).to(torch.int32)
    scales_l = (ls[0::2] & 0xF) | ((ls[1::2] & 0xF) << 4)  # [4, nsb]
    hi = (ls >> 4).view(8, nsb)
    scales_h = torch.zeros(nsb, dtype=torch.int32)
    for ib in range(8):
        scales_h |= hi[ib] << (2 * ib)
    head = torch.stack([scales_h & 0xFF, scales_h >> 8], dim=1).to(torch.uint8)
    return torch.cat(
        [fp16_bytes(d), head, scales_l.to(torch.uint8).permute(1, 0), qs.permute(2, 1, 0).reshape(nsb, 128)], dim=1
    )


class IQ4_XS(_KQuant):
    """136 bytes per 256 weights: fp16 d, 8 6-bit sub-block scales, 256 4-bit codebook indices."""

    qtype = GGMLQuantizationType.IQ4_XS
    type_size = 136

    @classmethod
    def prepare(cls, imatrix=False):
        iq4.compiled_search_available()

    @classmethod
    def _encode(cls, x, qw):
        return _encode_iq4_xs(x, qw)

    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        dev = blocks.device
        d = fp16_from_bytes(blocks[:, 0:2])
        scales_h = blocks[:, 2:4].to(torch.int32)
        scales_h = (scales_h[:, 0] | (scales_h[:, 1] << 8)).view(n, 1)
        scales_l = blocks[:, 4:8].reshape(n, 4, 1) >> torch.tensor([0, 4], dtype=torch.uint8, device=dev).view(1, 1, 2)
        scales_l = scales_l.reshape(n, 8) & 0xF
        scales_h = (scales_h >> torch.arange(0, 16, 2, dtype=torch.int32, device=dev).view(1, 8)) & 3
        sc = (scales_l.to(torch.int32) | (scales_h << 4)).to(torch.int8) - 32
        dl = (d * sc.to(_F32)).reshape(n, 8, 1)
        qs = blocks[:, 8:].reshape(n, 8, 1, 16) >> torch.tensor([0, 4], dtype=torch.uint8, device=dev).view(1, 1, 2, 1)
        q = (qs.reshape(n, 8, 32) & 0xF).to(torch.int64)
        return _VALUES.to(dev)[q].mul_(dl).reshape(n, QK_K)
