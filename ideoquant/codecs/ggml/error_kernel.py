"""The squared error of encoded blocks against their source weights, in one C++ pass that
decodes each block as the gguf package does and sums on the fly (`fused_kernel.error_sums_cpp`),
for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K to Q6_K, IQ4_NL and IQ4_XS.

A conversion reports each tensor's relative error. Decoding a chunk into a float32 copy and
measuring it costs more than encoding it for the cheaper types; the kernel reads the bytes
and the source once. It is checked once per process against the type's own decoder (float64
sums of the decoded blocks of random bytes, to a relative 1e-12: the float64 additions run
in another order) and is not used where it differs or cannot be built: the caller decodes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..native import failure_reason
from . import fused_kernel
from .iq4 import KVALUES_IQ4NL

# Relative agreement the C++ sums must reach with float64 sums of the decoded blocks.
TOLERANCE = 1e-12
# Blocks of random bytes the self-check decodes.
PROBE_BLOCKS = 2053

Sums = Callable[[torch.Tensor, torch.Tensor], tuple[float, float]]
# The high byte of each fp16 field of a block, where it is not just byte 1 (d first).
FP16_HIGH_BYTES = {"Q4_1": (1, 3), "Q5_1": (1, 3), "Q4_K": (1, 3), "Q5_K": (1, 3), "Q6_K": (209,),
                   "Q2_K": (81, 83), "Q3_K": (109,)}


def _probe(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random source weights and random block bytes of type `name` with finite fp16 fields of
    both signs (exponents at most 15), subnormal ones included."""
    _, weights, size = fused_kernel.ERROR_KINDS[name]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(PROBE_BLOCKS, weights, generator=gen)
    data = torch.randint(0, 256, (PROBE_BLOCKS, size), dtype=torch.uint8, generator=gen)
    for high in FP16_HIGH_BYTES.get(name, (1,)):
        data[:, high] &= 0xBF
    return x, data


@functools.cache
def compiled_error_sums(name: str, decode: Callable[[torch.Tensor], torch.Tensor]) -> Sums | None:
    """(x [n, block], blocks uint8 [n, type_size]) -> (sum of (x - decoded)^2, sum of x^2) in
    float64 through the C++ kernel, once it has agreed with `decode` (the type's decoder of
    blocks) on probe blocks; None for a type it does not decode or where it disagrees."""
    if name not in fused_kernel.ERROR_KINDS:
        return None
    kernel = fused_kernel.compiled_error_sums()
    if kernel is None:
        return None

    def sums(x: torch.Tensor, data: torch.Tensor) -> tuple[float, float]:
        return fused_kernel.error_sums_cpp(kernel, name, x, data, KVALUES_IQ4NL)

    try:
        x, data = _probe(name)
        x64, y64 = x.to(torch.float64), decode(data).to(torch.float64).reshape(x.shape)
        want = (float((x64 - y64).square().sum()), float(x64.square().sum()))
        got = sums(x, data)
        if all(abs(g - w) <= TOLERANCE * abs(w) for g, w in zip(got, want)):
            return sums
        reason = f"its sums {got} differ from the decoder's {want}"
    except Exception as exc:  # noqa: BLE001 - a library without the symbol, say
        reason = failure_reason(exc)
    fused_kernel.log.warning("compiled %s error sums not used (%s); decoding instead", name, reason)
    return None
