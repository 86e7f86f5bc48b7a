"""The GGUF recipe: which ggml type every tensor gets, for every GGUF format and mix.

Mechanism (encoders, writers) lives elsewhere; this module only chooses. `inspect` and
the file metadata show the choice per tensor with the reason for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

from ..model.inventory import ModelDims, expected_tensors

# One line per plain format: name -> (the type of every per-block linear, llama.cpp file type).
GGUF_FORMAT_TABLE: dict[str, tuple[QT, LlamaFileType]] = {
    "f32": (QT.F32, LlamaFileType.ALL_F32),
    "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (QT.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (QT.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (QT.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (QT.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "iq4_nl": (QT.IQ4_NL, LlamaFileType.MOSTLY_IQ4_NL),
    "q4_k": (QT.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q5_k": (QT.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "q6_k": (QT.Q6_K, LlamaFileType.MOSTLY_Q6_K),
}
# One line per llama.cpp-style mix: name -> (base type, tensors kept higher, file type).
# feed_forward.w2 (the FFN down-projection) is the set most sensitive to 4-bit error.
GGUF_MIX_TABLE: dict[str, tuple[QT, dict[str, QT], LlamaFileType]] = {
    "q4_k_s": (QT.Q4_K, {}, LlamaFileType.MOSTLY_Q4_K_S),
    "q4_k_m": (QT.Q4_K, {"feed_forward.w2.weight": QT.Q5_K}, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_s": (QT.Q5_K, {}, LlamaFileType.MOSTLY_Q5_K_S),
    "q5_k_m": (QT.Q5_K, {"feed_forward.w2.weight": QT.Q6_K}, LlamaFileType.MOSTLY_Q5_K_M),
}
GGUF_FORMATS: dict[str, QT] = {name: qtype for name, (qtype, _) in GGUF_FORMAT_TABLE.items()}
GGUF_MIXES: dict[str, tuple[QT, dict[str, QT]]] = {name: (b, o) for name, (b, o, _) in GGUF_MIX_TABLE.items()}
FILE_TYPES: dict[str, LlamaFileType] = {name: ft for name, (_, ft) in GGUF_FORMAT_TABLE.items()}
FILE_TYPES |= {name: ft for name, (_, _, ft) in GGUF_MIX_TABLE.items()}

# When a tensor's rows do not fit the wanted type's blocks: the nearest type with 32-weight
# blocks (llama.cpp's choice for the same case), then Q8_0, then F16. One line per type.
# input_proj has rows of 128, too short for any 256-weight K-quant block.
GGUF_FALLBACKS: dict[QT, tuple[QT, ...]] = {
    QT.Q2_K: (QT.IQ4_NL, QT.Q8_0, QT.F16),
    QT.Q3_K: (QT.IQ4_NL, QT.Q8_0, QT.F16),
    QT.IQ4_XS: (QT.IQ4_NL, QT.Q8_0, QT.F16),
    QT.Q4_K: (QT.Q5_0, QT.Q8_0, QT.F16),
    QT.Q5_K: (QT.Q5_1, QT.Q8_0, QT.F16),
    QT.Q6_K: (QT.Q8_0, QT.F16),
}
DEFAULT_FALLBACKS = (QT.Q8_0, QT.F16)


@dataclass(frozen=True)
class TensorChoice:
    """The type chosen for one tensor of an output, and why."""

    name: str
    shape: tuple[int, ...]
    qtype: QT
    reason: str


def _block_size(qtype: QT) -> int:
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[qtype][0]


def gguf_tensor_types(dims: ModelDims, fmt: str) -> list[TensorChoice]:
    """The GGUF type policy: per-block linears in the requested type (mixes: w2 higher),
    every 1-D tensor in F32, other 2-D tensors in the requested type where their rows fit
    its blocks, else the nearest type that fits (`GGUF_FALLBACKS`)."""
    if fmt in GGUF_MIXES:
        base, overrides = GGUF_MIXES[fmt]
    elif fmt in GGUF_FORMATS:
        base, overrides = GGUF_FORMATS[fmt], {}
    else:
        raise ValueError(f"{fmt} is not a GGUF format")
    choices = []
    for spec in expected_tensors(dims):
        if len(spec.shape) == 1:
            choices.append(TensorChoice(spec.name, spec.shape, QT.F32, "1-D tensors stay F32"))
            continue
        wanted, reason = base, "requested type"
        for suffix, higher in overrides.items():
            if spec.name.endswith(suffix):
                wanted, reason = higher, f"{fmt} keeps {suffix.rsplit('.', 1)[0]} one type higher"
        if spec.shape[-1] % _block_size(wanted):
            chain = GGUF_FALLBACKS.get(wanted, DEFAULT_FALLBACKS)
            fallback = next(t for t in chain if spec.shape[-1] % _block_size(t) == 0)
            reason = (
                f"rows of {spec.shape[-1]} do not fit {wanted.name} blocks of {_block_size(wanted)}; "
                f"fallback to the nearest type that fits"
            )
            wanted = fallback
        choices.append(TensorChoice(spec.name, spec.shape, wanted, reason))
    return choices

