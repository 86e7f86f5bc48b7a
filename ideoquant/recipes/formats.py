"""Every output format ideoquant writes, by name."""

from __future__ import annotations

from ..errors import IdeoquantError
from .gguf_policy import GGUF_FORMATS, GGUF_MIXES

OTHER_FORMATS = ("int8", "nf4")
# Tensor names of the safetensors formats (INT8, NF4): diffusers' split attention or the fused names.
LAYOUTS = ("diffusers", "fused")
DEFAULT_LAYOUT = "diffusers"

ALL_FORMATS = tuple(GGUF_FORMATS) + tuple(m for m in GGUF_MIXES if m not in GGUF_FORMATS) + OTHER_FORMATS


def is_gguf_format(fmt: str) -> bool:
    """Whether a format name is written as GGUF files (a plain ggml type or a mix)."""
    return fmt in GGUF_FORMATS or fmt in GGUF_MIXES


def gguf_file_tag(fmt: str) -> str:
    """The type tag in output file names: `Q8_0`, `Q4_K_M`, `BF16`."""
    return fmt.upper()


def check_layout(layout: str) -> None:
    """Refuse a tensor-name layout the safetensors writers do not know."""
    if layout not in LAYOUTS:
        raise IdeoquantError(f"--layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
