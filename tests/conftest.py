"""Shared fixtures: small Ideogram-4-shaped checkpoints built on the spot (no downloads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ideoquant.io.synthetic import write_synthetic_pipeline

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests run tiny tensors: one torch thread beats a pool, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory) -> Path:
    """A tiny synthetic pipeline folder in the published FP8 layout (fused names)."""
    out = tmp_path_factory.mktemp("src") / "fp8"
    write_synthetic_pipeline(out, size="tiny", dtype="fp8", layout="fused", seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_fp8_diffusers(tmp_path_factory) -> Path:
    """The same weights with diffusers attention names."""
    out = tmp_path_factory.mktemp("src") / "fp8_diffusers"
    write_synthetic_pipeline(out, size="tiny", dtype="fp8", layout="diffusers", seed=0)
    return out


@pytest.fixture
def edit_source(tmp_path, tiny_fp8):
    """Copy the tiny source and apply an edit to the cond branch's tensors: edit(dict) -> dict."""

    count = iter(range(1000))

    def _edit(fn, branch: str = "transformer") -> Path:
        dst = tmp_path / f"edited{next(count)}"
        shutil.copytree(tiny_fp8, dst)
        f = dst / branch / "diffusion_pytorch_model.safetensors"
        tensors = load_file(f)
        tensors = fn(tensors)
        save_file(tensors, f, metadata={"format": "pt"})
        return dst

    return _edit


def clear_native_kernels() -> None:
    """Forget every C++ kernel built and checked in this process (the library and each
    self-check), so that a test's IDEOQUANT_FUSED setting cannot leak into later tests."""
    from ideoquant.codecs import fp8
    from ideoquant.codecs.ggml import (
        blocks32, error_kernel, fused_kernel, iq4, kquants, kquants23, ref32_kernel, scale_search,
    )

    for cached in (
        fused_kernel.search_library, scale_search.fused_qkx_search, scale_search.fused_qx,
        scale_search.fused_qp_step, kquants.fused_pos_major, kquants.fused_imatrix_weights,
        kquants.fused_k32, kquants23.fused_q3_step, kquants23.fused_qkx16,
        kquants23.fused_k16_weights, kquants23.fused_k16_pack, blocks32.fused_row_weights, blocks32.fused_qx_rows,
        ref32_kernel.compiled_encoder, error_kernel.compiled_error_sums, iq4.compiled_candidate_sums,
        fp8.compiled_fp8_decoder,
    ):
        cached.cache_clear()


def gguf_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.gguf"))
