"""Q2_K / Q3_K / IQ4_XS: byte-exact against ggml's own output, decoders exact against gguf-py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from ideoquant.codecs.ggml import fused_kernel, iq4, kquants23, scale_search
from ideoquant.codecs.ggml.registry import ggml_type

from .conftest import clear_native_kernels

DATA = Path(__file__).parent / "data" / "ggml_quants.npz"
TYPES = ["Q2_K", "Q3_K", "IQ4_XS"]
PATHS = ("", "+imatrix_ones", "+imatrix_random")


@pytest.fixture(scope="module")
def ref():
    with np.load(DATA) as z:
        return {k: z[k] for k in z.files}


def _reference_keys() -> list[tuple[int, str, str, str]]:
    with np.load(DATA) as z:
        files = set(z.files)
    cases = sorted({k.split("/")[1] for k in files if k.count("/") == 2})
    return [
        (n, case, t, path)
        for n in (256, 512)
        for case in cases
        for t in TYPES
        for path in PATHS
        if f"n{n}/{case}/{t}{path}" in files
    ]


REFERENCE_KEYS = _reference_keys()


def _imatrix(ref, n: int, path: str) -> torch.Tensor | None:
    if path == "":
        return None
    if path == "+imatrix_ones":
        return torch.ones(n)
    return torch.from_numpy(ref[f"n{n}/imatrix_random"])


def test_reference_data_covers_every_case():
    # 2 widths x 14 cases x 3 types x (plain, ones, random)
    assert len(REFERENCE_KEYS) == 2 * 14 * len(TYPES) * len(PATHS)


@pytest.mark.parametrize(
    "n,case,qtype,path", REFERENCE_KEYS, ids=[f"n{n}-{c}-{t}{p}" for n, c, t, p in REFERENCE_KEYS]
)
def test_encoder_matches_ggml(ref, n, case, qtype, path):
    cls = ggml_type(qtype)
    rows = torch.from_numpy(ref[f"n{n}/{case}/input"])
    want = ref[f"n{n}/{case}/{qtype}{path}"]
    got = cls.quantize_rows(rows, _imatrix(ref, n, path)).numpy()
    assert got.shape == want.shape
    bad = np.argwhere(got != want)
    if len(bad):
        r, c = (int(v) for v in bad[0])
        pytest.fail(
            f"{len(bad)} bytes differ; first at row {r} byte {c} (block offset {c % cls.type_size}): "
            f"got {got[r, c]}, ggml wrote {want[r, c]}"
        )


@pytest.mark.parametrize("qtype", TYPES)
def test_chunked_encoding_matches_one_call(ref, qtype):
    """Inner chunks, padding and per-block weights give the same bytes as one call."""
    cls = ggml_type(qtype)
    rows = torch.from_numpy(np.concatenate([ref[f"n512/{c}/input"] for c in ("gaussian", "outliers", "zeros")]))
    im = torch.from_numpy(ref["n512/imatrix_random"])
    for imatrix in (None, im):
        whole = cls.quantize_rows(rows, imatrix)
        assert torch.equal(cls.quantize_tensor(rows, imatrix, chunk_weights=20 * 512), whole)
    blocks = rows.reshape(-1, cls.block_size)
    w = im.reshape(1, -1).expand(rows.shape[0], -1).reshape(-1, cls.block_size)
    assert torch.equal(cls.quantize_blocks(blocks, w).reshape(rows.shape[0], -1), cls.quantize_rows(rows, im))


def _gguf_dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    return gguf_quants.dequantize(data, GGMLQuantizationType[qtype]).astype(np.float32)


def _assert_bits_equal(got: torch.Tensor, want: np.ndarray, what: str):
    got_np = got.numpy()
    assert got_np.shape == want.shape, what
    same = got_np.view(np.uint32) == want.view(np.uint32)
    if not same.all():
        at = tuple(int(v) for v in np.argwhere(~same)[0])
        pytest.fail(f"{what}: {int((~same).sum())} values differ, first at {at}: {got_np[at]} vs {want[at]}")


@pytest.mark.parametrize("qtype", TYPES)
def test_decoder_matches_gguf_on_ggml_output(ref, qtype):
    cls = ggml_type(qtype)
    keys = [k for k in ref if k.endswith(f"/{qtype}") or f"/{qtype}+" in k]
    assert keys
    for key in keys:
        data = ref[key]
        _assert_bits_equal(cls.dequantize_rows(torch.from_numpy(data)), _gguf_dequantize(data, qtype), key)


_FP16_FIELDS = {"Q2_K": [80, 82], "Q3_K": [108], "IQ4_XS": [0]}


@pytest.mark.parametrize("qtype", TYPES)
def test_decoder_matches_gguf_on_random_bytes(qtype):
    cls = ggml_type(qtype)
    gen = np.random.default_rng(11)
    data = gen.integers(0, 256, size=(64, 4 * cls.type_size), dtype=np.uint8)
    blocks = data.reshape(-1, cls.type_size)
    for off in _FP16_FIELDS[qtype]:  # finite fp16 scales (NaN/inf are not valid ggml data)
        mags = 10.0 ** gen.integers(-6, 3, blocks.shape[0])
        scales = (gen.standard_normal(blocks.shape[0]) * mags).astype(np.float16)
        blocks[:, off : off + 2] = scales.view(np.uint8).reshape(-1, 2)
    _assert_bits_equal(cls.dequantize_rows(torch.from_numpy(data)), _gguf_dequantize(data, qtype), qtype)


def test_best_index_is_the_nearest_codebook_level():
    """Against a worked-out rule: nearest level, the upper one on an exact midpoint."""
    values = np.array(iq4.KVALUES_IQ4NL, dtype=np.float32)
    mids = (values[:-1] + values[1:]) / 2
    probes = np.concatenate([values, mids, mids - 0.25, mids + 0.25, [-1000.0, -127.5, 113.5, 1000.0, 0.0]])
    probes = probes.astype(np.float32)
    got = iq4.iq4_index(torch.from_numpy(probes)).numpy()
    dist = np.abs(probes[:, None] - values[None, :])
    nearest = dist.argmin(1)
    # on a tie ggml picks the upper level (`x - lo < hi - x` is false)
    tie = (dist == dist.min(1, keepdims=True)).sum(1) > 1
    nearest[tie] = (dist == dist.min(1, keepdims=True))[tie].nonzero()[1].reshape(-1, 2)[:, 1]
    assert np.array_equal(got, nearest)


@pytest.mark.parametrize("qtype,bound", [("Q2_K", 0.45), ("Q3_K", 0.25), ("IQ4_XS", 0.12)])
def test_round_trip_error_is_that_of_the_bit_width(qtype, bound):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1024, generator=gen)
    cls = ggml_type(qtype)
    y = cls.dequantize_rows(cls.quantize_rows(x))
    rel = float((y - x).norm() / x.norm())
    assert 0.0 < rel < bound


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="the kernels need a C++ compiler")
@pytest.mark.parametrize("path", PATHS)
def test_compiled_iq4_xs_search_matches_ggml(ref, path, monkeypatch):
    """Every ggml reference row for IQ4_XS, tiled over several search chunks, through the C++ IQ4 sums."""
    cases = sorted({k.split("/")[1] for k in ref if k.startswith("n512/") and k.endswith("/IQ4_XS")})
    rows = np.concatenate([ref[f"n512/{c}/input"] for c in cases])
    want = np.concatenate([ref[f"n512/{c}/IQ4_XS{path}"] for c in cases])
    reps = -(-20011 * 32 // rows.size) + 1  # several chunks of the encoder
    assert iq4.compiled_candidate_sums() is not None  # built and checked before counting
    used = []
    real = fused_kernel.iq4_sums_cpp
    monkeypatch.setattr(fused_kernel, "iq4_sums_cpp", lambda *a: used.append(1) or real(*a))
    got = ggml_type("IQ4_XS").quantize_rows(torch.from_numpy(np.tile(rows, (reps, 1))), _imatrix(ref, 512, path)).numpy()
    assert used, "the C++ kernel was not used"
    assert np.array_equal(got, np.tile(want, (reps, 1)))


# --- the compiled short-block kernels (make_q3_quants, make_qp_quants) -----------------------

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="the compiled kernels need a C++ compiler"
)


@pytest.fixture
def fresh_short_kernels():
    """Forget which short-block kernels were compiled and checked, before and after the test."""
    clear_native_kernels()
    yield
    clear_native_kernels()


def _assert_matches_vectors(ref, cases):
    for n, case, qtype, path in cases:
        got = ggml_type(qtype).quantize_rows(torch.from_numpy(ref[f"n{n}/{case}/input"]), _imatrix(ref, n, path)).numpy()
        assert np.array_equal(got, ref[f"n{n}/{case}/{qtype}{path}"]), f"n{n} {case} {qtype}{path}"


# Q3_K without an importance matrix runs make_q3_quants; Q2_K, Q4_K and Q5_K with one run make_qp_quants.
SHORT_KERNEL_CASES = [k for k in REFERENCE_KEYS if (k[2], k[3]) in (("Q3_K", ""), ("Q2_K", "+imatrix_random"))]


@needs_compiler
def test_short_block_kernels_are_compiled_and_exact_here():
    """The self-checks the encoders run before trusting the kernels (adversarial blocks)."""
    assert kquants23.fused_q3_step() is not None
    assert scale_search.fused_qp_step(8) is not None  # Q4_K / Q5_K scales and mins
    assert scale_search.fused_qp_step(16) is not None  # Q2_K scales and mins
    assert kquants23.fused_qkx16() is not None  # Q2_K's make_qkx on 16-weight sub-blocks


@needs_compiler
@pytest.mark.parametrize("seed", [1, 2])
def test_compiled_make_q3_matches_the_array_code_on_blocks_that_refine_five_times(seed):
    """Uniform blocks (not among the self-check's seeds), where a few blocks in a thousand
    still change in the fifth refinement pass."""
    step = kquants23.fused_q3_step()
    assert step is not None
    x = torch.rand((16, 60000), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    scale, L = kquants23.make_q3(x, 4, fused=False)
    assert torch.equal(step(x, kquants23._q3_consts(4)).view(torch.int32), torch.cat([scale.unsqueeze(0), L]).view(torch.int32))


Q2_K_CASES = [k for k in REFERENCE_KEYS if k[2] == "Q2_K"]


@needs_compiler
def test_q2_k_through_the_compiled_search_matches_ggml(ref, fresh_short_kernels, monkeypatch):
    """Every Q2_K vector, without and with an importance matrix, with make_qkx on 16-weight
    sub-blocks running through the C++ kernel (counted, so a fallback cannot pass unseen)."""
    calls = []
    real = fused_kernel.qkx16_fit_cpp
    monkeypatch.setattr(fused_kernel, "qkx16_fit_cpp", lambda *a: calls.append(a[4:]) or real(*a))
    _assert_matches_vectors(ref, Q2_K_CASES)
    assert {(3, False, True), (3, True, False)} <= set(calls)  # (nmax, qkx3, use_mad): both searches


@needs_compiler
def test_q2_k_q3_k_importance_weights_through_the_compiled_kernel_match_ggml(ref, fresh_short_kernels, monkeypatch):
    """Every Q2_K and Q3_K vector with an importance matrix, its weights from the C++ kernel
    (counted with its sigma2 factor: 1 for Q2_K, 2 for Q3_K, so a fallback cannot pass unseen)."""
    calls = []
    real = fused_kernel.k16_weights_cpp
    monkeypatch.setattr(fused_kernel, "k16_weights_cpp", lambda *a: calls.append(a[3]) or real(*a))
    cases = [k for k in REFERENCE_KEYS if k[2] in ("Q2_K", "Q3_K") and "imatrix" in k[3]]
    assert cases
    _assert_matches_vectors(ref, cases)
    assert {1.0, 2.0} <= set(calls)


@needs_compiler
def test_q2_k_q3_k_final_levels_through_the_compiled_packing_match_ggml(ref, fresh_short_kernels, monkeypatch):
    """Every Q2_K and Q3_K vector, without and with an importance matrix, its final levels and
    packing from the C++ kernel (counted per type, so a fallback cannot pass unseen)."""
    calls = []
    real = fused_kernel.k16_pack_cpp
    monkeypatch.setattr(fused_kernel, "k16_pack_cpp", lambda *a: calls.append(a[1]) or real(*a))
    assert kquants23.fused_k16_pack() is not None  # its self-check runs here, before counting
    calls.clear()
    cases = [k for k in REFERENCE_KEYS if k[2] in ("Q2_K", "Q3_K")]
    assert {k[3] for k in cases} >= {"", "+imatrix_ones", "+imatrix_random"}
    _assert_matches_vectors(ref, cases)
    assert set(calls) == {False, True}  # Q2_K's and Q3_K's


@needs_compiler
def test_a_packing_kernel_that_disagrees_is_not_used(ref, fresh_short_kernels, monkeypatch, caplog):
    real = fused_kernel.k16_pack_cpp

    def one_bit_off(kernel, q3, X, keep, dj, dmj, out, qs_at):
        real(kernel, q3, X, keep, dj, dmj, out, qs_at)
        out[-1, qs_at] ^= 1

    monkeypatch.setattr(fused_kernel, "k16_pack_cpp", one_bit_off)
    assert kquants23.fused_k16_pack() is None
    assert "compiled Q2_K/Q3_K level packing not used" in caplog.text
    _assert_matches_vectors(ref, [k for k in REFERENCE_KEYS if k[2] in ("Q2_K", "Q3_K")][:8])


def test_q2_k_q3_k_importance_weights_eager_match_ggml(ref, fresh_short_kernels, monkeypatch):
    monkeypatch.setenv("IDEOQUANT_FUSED", "0")
    assert kquants23.fused_k16_weights() is None
    _assert_matches_vectors(ref, [k for k in REFERENCE_KEYS if k[2] in ("Q2_K", "Q3_K") and "imatrix" in k[3]])


def test_q2_k_eager_search_matches_ggml(ref, fresh_short_kernels, monkeypatch):
    monkeypatch.setenv("IDEOQUANT_FUSED", "0")
    assert kquants23.fused_qkx16() is None
    _assert_matches_vectors(ref, Q2_K_CASES)


def test_eager_short_block_searches_match_ggml(ref, fresh_short_kernels, monkeypatch):
    """The eager fallbacks of both kernels still write ggml's bytes."""
    monkeypatch.setenv("IDEOQUANT_FUSED", "0")
    assert kquants23.fused_q3_step() is None and scale_search.fused_qp_step(16) is None
    _assert_matches_vectors(ref, SHORT_KERNEL_CASES)
    im = [(n, "gaussian", t, "+imatrix_random") for n in (256, 512) for t in ("Q4_K", "Q5_K")]
    _assert_matches_vectors(ref, im)


def test_a_short_block_kernel_that_disagrees_is_not_used(ref, fresh_short_kernels, monkeypatch, caplog):
    def one_ulp_off(fn):
        def step(*args):
            out = fn(*args)
            out[0] = torch.nextafter(out[0], torch.full_like(out[0], float("inf")))
            return out

        return step

    monkeypatch.setattr(fused_kernel, "q3_search_cpp", one_ulp_off(fused_kernel.q3_search_cpp))
    monkeypatch.setattr(fused_kernel, "qp_search_cpp", one_ulp_off(fused_kernel.qp_search_cpp))
    assert kquants23.fused_q3_step() is None
    assert scale_search.fused_qp_step(16) is None
    assert "compiled q3_quants not used" in caplog.text and "compiled qp_quants not used" in caplog.text
    _assert_matches_vectors(ref, SHORT_KERNEL_CASES[:6])


def test_short_block_build_failure_falls_back_to_eager(ref, fresh_short_kernels, monkeypatch, caplog):
    monkeypatch.setattr(fused_kernel, "compiled_q3", lambda: None)
    monkeypatch.setattr(fused_kernel, "compiled_qkx16", lambda: None)
    assert kquants23.fused_q3_step() is None and kquants23.fused_qkx16() is None
    _assert_matches_vectors(ref, [k for k in SHORT_KERNEL_CASES if k[2] == "Q3_K"][:6] + Q2_K_CASES[:6])
