"""Q4_0 / Q4_1 / Q5_0 / Q5_1 / IQ4_NL / Q4_K / Q5_K / Q6_K (and Q8_0): byte-exact against ggml,
decoders exact against gguf-py."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from ideoquant.codecs.ggml import fused_kernel as kquant_fused
from ideoquant.codecs.ggml import kquants as kq
from ideoquant.codecs.ggml import scale_search as ss
from ideoquant.codecs.ggml.registry import GGML_TYPES, ggml_type

from .conftest import clear_native_kernels

DATA = Path(__file__).parent / "data" / "ggml_quants.npz"
BLOCK32_TYPES = ["Q4_1", "Q5_0", "Q5_1", "IQ4_NL"]
TYPES = ["Q8_0", "Q4_0", *BLOCK32_TYPES, "Q4_K", "Q5_K", "Q6_K"]
IMATRIX_TYPES = ["Q4_0", *BLOCK32_TYPES, "Q4_K", "Q5_K", "Q6_K"]
QUANT_TYPES = ["Q4_0", *BLOCK32_TYPES, "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def ref():
    with np.load(DATA) as z:
        return {k: z[k] for k in z.files}


def _reference_keys() -> list[tuple[int, str, str, str]]:
    with np.load(DATA) as z:
        files = set(z.files)
    cases = sorted({k.split("/")[1] for k in files if k.count("/") == 2})
    out = []
    for n in (256, 512):
        for case in cases:
            for t in TYPES:
                for path in ("", "+imatrix_ones", "+imatrix_random"):
                    if f"n{n}/{case}/{t}{path}" in files:
                        out.append((n, case, t, path))
    return out


REFERENCE_KEYS = _reference_keys()


def _first_difference(got: np.ndarray, want: np.ndarray, type_size: int) -> str:
    bad = np.argwhere(got != want)
    r, c = (int(v) for v in bad[0])
    return (
        f"{len(bad)} of {want.size} bytes differ; first at row {r} byte {c} "
        f"(block {c // type_size}, offset {c % type_size}): got {got[r, c]}, ggml wrote {want[r, c]}"
    )


def _imatrix(ref, n: int, path: str) -> torch.Tensor | None:
    if path == "":
        return None
    if path == "+imatrix_ones":
        return torch.ones(n)
    return torch.from_numpy(ref[f"n{n}/imatrix_random"])


def test_reference_data_is_complete():
    assert len(REFERENCE_KEYS) == 2 * 14 * (1 + 3 * len(IMATRIX_TYPES))


@pytest.mark.parametrize(
    "n,case,qtype,path", REFERENCE_KEYS, ids=[f"n{n}-{c}-{t}{p}" for n, c, t, p in REFERENCE_KEYS]
)
def test_encoder_matches_ggml(ref, n, case, qtype, path):
    cls = ggml_type(qtype)
    rows = torch.from_numpy(ref[f"n{n}/{case}/input"])
    want = ref[f"n{n}/{case}/{qtype}{path}"]
    got = cls.quantize_rows(rows, _imatrix(ref, n, path)).numpy()
    assert got.shape == want.shape
    if not np.array_equal(got, want):
        pytest.fail(f"n{n}/{case}/{qtype}{path}: " + _first_difference(got, want, cls.type_size))


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_quantize_tensor_matches_quantize_rows(ref, qtype):
    """Chunked encoding (several inner chunks, padding) gives the same bytes as one call."""
    cls = ggml_type(qtype)
    rows = torch.from_numpy(np.concatenate([ref[f"n512/{c}/input"] for c in ("gaussian", "outliers", "zeros")]))
    im = torch.from_numpy(ref["n512/imatrix_random"])
    for imatrix in (None, im):
        whole = cls.quantize_rows(rows, imatrix)
        chunked = cls.quantize_tensor(rows, imatrix, chunk_weights=20 * 512)
        assert torch.equal(whole, chunked)
        # per-block weights through quantize_blocks (K-quants and IQ4_NL, whose sigma2 is per
        # block: the same as an imatrix per column)
        if imatrix is not None and (cls.block_size == 256 or qtype == "IQ4_NL"):
            blocks = rows.reshape(-1, cls.block_size)
            w = imatrix.reshape(1, -1).expand(rows.shape[0], -1).reshape(-1, cls.block_size)
            assert torch.equal(cls.quantize_blocks(blocks, w).reshape(rows.shape[0], -1), whole)


# --- decoders ---------------------------------------------------------------------------------


def _gguf_dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    return gguf_quants.dequantize(data, GGMLQuantizationType[qtype]).astype(np.float32)


def _assert_bits_equal(got: torch.Tensor, want: np.ndarray, what: str):
    got_np = got.numpy()
    assert got_np.shape == want.shape, what
    same = got_np.view(np.uint32) == want.view(np.uint32)
    if not same.all():
        i = np.argwhere(~same)[0]
        at = tuple(int(v) for v in i)
        pytest.fail(f"{what}: {int((~same).sum())} values differ, first at {at}: {got_np[at]} vs {want[at]}")


@pytest.mark.parametrize("qtype", TYPES)
def test_decoder_matches_gguf_on_ggml_output(ref, qtype):
    cls = ggml_type(qtype)
    for key in [k for k in ref if k.endswith(f"/{qtype}") or f"/{qtype}+" in k]:
        data = ref[key]
        _assert_bits_equal(cls.dequantize_rows(torch.from_numpy(data)), _gguf_dequantize(data, qtype), key)


def _fp16_fields(qtype: str) -> list[int]:
    return {
        "Q4_0": [0], "Q8_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "IQ4_NL": [0],
        "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    }[qtype]


@pytest.mark.parametrize("qtype", TYPES)
def test_decoder_matches_gguf_on_random_bytes(qtype):
    cls = ggml_type(qtype)
    gen = np.random.default_rng(7)
    data = gen.integers(0, 256, size=(64, 4 * cls.type_size), dtype=np.uint8)
    # random fp16 scales, kept finite (NaN/inf scales are not valid ggml data)
    blocks = data.reshape(-1, cls.type_size)
    for off in _fp16_fields(qtype):
        mags = 10.0 ** gen.integers(-6, 3, blocks.shape[0])
        scales = (gen.standard_normal(blocks.shape[0]) * mags).astype(np.float16)
        blocks[:, off : off + 2] = scales.view(np.uint8).reshape(-1, 2)
    _assert_bits_equal(cls.dequantize_rows(torch.from_numpy(data)), _gguf_dequantize(data, qtype), qtype)


# --- round trip ------------------------------------------------------------------------------


def _rel_error(qtype: str, x: torch.Tensor, imatrix: torch.Tensor | None = None) -> float:
    cls = ggml_type(qtype)
    y = cls.dequantize_rows(cls.quantize_rows(x, imatrix))
    return float((y - x).norm() / x.norm())


def test_round_trip_error_ordering():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2048, generator=gen) * torch.exp(torch.randn(32, 1, generator=gen))
    for imatrix in (None, torch.rand(2048, generator=gen) + 0.5):
        e = {t: _rel_error(t, x, imatrix) for t in QUANT_TYPES}
        assert e["Q6_K"] < e["Q5_K"] < e["Q4_K"] < 0.12, e
        assert e["Q6_K"] < 0.03 and e["Q5_K"] < 0.06, e
        assert e["Q4_0"] < 0.15, e
        assert e["Q5_1"] < e["Q5_0"] < e["IQ4_NL"] < e["Q4_0"], e
        assert e["Q5_1"] < e["Q4_1"] < e["Q4_0"], e


def test_zero_rows_round_trip_to_zero():
    x = torch.zeros(2, 512)
    for t in QUANT_TYPES:
        for imatrix in (None, torch.ones(512)):
            y = ggml_type(t).dequantize_rows(ggml_type(t).quantize_rows(x, imatrix))
            assert torch.equal(y.abs(), x), t


# --- internals: the exactness machinery ------------------------------------------------------


def test_registry_and_geometry():
    geometry = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "IQ4_NL": (32, 18)}
    geometry |= {"Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
    for t, (bs, ts) in geometry.items():
        cls = ggml_type(t)
        assert GGML_TYPES[GGMLQuantizationType[t]] is cls
        assert (cls.block_size, cls.type_size, cls.uses_imatrix) == (bs, ts, True)
    with pytest.raises(ValueError):
        ggml_type("Q4_K").quantize_rows(torch.zeros(1, 300))


def test_sequential_sums_match_a_python_loop():
    """torch.sum as used for ggml's sequential float sums, on shapes big enough to be threaded."""
    gen = torch.Generator().manual_seed(3)
    for cols in (64, 192, ss.col_align() * 40):
        p = torch.randn(33, cols, generator=gen) * torch.exp(torch.randn(33, cols, generator=gen) * 6)
        want = p[0].clone()
        for r in list(range(1, 16)) + list(range(17, 33)):
            want = want + p[r]
        got = ss.sum33(p.clone())
        assert torch.equal(got, want)
        assert torch.equal(ss.sum_rows(p[:13]), ss.loop_sum(p[:13]))
    # shapes the fast path cannot take fall back to the loop
    q = torch.randn(16, 100, generator=gen) * 1e6
    assert torch.equal(ss.sum_rows(q), ss.loop_sum(q))


@pytest.mark.parametrize("qkx3", [False, True])
def test_qkx_fast_path_agrees_with_exact_path(qkx3):
    """The vectorized scale search equals its exact (bitwise nearest_int, looped sums) variant."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 256, generator=gen) * 0.05
    x[:8] = x[:8].abs() + 0.3  # positive blocks
    x[8:16] = -(x[8:16].abs()) - 0.3  # negative blocks
    x[16:20, ::7] = 0.0
    X34 = kq._superblocks_pos_major(x, 32, 34)
    X = X34[1:].reshape(33, -1)
    data = ss.ungap33(X)
    W = X.abs() + 0.01
    sum_w, sum_x = ss.sum33(W.clone()), ss.sum33(W * X)
    args = (X, W, data.amin(0), data.amax(0), sum_w, sum_x, 15, -0.9, 0.05, 36, qkx3)
    fast, _ = ss.make_qkx(*args)
    exact, _ = ss.make_qkx(*args, exact=True)
    assert torch.equal(fast.scale, exact.scale)
    assert torch.equal(fast.the_min, exact.the_min)
    assert torch.equal(ss.qkx_levels(X, fast, 15, qkx3, False), ss.qkx_levels(X, exact, 15, qkx3, True))


def test_nearest_int_emulation():
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.49999, -7.5, 4194303.0, 1e9, float("inf")])
    want = [0, 2, 2, 0, -2, 3, -8, 4194303]
    assert ss.nearest_int_bits(v)[:8].tolist() == want
    # outside the trick's range ggml gets wrapped garbage, not a saturated value
    assert ss.nearest_int_bits(v)[8].item() != 1_000_000_000


needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="the compiled kernels need a C++ compiler"
)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K"])
def test_flagged_blocks_are_redone_exactly(ref, qtype, monkeypatch):
    """Blocks the fast path cannot vouch for go through the exact path: same bytes here (the
    array search; the compiled fit has its own test below)."""
    monkeypatch.setattr(kq, "fused_k32", lambda: None)
    rows = torch.from_numpy(ref["n512/heavy_tailed/input"])
    im = torch.from_numpy(ref["n512/imatrix_random"])
    want = [ggml_type(qtype).quantize_rows(rows, imatrix) for imatrix in (None, im)]
    real = ss.make_qkx
    calls = []

    def flag_every_other(*args, exact=False):
        res, flagged = real(*args, exact=exact)
        if not exact:
            flagged = flagged.clone()
            flagged[::2] = True
        calls.append(exact)
        return res, flagged

    monkeypatch.setattr(ss, "make_qkx", flag_every_other)
    got = [ggml_type(qtype).quantize_rows(rows, imatrix) for imatrix in (None, im)]
    assert True in calls
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@needs_compiler
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K"])
def test_blocks_the_compiled_fit_flags_are_redone_exactly(ref, qtype, monkeypatch):
    """The compiled fit's flagged blocks go through the exact path: ggml's bytes, with every
    other block flagged."""
    assert kq.fused_k32() is not None
    rows = torch.from_numpy(ref["n512/heavy_tailed/input"])
    im = torch.from_numpy(ref["n512/imatrix_random"])
    real = kquant_fused.k32_fit_cpp
    exact_calls = []

    def flag_every_other(*args):
        out = real(*args)
        out[4, ::2] = 1.0
        return out

    def counting_make_qkx(*args, exact=False):
        exact_calls.append(exact)
        return ss.make_qkx(*args, exact=exact)

    monkeypatch.setattr(kquant_fused, "k32_fit_cpp", flag_every_other)
    monkeypatch.setattr(kq, "make_qkx", counting_make_qkx)
    for imatrix, key in ((None, ""), (im, "+imatrix_random")):
        got = ggml_type(qtype).quantize_rows(rows, imatrix).numpy()
        assert np.array_equal(got, ref[f"n512/heavy_tailed/{qtype}{key}"])
    assert exact_calls and all(exact_calls)


@pytest.mark.parametrize("qtype", TYPES)
def test_decoder_is_device_generic(qtype):
    """No CPU-only constants in the decoders (meta stands in for CUDA)."""
    cls = ggml_type(qtype)
    y = cls.dequantize_rows(torch.empty(3, 2 * cls.type_size, dtype=torch.uint8, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 2 * cls.block_size) and y.dtype == torch.float32


# --- the compiled scale-search kernels (fused_kernel.qkx_search_cpp, qp_search_cpp) ----------



@pytest.fixture
def fresh_fused_caches():
    """Forget which kernels were built and checked, before and after the test."""
    clear_native_kernels()
    yield
    clear_native_kernels()


FUSED_CASES = [(n, t, p, 1) for n in (256, 512) for t in ("Q4_K", "Q5_K") for p in ("", "+imatrix_ones", "+imatrix_random")]
# Two threads split the blocks between OpenMP threads, as conversions do on most machines.
FUSED_CASES += [(512, "Q4_K", "", 2), (512, "Q4_K", "+imatrix_random", 2), (512, "Q5_K", "+imatrix_random", 2)]
# Q4_1 and Q5_1 search with make_qkx3_quants too, through the same kernel.
FUSED_CASES += [(512, t, p, 1) for t in ("Q4_1", "Q5_1") for p in ("+imatrix_ones", "+imatrix_random")]


@needs_compiler
@pytest.mark.parametrize("n,qtype,path,threads", FUSED_CASES, ids=[f"n{n}-{t}{p}-{th}thr" for n, t, p, th in FUSED_CASES])
def test_fused_kernel_matches_ggml(ref, n, qtype, path, threads, monkeypatch):
    """Every ggml reference row, tiled past several inner chunks, encoded through the kernels."""
    torch.set_num_threads(threads)
    try:
        _encode_tiled_through_kernel(ref, n, qtype, path, monkeypatch)
    finally:
        torch.set_num_threads(1)


def _encode_tiled_through_kernel(ref, n, qtype, path, monkeypatch):
    cases = sorted({k.split("/")[1] for k in ref if k.startswith(f"n{n}/") and k.endswith(f"/{qtype}{path}")})
    rows = np.concatenate([ref[f"n{n}/{c}/input"] for c in cases])
    want = np.concatenate([ref[f"n{n}/{c}/{qtype}{path}"] for c in cases])
    reps = -(-3 * ss.INNER_CHUNK_WEIGHTS * torch.get_num_threads() // rows.size)  # three inner chunks at least
    calls = []
    # Q4_K/Q5_K run make_qkx whole through the fit kernel, Q4_1/Q5_1 its candidate loop.
    entry = "k32_fit_cpp" if qtype in ("Q4_K", "Q5_K") else "qkx_search_cpp"
    real = getattr(kquant_fused, entry)
    monkeypatch.setattr(kquant_fused, entry, lambda *a: calls.append(1) or real(*a))
    ss.fused_qkx_search.cache_clear()  # rebuild the partial around the counting wrapper
    try:
        got = ggml_type(qtype).quantize_rows(torch.from_numpy(np.tile(rows, (reps, 1))), _imatrix(ref, n, path)).numpy()
    finally:
        ss.fused_qkx_search.cache_clear()
    assert calls, "the compiled kernel was not used"
    want = np.tile(want, (reps, 1))
    if not np.array_equal(got, want):
        pytest.fail(f"n{n} {qtype}{path} (tiled): " + _first_difference(got, want, ggml_type(qtype).type_size))


def _probe_blocks_with_extremes(blocks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's own probe blocks plus others it does not contain: values near float32's
    largest, denormals, mixed signs of zero, negative weights, a NaN or an infinity."""
    x, w = ss._adversarial_blocks(blocks, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    kind = torch.arange(blocks) % 9
    x[kind == 1] = torch.randn(int((kind == 1).sum()), 32, generator=gen) * 1e37
    x[kind == 2] = torch.randn(int((kind == 2).sum()), 32, generator=gen) * 1e-42  # denormals
    x[kind == 3, ::2] = -0.0
    x[kind == 4, ::3] = 0.0
    w[kind == 5] = -w[kind == 5]
    x[kind == 6, 5] = 3e38
    x[kind == 7, 9] = float("nan")
    x[kind == 8, 30] = float("inf")
    return x, w


@needs_compiler
@pytest.mark.parametrize("seed", [3, 11])
def test_compiled_candidate_loop_matches_the_array_code_bit_for_bit(seed):
    """The C++ candidate loop against the array loop, on blocks the self-check does not see
    (huge, denormal, signed zeros, negative weights, NaN, inf) and a count that ends in a
    partial vector."""
    search = ss.fused_qkx_search()
    assert search is not None
    x, w = _probe_blocks_with_extremes(16 * 97 + 9, seed)
    X, W = ss.gapped33(x.T.contiguous()), ss.gapped33(w.T.contiguous())
    data = ss.ungap33(X)
    sum_w, sum_x = ss.sum33(W.clone()), ss.sum33(W * X)
    for nmax, rmin, rdelta, nstep, qkx3 in ((15, -1.0, 0.1, 20, False), (31, -0.9, 0.05, 36, True)):
        args = (X, W, data.amin(0), data.amax(0), sum_w, sum_x, nmax, rmin, rdelta, nstep, qkx3)
        (got, got_flagged), (want, want_flagged) = (ss.make_qkx(*args, fused=f) for f in (search, False))
        assert torch.equal(got_flagged, want_flagged)
        ok = ~want_flagged
        assert int(ok.sum()) > x.shape[0] // 2
        for a, b in zip((got.scale, got.the_min, got.l_iscale, got.l_min), (want.scale, want.the_min, want.l_iscale, want.l_min)):
            assert torch.equal(a[ok].view(torch.int32), b[ok].view(torch.int32))


@needs_compiler
@pytest.mark.parametrize("rows,nmax", [(8, 63), (16, 15), (5, 7)])
def test_compiled_make_qp_matches_the_array_code_bit_for_bit(rows, nmax):
    """make_qp_quants through the C++ kernel and through the array code, on every kind of probe
    block, including the extremes above (scales and mins are non-negative in the encoders, but
    the kernel must not depend on it), NaN aside."""
    assert ss.fused_qp_step(rows) is not None
    x, w = _probe_blocks_with_extremes(16 * 61 + 3, 5)
    x, w = x[:, :rows].T.contiguous(), w[:, :rows].T.contiguous()
    x[:, ::2] = x[:, ::2].abs()
    # No NaN: the scales of a block with a NaN are NaN, and the array code's own max of them
    # depends on the column count (torch's vectorized amax), so there is no one answer.
    x = torch.nan_to_num(x, nan=1.0, posinf=float("inf"), neginf=float("-inf"))
    (s1, l1), (s2, l2) = (ss.make_qp(x, w, nmax, fused=f) for f in (True, False))
    assert torch.equal(s1.view(torch.int32), s2.view(torch.int32)) and torch.equal(l1, l2)


@needs_compiler
@pytest.mark.parametrize("superblocks", [16 * 5 + 7, 3])
def test_compiled_imatrix_weights_match_the_array_code_bit_for_bit(superblocks):
    """Q4_K/Q5_K's importance weights (sigma2 over the super-block, qw*sqrt(sigma2 + x^2) and
    the per-sub-block sums) through the C++ kernel and the array code, on the extreme blocks
    above, NaN aside, and on counts that end in a partial vector of super-blocks."""
    assert kq.fused_imatrix_weights() is not None
    x, w = _probe_blocks_with_extremes(8 * superblocks, 13)
    x = torch.nan_to_num(x, nan=1.0, posinf=float("inf"), neginf=float("-inf")).reshape(superblocks, kq.QK_K)
    w = w.reshape(superblocks, kq.QK_K)
    X34, W34 = kq._superblocks_pos_major(x, 32, 34), kq._superblocks_pos_major(w, 32, 34)
    got, want = kq.fused_imatrix_weights()(X34, W34), kq._imatrix_weights(X34, W34)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@needs_compiler
@pytest.mark.parametrize("sub,rows", [(32, 34), (32, 33), (16, 16)])
def test_compiled_super_block_layout_is_the_array_code_s(sub, rows):
    """The C++ position-major copy against the array code, on a count that ends mid-tile,
    with the padding rows zero."""
    assert kq.fused_pos_major() is not None
    x = torch.randn(16 * 3 + 5, kq.QK_K, generator=torch.Generator().manual_seed(29))
    got, want = kq.fused_pos_major()(x, sub, rows), kq._superblocks_pos_major_eager(x, sub, rows)
    assert got.shape == want.shape and torch.equal(got, want)
    if sub == 32:
        assert not got[rows - 33 + 16].any()
    # By hand: weight 37 of super-block 5 is position 5 of sub-block 1.
    row = 5 + (rows - 33) if sub == 32 else 37 % 16
    assert got[row, 37 // sub, 5] == x[5, 37]


def test_importance_layout_is_reused_only_for_the_same_unchanged_chunk():
    gen = torch.Generator().manual_seed(31)
    qw = torch.rand(40, kq.QK_K, generator=gen)
    first = kq.importance_layout(qw, 32, 34)
    assert kq.importance_layout(qw, 32, 34) is first  # the same chunk again: reused
    assert torch.equal(first, kq._superblocks_pos_major_eager(qw, 32, 34))
    qw[3, 7] = 5.0  # written in place: laid out again, with the new value
    again = kq.importance_layout(qw, 32, 34)
    assert again is not first and again[1 + 7, 0, 3] == 5.0
    other = qw.clone()  # equal values, another tensor: laid out again
    assert kq.importance_layout(other, 32, 34) is not again
    assert kq.importance_layout(other, 16, 16).shape == (16, 16, 40)  # another layout


def test_imatrix_chunks_of_whole_rows_give_the_bytes_of_one_call_per_row():
    """quantize_rows with an importance vector (chunks of whole rows, the weights tensor and its
    layout reused from chunk to chunk) against each row encoded on its own with the weights
    given explicitly (no reuse possible)."""
    gen = torch.Generator().manual_seed(37)
    rows = torch.randn(300, 18 * kq.QK_K, generator=gen)  # 18 super-blocks per row: not a power of two
    im = torch.rand(18 * kq.QK_K, generator=gen) + 0.1
    for cls in (kq.Q4_K, kq.Q6_K):
        got = cls.quantize_rows(rows, im)
        want = torch.stack([cls.quantize_blocks(r, im).reshape(-1) for r in rows[::37]])
        assert torch.equal(got[::37], want)


# make_qx_quants: Q6_K (both paths), Q4_0 and Q5_0 with an importance matrix.
QX_CASES = [k for k in REFERENCE_KEYS if k[2] == "Q6_K" or (k[2] in ("Q4_0", "Q5_0") and k[3])]


@needs_compiler
def test_make_qx_through_the_compiled_kernel_matches_ggml(ref, monkeypatch):
    """Every vector whose encoder runs make_qx_quants, with the C++ kernels counted (a fallback
    to the array code cannot pass unseen): 16-weight sub-blocks position-major, 32-weight
    blocks on their rows."""
    from ideoquant.codecs.ggml import blocks32

    assert ss.fused_qx() is not None and blocks32.fused_qx_rows() is not None
    rows = []
    real, real_rows = kquant_fused.qx_search_cpp, kquant_fused.qx_rows_cpp
    monkeypatch.setattr(kquant_fused, "qx_search_cpp", lambda *a: rows.append(a[1].shape[0]) or real(*a))
    monkeypatch.setattr(kquant_fused, "qx_rows_cpp", lambda *a: rows.append(32) or real_rows(*a))
    for n, case, qtype, path in QX_CASES:
        got = ggml_type(qtype).quantize_rows(torch.from_numpy(ref[f"n{n}/{case}/input"]), _imatrix(ref, n, path)).numpy()
        assert np.array_equal(got, ref[f"n{n}/{case}/{qtype}{path}"]), f"n{n} {case} {qtype}{path}"
    assert {16, 32} <= set(rows)


@pytest.mark.parametrize("block_major_kernel", [False, True])
def test_make_qx_array_code_matches_ggml(ref, monkeypatch, block_major_kernel):
    """The array code alone, and 32-weight blocks through the position-major kernel (the route
    where only the row kernel fails its check)."""
    from ideoquant.codecs.ggml import blocks32

    monkeypatch.setattr(blocks32, "fused_qx_rows", lambda: None)
    if not block_major_kernel:
        monkeypatch.setattr(ss, "fused_qx", lambda: None)
    for n, case, qtype, path in QX_CASES[::5]:
        got = ggml_type(qtype).quantize_rows(torch.from_numpy(ref[f"n{n}/{case}/input"]), _imatrix(ref, n, path)).numpy()
        assert np.array_equal(got, ref[f"n{n}/{case}/{qtype}{path}"]), f"n{n} {case} {qtype}{path}"


@needs_compiler
def test_fused_kernel_matches_eager_search_bit_for_bit():
    """The self-check the encoder runs before trusting the kernel, on blocks that probe the edges."""
    kernel = kquant_fused.compiled_qkx_search()
    assert kernel is not None
    assert ss.fused_matches_eager(functools.partial(kquant_fused.qkx_search_cpp, kernel))


def test_a_kernel_that_disagrees_is_not_used(ref, fresh_fused_caches, monkeypatch, caplog):
    real = kquant_fused.qkx_search_cpp

    def off_by_one_ulp(*args):
        out = real(*args)
        out[1] = torch.nextafter(out[1], torch.full_like(out[1], float("inf")))
        return out

    monkeypatch.setattr(kquant_fused, "qkx_search_cpp", off_by_one_ulp)
    assert ss.fused_qkx_search() is None
    assert "fused K-quant kernel not used" in caplog.text
    # the eager search gives ggml's bytes
    reps = 2 * ss.INNER_CHUNK_WEIGHTS // (24 * 512) + 1  # 24 rows of 2 super-blocks each
    rows = torch.from_numpy(np.tile(ref["n512/gaussian/input"], (reps, 1)))
    assert np.array_equal(kq.Q4_K.quantize_rows(rows).numpy(), np.tile(ref["n512/gaussian/Q4_K"], (reps, 1)))


def test_missing_compiler_named_by_cxx_falls_back(fresh_fused_caches, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("IDEOQUANT_KERNEL_CACHE", str(tmp_path / "cache"))
    assert kquant_fused.search_library() is None
    assert "no C++ compiler" in caplog.text and "no-such-compiler" in caplog.text


@needs_compiler
def test_kernels_are_built_once_and_then_loaded_from_the_cache(fresh_fused_caches, monkeypatch, tmp_path):
    """The first process builds the library into the cache; later ones only load it (the
    compiler is asked for its version, never to compile); another source is another file."""
    real = shutil.which("c++") or shutil.which("g++")
    calls = tmp_path / "calls.txt"
    logging_cxx = _fake_compiler(tmp_path / "logging-c++", f'echo "$@" >> "{calls}"; exec "{real}" "$@"')
    monkeypatch.setenv("CXX", str(logging_cxx))
    cache = tmp_path / "cache"
    monkeypatch.setenv("IDEOQUANT_KERNEL_CACHE", str(cache))

    def compiles() -> int:
        return sum("-shared" in line for line in calls.read_text().splitlines())

    assert kquant_fused.search_library() is not None and compiles() == 1
    built = sorted(p.name for p in cache.iterdir())
    assert len(built) == 1 and built[0].startswith("scale_search-") and built[0].endswith(".so")
    kquant_fused.search_library.cache_clear()
    assert kquant_fused.search_library() is not None and compiles() == 1
    assert ss.fused_qkx_search() is not None  # the loaded library passes the self-check
    kquant_fused.build_native_library("other", kquant_fused.SEARCH_SOURCE + "\n/* changed */\n")
    assert compiles() == 2 and len(list(cache.iterdir())) == 2


def test_fused_kernel_can_be_switched_off(fresh_fused_caches, monkeypatch):
    monkeypatch.setenv("IDEOQUANT_FUSED", "0")
    assert kquant_fused.search_library() is None
    assert ss.fused_qkx_search() is None and ss.fused_qp_step(8) is None


def _fake_compiler(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def test_build_failure_falls_back_to_eager(ref, fresh_fused_caches, monkeypatch, caplog, tmp_path):
    broken = _fake_compiler(tmp_path / "broken-c++", 'echo "fatal error: immintrin.h: not found" >&2; exit 1')
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv("IDEOQUANT_KERNEL_CACHE", str(tmp_path / "cache"))
    assert kquant_fused.search_library() is None
    assert "broken-c++ failed: fatal error: immintrin.h: not found" in caplog.text
    assert not list((tmp_path / "cache").iterdir())  # no half-built library left behind
    assert ss.fused_qkx_search() is None and ss.fused_qp_step(8) is None
    rows = torch.from_numpy(ref["n512/gaussian/input"])
    assert np.array_equal(kq.Q4_K.quantize_rows(rows, _imatrix(ref, 512, "+imatrix_random")).numpy(), ref["n512/gaussian/Q4_K+imatrix_random"])
