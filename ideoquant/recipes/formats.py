"""Every output format ideoquant writes, by name."""

from __future__ import annotations

from .gguf_policy import GGUF_FORMATS, GGUF_MIXES

OTHER_FORMATS = ("int8", "nf4")


ALL_FORMATS = tuple(GGUF_FORMATS) + tuple(m for m in GGUF_MIXES if m not in GGUF_FORMATS) + OTHER_FORMATS


def is_gguf_format(fmt: str) -> bool:
    return fmt in GGUF_FORMATS or fmt in GGUF_MIXES


def gguf_file_tag(fmt: str) -> str:
    """The type tag in output file names: `Q8_0`, `Q4_K_M`, `BF16`."""
    return fmt.upper()
