"""Native kernels: C++ sources built once with the system compiler, cached on disk, loaded
through ctypes.

A kernel source is compiled with IEEE float32 semantics (`NATIVE_FLAGS`) into a shared
library under `kernel_cache_dir()`, named by a hash of the source, the compiler, its flags
and the CPU, so that later processes only load it. Every user checks its kernels against
eager torch code before trusting them and falls back to that code where a kernel cannot be
built or differs; IDEOQUANT_FUSED=0 turns the kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path


def fused_requested() -> bool:
    """Whether the environment allows the native kernels (IDEOQUANT_FUSED=0 turns them off)."""
    return os.environ.get("IDEOQUANT_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def failure_reason(exc: BaseException) -> str:
    """A kernel's build or self-check failure in one line, for the warning that it is not used."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# IEEE float32 semantics: no -ffast-math, and no fused multiply-adds (GCC contracts a*b + c
# into one by default wherever -march allows it, which changes the rounding).
NATIVE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-fast-math",
                "-std=c++17", "-fPIC", "-shared")


def kernel_cache_dir() -> Path:
    """Where built kernels are kept: $IDEOQUANT_KERNEL_CACHE, else $XDG_CACHE_HOME (or
    ~/.cache) /ideoquant/kernels."""
    explicit = os.environ.get("IDEOQUANT_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ideoquant" / "kernels"


def _cpu_identity() -> str:
    """The CPU's model and feature flags (a library built with -march=native runs only on a
    CPU that has them), or the platform's name where /proc/cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            lines = [ln for ln in fh.read().splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def build_native_library(name: str, source: str) -> ctypes.CDLL:
    """`source` compiled with the system C++ compiler ($CXX, else c++) into a shared library
    and loaded; kept under `kernel_cache_dir()` by a hash of the source, the compiler, its
    flags and the CPU, so that later processes only load it. Concurrent builds are safe: each
    writes its own temporary file and renames it into place. Raises RuntimeError on failure."""
    wanted = os.environ.get("CXX")
    compiler = shutil.which(wanted) if wanted else shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({wanted!r} from $CXX)" if wanted else "no C++ compiler (c++, g++) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([source, compiler, version, *NATIVE_FLAGS, _cpu_identity()]).encode()).hexdigest()
    cache = kernel_cache_dir()
    target = cache / f"{name}-{key[:24]}.so"
    if not target.is_file():
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, src_path = tempfile.mkstemp(suffix=".cpp", dir=cache)
        lib_path = src_path[:-4] + ".so"
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(source)
            proc = subprocess.run([compiler, *NATIVE_FLAGS, src_path, "-o", lib_path], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["exit status %d" % proc.returncode])[0]
                raise RuntimeError(f"{Path(compiler).name} failed: {first}")
            os.replace(lib_path, target)
        finally:
            for leftover in (src_path, lib_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
    return ctypes.CDLL(str(target))
