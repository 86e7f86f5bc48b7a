"""ggml's own encoder (`libggml-base.so`) through ctypes, shared by the benchmarks that time it."""

from __future__ import annotations

import ctypes


def load_ggml(lib_path: str) -> ctypes.CDLL:
    """libggml-base.so with the signatures of ggml_quantize_chunk and ggml_row_size declared."""
    lib = ctypes.CDLL(lib_path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib
