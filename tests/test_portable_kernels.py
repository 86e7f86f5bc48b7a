"""The C++ kernels built for CPUs without AVX-512 give ggml's bytes too: 8 blocks per vector
on AVX (what most desktop CPUs run), 4 with SSE only (as on NEON), instead of 16.

The encoder and error tests, which hold the kernels to ggml's own outputs
(`tests/data/ggml_quants.npz`) and assert that each kernel passed its self-check, run again
in a child process whose compiler is told to leave AVX-512 (or all of AVX) out."""

from __future__ import annotations

import os
import platform
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
KERNEL_TESTS = ["test_ggml_blocks32.py", "test_ggml_kquants.py", "test_ggml_lowbit.py", "test_error_sums.py"]


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AVX is an x86 extension")
@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler")
@pytest.mark.parametrize("flag, left_out, lanes", [("-mno-avx512f", "__AVX512F__", 8), ("-mno-avx", "__AVX__", 4)])
def test_kernels_without_wide_vectors_give_ggml_bytes(tmp_path, flag, left_out, lanes):
    wrapper = tmp_path / "c++"
    wrapper.write_text(f'#!/bin/sh\nexec "{_compiler()}" "$@" {flag}\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    probe = subprocess.run([str(wrapper), "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                           capture_output=True, text=True, check=True)
    assert left_out not in probe.stdout  # the child's kernels take the 8- or 4-lane code

    cache = tmp_path / "kernels"
    env = dict(os.environ, CXX=str(wrapper), IDEOQUANT_KERNEL_CACHE=str(cache), IDEOQUANT_FUSED="1")
    built = subprocess.run([sys.executable, "-c", "from ideoquant.codecs.ggml import fused_kernel as f; print(f.search_lanes())"],
                           cwd=TESTS.parent, env=env, capture_output=True, text=True)
    assert built.stdout.strip() == str(lanes), built.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           *(str(TESTS / name) for name in KERNEL_TESTS)],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "not used" not in proc.stdout + proc.stderr  # no kernel fell back to the eager code
    assert list(cache.glob("scale_search-*")), "the child built its own kernels"
