"""ggml tensor types: float32 rows to ggml block bytes and back, one small class per type."""

from .base import GGMLType
from .registry import GGML_TYPES, ggml_type

__all__ = ["GGMLType", "GGML_TYPES", "ggml_type"]
