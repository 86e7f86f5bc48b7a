"""The pieces behind Q4_1 / Q5_0 / Q5_1 / IQ4_NL that the ggml vectors exercise only partly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from ideoquant.codecs.ggml import blocks32 as b32
from ideoquant.codecs.ggml import fused_kernel, iq4, ref32_kernel
from ideoquant.codecs.ggml.registry import ggml_type

from .conftest import clear_native_kernels


def _best_index_int8_c(x: np.float32) -> int:
    """ggml's best_index_int8(16, kvalues_iq4nl, x), step by step in float32."""
    val = [np.float32(v) for v in iq4.KVALUES_IQ4NL]
    if x <= val[0]:
        return 0
    if x >= val[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(x - val[mu - 1]) < np.float32(val[mu] - x) else mu


def test_iq4_index_is_ggml_best_index_near_every_midpoint():
    """The table lookup equals the binary search plus float32 tie test, ulp by ulp around
    every midpoint (where rounding could matter), at the ends, and on random values."""
    xs = []
    for a, b in zip(iq4.KVALUES_IQ4NL[:-1], iq4.KVALUES_IQ4NL[1:]):
        m = np.float32((a + b) / 2)
        lo = hi = m
        for _ in range(40):
            lo, hi = np.nextafter(lo, np.float32(-1e9)), np.nextafter(hi, np.float32(1e9))
            xs += [lo, hi]
        xs += [m, np.float32(a), np.float32(b)]
    xs += [np.float32(v) for v in (-1e30, -200.0, -127.0, 0.0, -0.0, 113.0, 500.0, 1e30, np.inf, -np.inf, np.nan)]
    xs += list(np.random.default_rng(0).uniform(-140, 140, 2000).astype(np.float32))
    x = np.array(xs, dtype=np.float32)
    want = [_best_index_int8_c(v) for v in x]
    got = iq4.iq4_index(torch.from_numpy(x)).tolist()
    assert got == want
    vals = iq4.iq4_value(torch.from_numpy(x[np.isfinite(x)])).numpy()
    assert np.array_equal(vals, np.array(iq4.KVALUES_IQ4NL, dtype=np.float32)[np.array(want)[np.isfinite(x)]])


def test_row_sum_squares_is_sequential():
    """sum_x2 += x*x from the first weight to the last, as ggml does (not pairwise)."""
    gen = torch.Generator().manual_seed(2)
    for m in (3, 200):  # below and above a thread's column share
        x = torch.randn(m, 96, generator=gen) * torch.exp(torch.randn(m, 96, generator=gen) * 4)
        want = torch.zeros(m)
        for j in range(96):
            want = want + x[:, j] * x[:, j]
        assert torch.equal(b32.row_sum_squares(x), want)


def test_fifth_bit_packing_matches_gguf_reader():
    """Q5_0 bytes built from known levels decode (by gguf-py) to exactly those levels."""
    gen = np.random.default_rng(4)
    L = gen.integers(0, 32, size=(50, 32)).astype(np.uint8)
    Lt = torch.from_numpy(L)
    d = np.float16(0.5)
    blocks = torch.cat(
        [torch.from_numpy(np.full((50, 1), d).view(np.uint8).reshape(50, 2)), b32._fifth_bits(Lt), b32._nibbles(Lt)], dim=1
    )
    decoded = gguf_quants.dequantize(blocks.numpy(), GGMLQuantizationType.Q5_0)
    assert np.array_equal(decoded, (L.astype(np.float32) - 16) * np.float32(d))


def test_quantize_blocks_treats_each_block_as_a_row():
    """With per-block weights the row-sigma types use the block's own mean square."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(40, 32, generator=gen)
    w = torch.rand(40, 32, generator=gen) + 0.1
    for t in ("Q4_1", "Q5_0", "Q5_1"):
        cls = ggml_type(t)
        per_block = cls.quantize_blocks(x, w)
        one_by_one = torch.cat([cls.quantize_rows(x[i : i + 1], w[i]) for i in range(40)])
        assert torch.equal(per_block, one_by_one), t


# --- the compiled IQ4 candidate sums ----------------------------------------------------------

DATA = Path(__file__).parent / "data" / "ggml_quants.npz"
needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="the kernels need a C++ compiler"
)


@needs_compiler
@pytest.mark.parametrize("path", ["", "+imatrix_ones", "+imatrix_random"])
def test_compiled_iq4_search_matches_ggml(path, monkeypatch):
    """Every ggml reference row for IQ4_NL, tiled over several search chunks, through the C++ sums."""
    with np.load(DATA) as z:
        cases = sorted({k.split("/")[1] for k in z.files if k.startswith("n512/") and k.endswith("/IQ4_NL")})
        rows = np.concatenate([z[f"n512/{c}/input"] for c in cases])
        want = np.concatenate([z[f"n512/{c}/IQ4_NL{path}"] for c in cases])
        imatrix = {"": None, "+imatrix_ones": torch.ones(512), "+imatrix_random": torch.from_numpy(z["n512/imatrix_random"])}[path]
    reps = -(-20011 * 32 // rows.size) + 1  # several chunks of the encoder
    assert iq4.compiled_candidate_sums() is not None  # built and checked before counting
    used = []
    real = fused_kernel.iq4_sums_cpp
    monkeypatch.setattr(fused_kernel, "iq4_sums_cpp", lambda *a: used.append(1) or real(*a))
    got = ggml_type("IQ4_NL").quantize_rows(torch.from_numpy(np.tile(rows, (reps, 1))), imatrix).numpy()
    assert used, "the C++ kernel was not used"
    assert np.array_equal(got, np.tile(want, (reps, 1)))


@needs_compiler
def test_a_compiled_iq4_kernel_that_disagrees_is_not_used(monkeypatch, caplog, fresh_kernels):
    real = fused_kernel.iq4_sums_cpp

    def off_by_one_ulp(*a):
        out = real(*a)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    monkeypatch.setattr(fused_kernel, "iq4_sums_cpp", off_by_one_ulp)
    assert iq4.compiled_candidate_sums() is None
    assert "compiled IQ4 kernel not used" in caplog.text


def test_signed_absmax_takes_the_first_of_tied_magnitudes():
    """ggml keeps the first element whose |x| beats every earlier one: +a before -a wins, and
    -a before +a; all-zero blocks (also -0.0) give +0.0."""
    gen = np.random.default_rng(5)
    x = gen.integers(-3, 4, size=(300, 32)).astype(np.float32)  # many ties
    x[0] = 0.0
    x[1] = -0.0
    x[2, :] = 0.0
    x[2, 5], x[2, 9] = -2.0, 2.0
    want = []
    for row in x:
        amax = mx = np.float32(0.0)
        for v in row:
            if amax < abs(v):
                amax, mx = abs(v), v
        want.append(mx)
    got = b32._signed_absmax(torch.from_numpy(x)).numpy()
    assert np.array_equal(got.view(np.uint32), np.array(want, dtype=np.float32).view(np.uint32))


REF_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def _eager_ref(qtype: str):
    """The eager `_ref` encoder the C++ one replaces."""
    return {"Q4_0": b32._encode_q4_0_ref, "Q8_0": b32._encode_q8_0_ref}.get(qtype) or ggml_type(qtype)._eager_ref_chunks


def _tiled_reference(qtype: str, blocks: int, path: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Every n512 ggml reference input and its `qtype` output (`path`: "" or an importance
    matrix suffix), tiled to at least `blocks` 32-weight blocks."""
    with np.load(DATA) as z:
        cases = sorted({k.split("/")[1] for k in z.files if k.startswith("n512/") and k.endswith(f"/{qtype}")})
        rows = np.concatenate([z[f"n512/{c}/input"] for c in cases])
        want = np.concatenate([z[f"n512/{c}/{qtype}{path}"] for c in cases])
    reps = -(-blocks * 32 // rows.size) + 1
    return np.tile(rows, (reps, 1)), np.tile(want, (reps, 1))


@pytest.fixture
def fresh_kernels():
    """Forget which C++ kernels were built and checked, before and after the test."""
    clear_native_kernels()
    yield
    clear_native_kernels()


@needs_compiler
@pytest.mark.parametrize("qtype", REF_TYPES)
def test_compiled_ref_encoder_matches_ggml(qtype, monkeypatch):
    """ggml's bytes for every reference row, tiled, through the C++ `_ref` encoder (counted)."""
    rows, want = _tiled_reference(qtype, 20011)
    assert ref32_kernel.compiled_encoder(qtype, _eager_ref(qtype)) is not None
    used = []
    real = fused_kernel.ref32_cpp
    monkeypatch.setattr(fused_kernel, "ref32_cpp", lambda *a: used.append(1) or real(*a))
    got = ggml_type(qtype).quantize_rows(torch.from_numpy(rows)).numpy()
    assert used, "the C++ kernel was not used"
    assert np.array_equal(got, want)


def _signed_zero_blocks() -> tuple[torch.Tensor, list[int]]:
    """Blocks whose min is 0 with +0.0 and -0.0 in either order, and ties of +a and -a in
    either order, with ggml's fp16 `m` field (Q4_1/Q5_1) worked out by hand: the first zero."""
    x = torch.zeros(8, 32)
    x[0, 4], x[0, 9] = -0.0, 1.0  # +0.0 first: m = +0
    x[1, 0], x[1, 9] = -0.0, 1.0  # -0.0 first: m = -0 (0x8000)
    x[2, 0] = -0.0  # all zero, -0.0 first
    x[3, 1] = -0.0  # all zero, +0.0 first
    x[4, 3], x[4, 7] = 2.0, -2.0  # +a before -a
    x[5, 3], x[5, 7] = -2.0, 2.0  # -a before +a
    x[6] = torch.linspace(0.0, 3.0, 32)
    x[7] = -torch.linspace(0.0, 3.0, 32)  # max is +0.0 at position 0... and the min -3
    m_bits = [0x0000, 0x8000, 0x8000, 0x0000, None, None, 0x0000, None]
    return x, m_bits


def _ref_encode_counted(qtype: str, x: torch.Tensor, compiled: bool, monkeypatch) -> np.ndarray:
    """quantize_blocks(x) without an importance matrix, with the C++ kernel on or off (and
    whether it ran checked)."""
    if not compiled:
        monkeypatch.setenv("IDEOQUANT_FUSED", "0")
    used = []
    real = fused_kernel.ref32_cpp
    monkeypatch.setattr(fused_kernel, "ref32_cpp", lambda *a: used.append(1) or real(*a))
    ggml_type(qtype).prepare()  # the self-check runs here, before counting
    used.clear()
    got = ggml_type(qtype).quantize_blocks(x).numpy()
    assert bool(used) == compiled
    return got


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_compiler)])
def test_q8_0_rounds_halves_away_and_just_below_half_down(compiled, monkeypatch, fresh_kernels):
    """d = 127/127 = 1, so each code is roundf(x) itself, worked out by hand: halves go away
    from zero, and 0.49999997 (the float just below 0.5, where x + 0.5 would round up to 1)
    goes to 0."""
    below = float(np.nextafter(np.float32(0.5), np.float32(0)))
    values = [127.0, below, -below, 0.5, -0.5, 1.5, -2.5, 126.5, -126.49999, 3.0, 0.0, -0.0]
    want = [127, 0, 0, 1, -1, 2, -3, 127, -126, 3, 0, 0]
    x = torch.zeros(2, 32)
    x[:, : len(values)] = torch.tensor(values)
    got = _ref_encode_counted("Q8_0", x, compiled, monkeypatch)
    assert got[:, 2:].view(np.int8)[:, : len(want)].tolist() == [want, want]
    assert got[0, :2].tolist() == [0x00, 0x3C]  # d = 1.0 in fp16


def _fp16_edge_blocks() -> torch.Tensor:
    """Blocks whose scales land on the edges of fp16: subnormal, the smallest normal, ties
    between neighbouring fp16 values (d exactly halfway, for each type's divisor), the largest
    finite value and beyond, and a spread of magnitudes in between."""
    # (No all-zero block: there gguf's numpy port takes the sign of the first zero, where ggml's
    # max stays +0.0; ggml's own vectors cover zeros.)
    halves = torch.arange(1, 0x7C00, 37, dtype=torch.int16).view(torch.float16).to(torch.float64)
    ties = (halves[:-1] + halves[1:]) / 2  # fp16 midpoints (exact in float32)
    amax = torch.cat([ties, halves, torch.tensor([5.96e-8, 6.1e-5, 65504.0, 65519.0, 65520.0, 7e4, 1e7])])
    gen = torch.Generator().manual_seed(9)
    x = torch.rand(amax.numel(), 32, generator=gen, dtype=torch.float64) * 2 - 1
    x[:, 5] = 1.0
    blocks = []
    for divisor in (127.0, 8.0, 15.0, 16.0, 31.0):
        # Q8_0's d = amax/127, Q4_0's max/-8, Q4_1's (max-min)/15, Q5_0's max/-16, Q5_1's /31.
        blocks.append((x * (amax * divisor).reshape(-1, 1)).to(torch.float32))
    return torch.cat(blocks)


@pytest.mark.parametrize("qtype", REF_TYPES)
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_compiler)])
def test_fp16_headers_round_as_ggml_at_the_edges(qtype, compiled, monkeypatch, fresh_kernels):
    """Scales at fp16 ties, subnormals and overflow: the gguf package's numpy quantizer (ggml's
    reference code ported) gives the same bytes, kernel on and off."""
    x = _fp16_edge_blocks()
    got = _ref_encode_counted(qtype, x, compiled, monkeypatch)
    with np.errstate(all="ignore"):
        want = gguf_quants.quantize(x.numpy(), GGMLQuantizationType[qtype]).reshape(got.shape)
    finite = np.isfinite(want[:, :2].copy().view(np.float16)[:, 0])
    assert finite.sum() > 0.9 * len(finite) and (~finite).sum() > 0
    assert np.array_equal(got[finite], want[finite])
    # Where d overflows fp16 the header is Inf in both (the conversion then names the tensor).
    assert np.array_equal(got[~finite, :2], want[~finite, :2])


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_1"])
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_compiler)])
def test_a_zero_min_keeps_the_sign_of_the_first_zero(qtype, compiled, monkeypatch, fresh_kernels):
    x, m_bits = _signed_zero_blocks()
    got = _ref_encode_counted(qtype, x, compiled, monkeypatch)
    m = got[:, 2].astype(np.int32) | (got[:, 3].astype(np.int32) << 8)
    for i, want in enumerate(m_bits):
        if want is not None:
            assert m[i] == want, f"block {i}: m = {m[i]:#06x}, ggml writes {want:#06x}"
    # d of the all-zero blocks: (max - min)/nmax with max and min the same first zero -> +0
    assert got[2, 0] == 0 and got[2, 1] == 0 and got[3, 0] == 0 and got[3, 1] == 0


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0"])
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_compiler)])
def test_tied_magnitudes_take_the_first_one(qtype, compiled, monkeypatch, fresh_kernels):
    """d = max / -half with max the first element of largest |x|: -a first gives d > 0."""
    x, _ = _signed_zero_blocks()
    got = _ref_encode_counted(qtype, x, compiled, monkeypatch)
    half = 8 if qtype == "Q4_0" else 16
    d = got[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    assert d[4] == np.float32(np.float16(2.0 / -half)) and d[5] == np.float32(np.float16(-2.0 / -half))


@needs_compiler
def test_a_compiled_ref_kernel_that_disagrees_is_not_used(monkeypatch, caplog, fresh_kernels):
    real = fused_kernel.ref32_cpp

    def off_by_one(*a):
        out, d, m = real(*a)
        return out ^ 1, d, m

    monkeypatch.setattr(fused_kernel, "ref32_cpp", off_by_one)
    assert ref32_kernel.compiled_encoder("Q4_1", ggml_type("Q4_1")._eager_ref_chunks) is None
    assert "compiled Q4_1 kernel not used" in caplog.text


@needs_compiler
@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_1"])
def test_compiled_row_importance_weights_give_ggml_bytes(qtype, monkeypatch):
    """The importance weights of the make_qkx3 _impl encoders (sigma2 over the whole row)
    through the C++ kernel, counted: every importance-matrix vector of the type, byte for
    byte (Q4_0 and Q5_0 make theirs inside their search kernel, below)."""
    assert b32.fused_row_weights() is not None
    calls = []
    real = fused_kernel.row_weights_cpp
    monkeypatch.setattr(fused_kernel, "row_weights_cpp", lambda *a: calls.append(1) or real(*a))
    b32.fused_row_weights.cache_clear()
    try:
        with np.load(DATA) as z:
            for key in [k for k in z.files if k.endswith(f"/{qtype}+imatrix_random") or k.endswith(f"/{qtype}+imatrix_ones")]:
                n, case = key.split("/")[:2]
                imatrix = torch.ones(int(n[1:])) if key.endswith("ones") else torch.from_numpy(z[f"{n}/imatrix_random"])
                got = ggml_type(qtype).quantize_rows(torch.from_numpy(z[f"{n}/{case}/input"]), imatrix).numpy()
                assert np.array_equal(got, z[key]), key
    finally:
        b32.fused_row_weights.cache_clear()
    assert calls, "the compiled kernel was not used"


@needs_compiler
@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0"])
@pytest.mark.parametrize("path", ["+imatrix_ones", "+imatrix_random"])
def test_compiled_row_qx_search_matches_ggml(qtype, path, monkeypatch):
    """Q4_0 and Q5_0 with an importance matrix: ggml's bytes with the importance weights and
    make_qx_quants run by one C++ kernel on the rows as they lie (its calls counted after its
    self-check)."""
    assert b32.fused_qx_rows() is not None
    rows, want = _tiled_reference(qtype, 3 * 4096 + 5, path)
    with np.load(DATA) as z:
        imatrix = torch.ones(512) if path == "+imatrix_ones" else torch.from_numpy(z["n512/imatrix_random"])
    used = []
    real = fused_kernel.qx_rows_cpp
    monkeypatch.setattr(fused_kernel, "qx_rows_cpp", lambda *a: used.append(1) or real(*a))
    got = ggml_type(qtype).quantize_rows(torch.from_numpy(rows), imatrix).numpy()
    assert used, "the compiled kernel was not used"
    assert np.array_equal(got, want)
