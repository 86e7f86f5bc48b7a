"""Run the emitted files in PyTorch, weights kept in their stored (quantized) form.

    from ideoquant.runtime import load_transformer, load_pipeline

    cond = load_transformer("out/ideogram4-Q4_K.gguf", device="cuda")
    pipe = load_pipeline("out/", base="ideogram-ai/ideogram-4-fp8", device="cuda")
"""

from ..model.build import resident_bytes
from ..model.sequence import velocity_inputs
from .linear import QuantizedLinear
from .pipeline import branch_paths, load_pipeline, load_transformer, locate_branch

__all__ = [
    "QuantizedLinear",
    "branch_paths",
    "load_pipeline",
    "load_transformer",
    "locate_branch",
    "resident_bytes",
    "velocity_inputs",
]
