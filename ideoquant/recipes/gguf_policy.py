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
    "q3_k": (QT.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
    "q2_k": (QT.Q2_K, LlamaFileType.MOSTLY_Q2_K),
    "iq4_xs": (QT.IQ4_XS, LlamaFileType.MOSTLY_IQ4_XS),
}
# The q3_k mixes, from `bench/kquant_mix_sensitivity.py` (velocity error with one kind of
# linear in Q3_K, the rest float32; README "Measured"): the small tensors outside the blocks
# (timestep and modulation inputs, the image indicator, the output layer; 0.6% of the weights
# at full width) cost 0.05-0.16 each, more than any whole per-block kind, so every mix above
# q3_k_s keeps them two types higher. Of the per-block kinds adaln_modulation (3.5% of the
# weights) measures worst, then attention.qkv; the FFN linears and attention.o least.
_Q3_K_OUTSIDE = (
    "t_embedding.mlp_in.weight",
    "t_embedding.mlp_out.weight",
    "adaln_proj.weight",
    "embed_image_indicator.weight",
    "final_layer.linear.weight",
    "final_layer.adaln_modulation.weight",
)
# One line per llama.cpp-style mix: name -> (base type, tensors kept higher, file type).
# feed_forward.w2 (the FFN down-projection) is the set most sensitive to 4-bit error.
GGUF_MIX_TABLE: dict[str, tuple[QT, dict[str, QT], LlamaFileType]] = {
    "q4_k_s": (QT.Q4_K, {}, LlamaFileType.MOSTLY_Q4_K_S),
    "q4_k_m": (QT.Q4_K, {"feed_forward.w2.weight": QT.Q5_K}, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_s": (QT.Q5_K, {}, LlamaFileType.MOSTLY_Q5_K_S),
    "q5_k_m": (QT.Q5_K, {"feed_forward.w2.weight": QT.Q6_K}, LlamaFileType.MOSTLY_Q5_K_M),
    "q3_k_s": (QT.Q3_K, {}, LlamaFileType.MOSTLY_Q3_K_S),
    "q3_k_m": (QT.Q3_K, {"adaln_modulation.weight": QT.Q4_K, **dict.fromkeys(_Q3_K_OUTSIDE, QT.Q5_K)}, LlamaFileType.MOSTLY_Q3_K_M),
    "q3_k_l": (
        QT.Q3_K,
        {"attention.qkv.weight": QT.Q4_K, "adaln_modulation.weight": QT.Q5_K, **dict.fromkeys(_Q3_K_OUTSIDE, QT.Q5_K)},
        LlamaFileType.MOSTLY_Q3_K_L,
    ),
}
GGUF_FORMATS: dict[str, QT] = {name: qtype for name, (qtype, _) in GGUF_FORMAT_TABLE.items()}
GGUF_MIXES: dict[str, tuple[QT, dict[str, QT]]] = {name: (b, o) for name, (b, o, _) in GGUF_MIX_TABLE.items()}
FILE_TYPES: dict[str, LlamaFileType] = {name: ft for name, (_, ft) in GGUF_FORMAT_TABLE.items()}
FILE_TYPES |= {name: ft for name, (_, _, ft) in GGUF_MIX_TABLE.items()}

# When a tensor's rows do not fit the wanted type's blocks: the nearest type that fits, then
# Q8_0, then F16. One line per type. input_proj has rows of 128, too short for any 256-weight
# K-quant block; Q4_K/Q5_K files keep it in Q8_0, as they always have (their bytes stay the
# same from release to release), the types below 4 bits take the 32-weight IQ4_NL.
GGUF_FALLBACKS: dict[QT, tuple[QT, ...]] = {
    QT.Q2_K: (QT.IQ4_NL, QT.Q8_0, QT.F16),
    QT.Q3_K: (QT.IQ4_NL, QT.Q8_0, QT.F16),
    QT.IQ4_XS: (QT.IQ4_NL, QT.Q8_0, QT.F16),
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


# The K-quant ladder the mixes step up on.
_LADDER = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0)


def _higher_by(base: QT, higher: QT) -> str:
    """`one type higher`, `two types higher`, or the type itself off the ladder."""
    if base in _LADDER and higher in _LADDER:
        steps = _LADDER.index(higher) - _LADDER.index(base)
        if steps > 0:
            return f"{('one', 'two', 'three', 'four', 'five')[steps - 1]} type{'s' if steps > 1 else ''} higher"
    return f"in {higher.name}"


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
                wanted, reason = higher, f"{fmt} keeps {suffix.rsplit('.', 1)[0]} {_higher_by(base, higher)}"
        if spec.shape[-1] % _block_size(wanted):
            chain = GGUF_FALLBACKS.get(wanted, DEFAULT_FALLBACKS)
            fallback = next(t for t in chain if spec.shape[-1] % _block_size(t) == 0)
            reason = f"rows of {spec.shape[-1]} do not fit {wanted.name} blocks of {_block_size(wanted)}; fallback"
            wanted = fallback
        choices.append(TensorChoice(spec.name, spec.shape, wanted, reason))
    return choices

