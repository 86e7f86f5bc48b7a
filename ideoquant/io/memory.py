"""Process-wide memory settings for streaming conversion."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_freed_memory(limit_bytes: int = 512 << 20) -> bool:
    """Let glibc keep freed chunk buffers for reuse instead of returning them to the kernel.

    Every chunk of a conversion allocates tens of MB of temporaries; by default glibc maps
    each one fresh and unmaps it on free, and the page faults of the next map cost more than
    the arithmetic. Returns False where the C library is not glibc (nothing changes there).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, limit_bytes))
