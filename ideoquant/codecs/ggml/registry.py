"""Every ggml type ideoquant encodes and decodes, by enum or name."""

from __future__ import annotations

from gguf import GGMLQuantizationType

from .base import GGMLType
from .blocks32 import IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
from .floats import BF16, F16, F32
from .kquants import Q4_K, Q5_K, Q6_K
from .iq4_xs import IQ4_XS
from .kquants23 import Q2_K, Q3_K

GGML_TYPES: dict[GGMLQuantizationType, type[GGMLType]] = {
    cls.qtype: cls for cls in (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q4_K, Q5_K, Q6_K)
}
GGML_TYPES.update({cls.qtype: cls for cls in (Q2_K, Q3_K, IQ4_XS)})


def ggml_type(qtype: GGMLQuantizationType | str) -> type[GGMLType]:
    """The class for a ggml type, by enum or name ("Q8_0", "q4_k")."""
    if isinstance(qtype, str):
        try:
            qtype = GGMLQuantizationType[qtype.upper()]
        except KeyError:
            raise ValueError(f"unknown ggml type {qtype!r}") from None
    try:
        return GGML_TYPES[qtype]
    except KeyError:
        raise ValueError(f"ggml type {qtype.name} is not supported") from None
