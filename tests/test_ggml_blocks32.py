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
from ideoquant.codecs.ggml import iq4
from ideoquant.codecs.ggml.registry import ggml_type


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
    shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile needs a C++ compiler"
)


@needs_compiler
@pytest.mark.parametrize("path", ["", "+imatrix_ones", "+imatrix_random"])
def test_compiled_iq4_search_matches_ggml(path, monkeypatch):
    """Every ggml reference row for IQ4_NL, tiled to fill whole buckets, through the compiled sums."""
    with np.load(DATA) as z:
        cases = sorted({k.split("/")[1] for k in z.files if k.startswith("n512/") and k.endswith("/IQ4_NL")})
        rows = np.concatenate([z[f"n512/{c}/input"] for c in cases])
        want = np.concatenate([z[f"n512/{c}/IQ4_NL{path}"] for c in cases])
        imatrix = {"": None, "+imatrix_ones": torch.ones(512), "+imatrix_random": torch.from_numpy(z["n512/imatrix_random"])}[path]
    reps = -(-iq4.bucket_blocks() * 32 // rows.size) + 1
    used = []
    real = iq4._run
    monkeypatch.setattr(iq4, "_run", lambda step, *a: used.append(step is not iq4.candidate_sums) or real(step, *a))
    got = ggml_type("IQ4_NL").quantize_rows(torch.from_numpy(np.tile(rows, (reps, 1))), imatrix).numpy()
    assert any(used), "the compiled kernel was not used"
    assert np.array_equal(got, np.tile(want, (reps, 1)))


def test_a_compiled_iq4_kernel_that_disagrees_is_not_used(monkeypatch, caplog):
    real = iq4.candidate_sums

    def off_by_one_ulp(x, w, iscales, lut):
        out = real(x, w, iscales, lut)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    iq4.compiled_candidate_sums.cache_clear()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: off_by_one_ulp)
    try:
        assert iq4.compiled_candidate_sums(iq4.bucket_blocks()) is None
        assert "compiled IQ4 kernel not used" in caplog.text
    finally:
        iq4.compiled_candidate_sums.cache_clear()


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
