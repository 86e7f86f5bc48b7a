"""The squared-error kernel a conversion reports each tensor's error with, and the C++ FP8
decoder every conversion reads its source through: both against independent references
(the `gguf` package's numpy decoders, torch's own float8 cast)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from ideoquant.codecs import fp8
from ideoquant.codecs.ggml import error_kernel, fused_kernel
from ideoquant.codecs.ggml.registry import ggml_type
from ideoquant.export.error_meter import ErrorMeter

from .conftest import clear_native_kernels

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="the kernels need a C++ compiler"
)
ERROR_TYPES = list(fused_kernel.ERROR_KINDS)


@pytest.fixture
def fresh_kernels():
    clear_native_kernels()
    yield
    clear_native_kernels()


def _gguf_sums(qtype: str, data: torch.Tensor, rows: torch.Tensor) -> tuple[float, float]:
    """The sums worked out from the gguf package's own decode, in float64."""
    y = gguf_quants.dequantize(data.numpy(), GGMLQuantizationType[qtype]).reshape(rows.shape).astype(np.float64)
    x = rows.numpy().astype(np.float64)
    return float(np.square(x - y).sum()), float(np.square(x).sum())


def _rows(qtype: str, m: int = 67, k: int = 512, seed: int = 0) -> torch.Tensor:
    """Weight-like rows with outlier columns and a few all-zero and tiny blocks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 0.02
    x[:, 7] *= 40.0
    x[3, :256] = 0.0
    x[5] *= 1e-6
    return x


@needs_compiler
@pytest.mark.parametrize("qtype", ERROR_TYPES)
def test_error_sums_are_the_gguf_decoders_error(qtype, monkeypatch):
    """On our encoder's blocks and on random bytes: the kernel (counted) gives the sums of the
    gguf package's decode, in float64, to 1e-12."""
    cls = ggml_type(qtype)
    used = []
    real = fused_kernel.error_sums_cpp
    monkeypatch.setattr(fused_kernel, "error_sums_cpp", lambda *a: used.append(1) or real(*a))
    rows = _rows(qtype)
    encoded = cls.quantize_rows(rows)
    noise = torch.randint(0, 256, encoded.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    # Random bytes with finite fp16 fields (the exponent's top bit cleared in each field's high byte).
    for high in error_kernel.FP16_HIGH_BYTES.get(qtype, (1,)):
        noise.view(encoded.shape[0], -1, cls.type_size)[:, :, high] &= 0xBF
    for data in (encoded, noise):
        got = cls.error_sums(data, rows)
        want = _gguf_sums(qtype, data, rows)
        assert got is not None and used
        assert got[0] == pytest.approx(want[0], rel=1e-12) and got[1] == pytest.approx(want[1], rel=1e-12)


@needs_compiler
def test_error_sums_do_not_depend_on_the_thread_count():
    rows = _rows("Q4_K", m=613, k=1024, seed=4)
    data = ggml_type("Q4_K").quantize_rows(rows)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ggml_type("Q4_K").error_sums(data, rows)
        torch.set_num_threads(3)
        three = ggml_type("Q4_K").error_sums(data, rows)
    finally:
        torch.set_num_threads(threads)
    assert one == three


def test_types_without_a_kernel_are_decoded_and_measured():
    """F16 has no error kernel: the meter decodes it, and still gets the gguf package's error."""
    rows = _rows("F16", k=256)
    data = ggml_type("F16").quantize_rows(rows)
    assert ggml_type("F16").error_sums(data, rows) is None
    meter = ErrorMeter("t").add_encoded(ggml_type("F16"), data, rows)
    err, ref = _gguf_sums("F16", data, rows)
    assert meter.relative() == pytest.approx((err / ref) ** 0.5, rel=1e-5)


@needs_compiler
def test_an_error_kernel_that_disagrees_is_not_used(monkeypatch, caplog, fresh_kernels):
    real = fused_kernel.error_sums_cpp
    monkeypatch.setattr(fused_kernel, "error_sums_cpp", lambda *a: (lambda s: (s[0] * 1.001, s[1]))(real(*a)))
    rows = _rows("Q8_0")
    data = ggml_type("Q8_0").quantize_rows(rows)
    assert ggml_type("Q8_0").error_sums(data, rows) is None
    assert "compiled Q8_0 error sums not used" in caplog.text
    err, ref = _gguf_sums("Q8_0", data, rows)
    assert ErrorMeter("t").add_encoded(ggml_type("Q8_0"), data, rows).relative() == pytest.approx((err / ref) ** 0.5, rel=1e-5)


@needs_compiler
def test_a_non_finite_decode_is_named_by_the_exact_path():
    """A Q8_0 block whose fp16 scale overflows decodes to Inf: the sums are not trusted, the
    decoded values are checked, and the error names the tensor."""
    rows = _rows("Q8_0")
    rows[2, 64:96] = 1e7  # d = 1e7/127 > 65504: Inf in fp16
    data = ggml_type("Q8_0").quantize_rows(rows)
    sums = ggml_type("Q8_0").error_sums(data, rows)
    assert sums is not None and not np.isfinite(sums[0])
    from ideoquant.errors import IdeoquantError

    with pytest.raises(IdeoquantError, match="tensor t: 32 values overflow Q8_0"):
        ErrorMeter("t", "Q8_0").add_encoded(ggml_type("Q8_0"), data, rows)


# --- FP8 ------------------------------------------------------------------------------------------


def _every_code() -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.uint8)
    return codes[(codes & 0x7F) != 0x7F].view(torch.float8_e4m3fn)  # every non-NaN e4m3 value


SCALES = (1.0, 3.5e-3, -2.0, 1e36, 2e36, 1e38, 3.4e38, 1e-40, 1e-45, 0.0)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_compiler)])
def test_fp8_decode_is_torchs_cast_times_the_scale(compiled, monkeypatch, fresh_kernels):
    """Every code, one scale for all and one per row, at the edges of float32: the bits of
    torch's own `w.float() * scale`; the C++ decoder runs when compiled (counted)."""
    if not compiled:
        monkeypatch.setenv("IDEOQUANT_FUSED", "0")
    assert (fp8.compiled_fp8_decoder() is not None) == compiled
    calls = []
    real = fp8._decode_native
    monkeypatch.setattr(fp8, "_decode_native", lambda *a: calls.append(1) or real(*a))
    codes = _every_code()
    for s in SCALES:
        scale = torch.tensor(s, dtype=torch.float32)
        assert torch.equal(fp8.fp8_to_float32(codes, scale).view(torch.int32), (codes.to(torch.float32) * scale).view(torch.int32)), s
    w = codes.reshape(1, -1).repeat(len(SCALES), 1)
    per_row = torch.tensor(SCALES, dtype=torch.float32).reshape(-1, 1)
    assert torch.equal(fp8.fp8_to_float32(w, per_row).view(torch.int32), (w.to(torch.float32) * per_row).view(torch.int32))
    assert bool(calls) == compiled


@needs_compiler
def test_fp8_scales_of_other_shapes_broadcast_as_in_torch():
    """A scale that is neither one value nor one per row is left to torch's broadcasting."""
    w = _every_code()[:240].reshape(16, 15)
    scale = torch.linspace(0.5, 2.0, 15)
    assert torch.equal(fp8.fp8_to_float32(w, scale).view(torch.int32), (w.to(torch.float32) * scale).view(torch.int32))


@needs_compiler
def test_an_fp8_decoder_that_disagrees_is_not_used(monkeypatch, caplog, fresh_kernels):
    real = fp8._decode_native

    def wrong(kernel, w, scale):
        out = real(kernel, w, scale)
        out.view(-1)[5] += 1.0
        return out

    monkeypatch.setattr(fp8, "_decode_native", wrong)
    assert fp8.compiled_fp8_decoder() is None
    assert "compiled FP8 decoder not used" in caplog.text
