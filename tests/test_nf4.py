"""NF4 writer against bitsandbytes itself (CPU): bytes, absmax, double quant, state-dict layout."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from ideoquant.codecs import nf4
from ideoquant.errors import IdeoquantError

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

# Measured on gaussian weights: 0.0919 (blocksize 64; 0.0919 with double quant too); bound with some room.
GAUSSIAN_REL_ERROR_BOUND = 0.1


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor, so that comparisons are exact (and -0.0 != 0.0)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert torch.equal(bits(a), bits(b)), f"{int((bits(a) != bits(b)).sum())} of {a.numel()} values differ"


def bnb_nf4(w: torch.Tensor, nested: bool = False):
    return F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)


def assert_matches_bnb(w: torch.Tensor, **kwargs) -> None:
    ref_packed, ref_state = bnb_nf4(w)
    packed, absmax = nf4.quantize_nf4(w, **kwargs)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(packed, ref_packed), f"{int((packed != ref_packed).sum())} bytes differ"
    assert absmax.dtype == torch.float32
    if torch.isnan(ref_state.absmax).any():
        torch.testing.assert_close(absmax, ref_state.absmax, rtol=0, atol=0, equal_nan=True)
    else:
        assert_same_bits(absmax, ref_state.absmax)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------
# constants
# ----------------------------------------------------------------------------------------
def test_codebooks_are_bitsandbytes():
    assert_same_bits(nf4.NF4_CODEBOOK, F.get_4bit_type("nf4", device="cpu"))
    assert_same_bits(nf4.dynamic_quant_map(), F.create_dynamic_map())


# ----------------------------------------------------------------------------------------
# 4-bit bytes and absmax
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape",
    [(96, 128), (40, 512), (12, 4608), (3, 12288), (2, 53248), (7, 100), (3, 33), (5, 13), (1, 1), (1, 64), (130,)],
)
def test_bytes_match_bitsandbytes(shape):
    g = gen(sum(shape))
    w = torch.randn(shape, generator=g) * 0.02
    assert_matches_bnb(w)
    heavy = torch.randn(shape, generator=g) ** 3 * torch.rand(shape[:1] + (1,) * (len(shape) - 1), generator=g)
    assert_matches_bnb(heavy)


def test_small_chunks_and_tail_match():
    g = gen(1)
    w = torch.randn(37, 91, generator=g)  # 3367 weights: 52 whole blocks + a 39-weight tail, odd total
    assert_matches_bnb(w, chunk_weights=128)
    assert_matches_bnb(w, chunk_weights=64)
    assert_matches_bnb(torch.randn(16, 4608, generator=g), chunk_weights=4608 * 3)


def test_half_inputs_and_non_contiguous():
    g = gen(2)
    w = torch.randn(24, 4608, generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        assert_matches_bnb(w.to(dtype), chunk_weights=4096)
    wt = torch.randn(512, 48, generator=g).t()  # [48, 512], not contiguous
    assert not wt.is_contiguous()
    ref_packed, ref_state = bnb_nf4(wt.contiguous())
    for chunk in (1024, 1 << 19):
        packed, absmax = nf4.quantize_nf4(wt, chunk_weights=chunk)
        assert torch.equal(packed, ref_packed)
        assert_same_bits(absmax, ref_state.absmax)
    odd = torch.randn(100, 30, generator=g).t()  # rows that do not hold whole blocks
    ref_packed, ref_state = bnb_nf4(odd.contiguous())
    packed, absmax = nf4.quantize_nf4(odd, chunk_weights=256)
    assert torch.equal(packed, ref_packed)
    assert_same_bits(absmax, ref_state.absmax)


def _thresholds_and_neighbours() -> torch.Tensor:
    mids = (nf4.NF4_CODEBOOK[:-1] + nf4.NF4_CODEBOOK[1:]) / 2
    vals = [nf4.NF4_CODEBOOK, mids]
    up, down = mids.clone(), mids.clone()
    for _ in range(3):
        up = torch.nextafter(up, torch.tensor(2.0))
        down = torch.nextafter(down, torch.tensor(-2.0))
        vals += [up, down]
    return torch.cat(vals)


def test_adversarial_ties_exact_midpoints():
    # Blocks whose absmax is exactly 1 (or a power of two): scaled values land exactly on the
    # float32 midpoints between NF4 levels and on their neighbouring floats.
    vals = _thresholds_and_neighbours()
    vals = vals[torch.randperm(vals.numel(), generator=gen(3))]
    pad = (-vals.numel()) % 63
    vals = torch.cat([vals, torch.zeros(pad)]).view(-1, 63)
    blocks = torch.cat([torch.ones(vals.shape[0], 1), vals], dim=1)  # each block: 1.0 + 63 values
    blocks[::2] *= -1
    for scale in (1.0, 2.0**-7, 2.0**20, 0.02, 3.0, 1e-30):
        assert_matches_bnb(blocks.reshape(-1, 128) * scale)
        assert_matches_bnb(blocks.reshape(-1) * scale)
    # and the midpoint ties survive as ties: they take the LOWER level
    packed, _ = nf4.quantize_nf4(torch.cat([torch.ones(1), (nf4.NF4_CODEBOOK[:-1] + nf4.NF4_CODEBOOK[1:]) / 2]))
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)[:16]
    assert codes.tolist() == [15] + list(range(15))


def test_adversarial_magnitudes():
    n = 64
    rows = [
        torch.zeros(n),  # zeros block
        torch.full((n,), 0.37),  # constant
        torch.full((n,), -5.0),
        torch.tensor([0.0] * 63 + [-1e-3]),  # one nonzero
        torch.full((n,), 3.4e38),  # huge
        torch.linspace(-3.4e38, 3.4e38, n),
        torch.full((n,), torch.finfo(torch.float32).max),
        torch.linspace(-1e-38, 1e-38, n),  # around the 1e-38 clamp
        torch.full((n,), 1e-40),  # subnormal
        torch.full((n,), -1.4e-45),  # smallest subnormal
        torch.tensor([1e30] + [1e-30] * 62 + [-1e-45]),  # huge and tiny together
        torch.tensor([-0.0] * 32 + [0.0] * 32),
        torch.tensor([-0.0] * 63 + [2.0]),
    ]
    w = torch.stack(rows)
    assert_matches_bnb(w)
    assert_matches_bnb(w.reshape(-1)[:-7])  # with a partial last block


def test_non_finite_inputs_follow_bitsandbytes():
    w = torch.randn(4, 64, generator=gen(4))
    w[0, 3] = float("inf")
    w[1, 5] = float("nan")
    w[2, :] = float("-inf")
    assert_matches_bnb(w)


def test_fp8_grid_values():
    # Source checkpoints hold float8_e4m3fn weights with per-row scales.
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    grid = grid[torch.isfinite(grid)]
    g = gen(5)
    for cols in (128, 512, 4608):
        idx = torch.randint(0, grid.numel(), (32, cols), generator=g)
        w = grid[idx]
        for scales in (
            torch.rand(32, 1, generator=g) * 0.01,
            2.0 ** torch.randint(-12, 4, (32, 1), generator=g).float(),
            torch.full((32, 1), 1 / 448),
        ):
            assert_matches_bnb(w * scales)
    # every FP8 value, ties included, at a unit scale
    assert_matches_bnb(torch.cat([grid, -grid, torch.full((grid.numel() % 64,), 448.0)]))


# ----------------------------------------------------------------------------------------
# double quantization
# ----------------------------------------------------------------------------------------
def test_dynamic_lut_matches_native_kernel_everywhere():
    # Every one of the kernel's 65536 table cells, its neighbours, and the map's midpoints.
    code = F.create_dynamic_map()
    grid = torch.arange(65536, dtype=torch.float32) * 2.0
    grid = grid / torch.full_like(grid, 65535.0) - 1.0
    mids = (code[:-1] + code[1:]) * 0.5
    vals = torch.cat(
        [
            grid,
            torch.nextafter(grid, torch.tensor(2.0)),
            torch.nextafter(grid, torch.tensor(-2.0)),
            mids,
            torch.nextafter(mids, torch.tensor(2.0)),
            torch.nextafter(mids, torch.tensor(-2.0)),
            code,
        ]
    ).clamp(-1, 1)
    vals = vals[torch.randperm(vals.numel(), generator=gen(6))]
    pad = (-vals.numel()) % 255
    vals = torch.cat([vals, torch.zeros(pad)]).view(-1, 255)
    blocks = torch.cat([torch.ones(vals.shape[0], 1), vals], 1)  # absmax exactly 1
    scaled_blocks = blocks * torch.rand(blocks.shape[0], 1, generator=gen(7)) * 10
    for data in (blocks.reshape(-1), scaled_blocks.reshape(-1), scaled_blocks.reshape(-1)[:-100]):
        ref_codes, ref_absmax = torch.ops.bitsandbytes.quantize_blockwise(data, code, 256)
        codes, absmax = nf4._blockwise_dynamic_quantize(data, 256)
        assert_same_bits(absmax, ref_absmax)
        assert torch.equal(codes, ref_codes), f"{int((codes != ref_codes).sum())} codes differ"


def test_dynamic_blockwise_degenerate_blocks():
    code = F.create_dynamic_map()
    data = torch.cat(
        [
            torch.zeros(256),  # all-zero block
            torch.full((256,), -0.0),
            torch.tensor([float("nan")] + [0.5] * 255),  # NaN ignored by the absmax
            torch.tensor([float("inf")] + [0.5] * 255),
            torch.full((100,), 1e-42),
        ]
    )
    ref_codes, ref_absmax = torch.ops.bitsandbytes.quantize_blockwise(data, code, 256)
    codes, absmax = nf4._blockwise_dynamic_quantize(data, 256)
    assert_same_bits(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes)


@pytest.mark.parametrize("shape", [(768, 4608), (48, 53248), (3, 333), (32, 512)])
def test_double_quant_matches_bitsandbytes(shape):
    g = gen(8)
    w = torch.randn(shape, generator=g) * 0.02 * (1 + torch.rand(shape[0], 1, generator=g) * 3)
    ref_packed, ref_state = bnb_nf4(w, nested=True)
    packed, absmax = nf4.quantize_nf4(w)
    assert torch.equal(packed, ref_packed)
    nested = nf4.double_quantize_absmax(absmax)
    assert nested.offset == ref_state.offset.item()
    assert_same_bits(nested.nested_absmax, ref_state.state2.absmax)
    assert_same_bits(nested.nested_quant_map, ref_state.state2.code)
    assert nested.blocksize == ref_state.state2.blocksize == 256
    mismatched = int((nested.codes != ref_state.absmax).sum())
    assert nested.codes.dtype == torch.uint8 and nested.codes.shape == ref_state.absmax.shape
    assert mismatched == 0, f"{mismatched} of {nested.codes.numel()} nested codes differ"
    # the inverse equals bitsandbytes' own reconstruction
    ref_absmax = F.dequantize_blockwise(ref_state.absmax, ref_state.state2) + ref_state.offset
    assert_same_bits(nf4.dequantize_nested_absmax(nested), ref_absmax)
    # and is within half the widest gap of the dynamic map (plus one cell of the kernel's
    # 65536-cell grid), times the nested scale, of the plain absmax
    half_gap = float((nested.nested_quant_map[1:] - nested.nested_quant_map[:-1]).max()) / 2
    bound = nested.nested_absmax.repeat_interleave(256)[: absmax.numel()] * (half_gap + 2 / 65535) + 1e-7
    assert bool(((nf4.dequantize_nested_absmax(nested) - absmax).abs() <= bound).all())


# ----------------------------------------------------------------------------------------
# dequantization
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 4608), (7, 100), (3, 12288), (2, 53248), (1, 2), (130,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_matches_bitsandbytes(shape, dtype):
    w = torch.randn(shape, generator=gen(9)) * 0.05
    ref_packed, ref_state = bnb_nf4(w)
    ref_state.dtype = dtype
    ref = F.dequantize_4bit(ref_packed, ref_state)  # the native CPU kernel (even last dimension)
    for chunk in (1 << 18, 192):  # default, and many chunks
        out = nf4.dequantize_nf4(ref_packed, ref_state.absmax, shape, dtype, chunk_weights=chunk)
        assert_same_bits(out, ref.reshape(shape))


@pytest.mark.parametrize("shape", [(5, 13), (3, 33), (1, 1)])
def test_dequantize_odd_shapes_match_bitsandbytes_fallback(shape):
    # bitsandbytes sends an odd last dimension to its torch fallback, wrapped in torch.compile;
    # compare with the eager function itself (compiling takes tens of seconds).
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    w = torch.randn(shape, generator=gen(14))
    ref_packed, ref_state = bnb_nf4(w)
    for dtype in (torch.float32, torch.bfloat16):
        ref = eager(ref_packed.view(-1), ref_state.absmax, F.get_4bit_type("nf4", "cpu"), 64, shape, dtype)
        assert_same_bits(nf4.dequantize_nf4(ref_packed, ref_state.absmax, shape, dtype), ref)


def test_dequantize_error_is_nf4_sized():
    w = torch.randn(256, 4608, generator=gen(10))
    packed, absmax = nf4.quantize_nf4(w)
    deq = nf4.dequantize_nf4(packed, absmax, w.shape)
    rel = float((deq - w).norm() / w.norm())
    assert 0.05 < rel < GAUSSIAN_REL_ERROR_BOUND, rel
    # within half the widest codebook gap of each block's absmax, element by element
    gap = float((nf4.NF4_CODEBOOK[1:] - nf4.NF4_CODEBOOK[:-1]).max()) / 2
    bound = absmax.repeat_interleave(64).view(w.shape) * gap * (1 + 1e-6)
    assert bool(((deq - w).abs() <= bound).all())


def test_dequantize_rejects_wrong_sizes():
    packed, absmax = nf4.quantize_nf4(torch.randn(4, 128))
    with pytest.raises(IdeoquantError):
        nf4.dequantize_nf4(packed, absmax, (4, 130))
    with pytest.raises(IdeoquantError):
        nf4.dequantize_nf4(packed, absmax[:-1], (4, 128))
    with pytest.raises(IdeoquantError):
        nf4.quantize_nf4(torch.randn(4, 128), blocksize=48)
    with pytest.raises(IdeoquantError):
        nf4.quantize_nf4(torch.zeros(4, 128, dtype=torch.int32))


# ----------------------------------------------------------------------------------------
# state-dict layout (what bitsandbytes writes, what it loads)
# ----------------------------------------------------------------------------------------
def _bnb_linear_state_dict(w: torch.Tensor, compute_dtype: torch.dtype, nested: bool, prefix: str):
    lin = bnb.nn.Linear4bit(
        w.shape[1], w.shape[0], bias=False, compute_dtype=compute_dtype, quant_type="nf4",
        compress_statistics=nested,
    )
    lin.weight = bnb.nn.Params4bit(
        w.to(compute_dtype), requires_grad=False, quant_type="nf4", compress_statistics=nested, blocksize=64
    )
    lin = lin.to("cpu")  # quantizes on CPU
    return lin.state_dict(prefix=prefix + ".")


def _ours(w: torch.Tensor, compute_dtype: torch.dtype, nested: bool, prefix: str):
    # bitsandbytes quantizes the weight as held in the compute dtype; so do we here.
    packed, absmax = nf4.quantize_nf4(w.to(compute_dtype))
    dq = nf4.double_quantize_absmax(absmax) if nested else None
    return nf4.nf4_serialized_tensors(prefix, packed, absmax, w.shape, compute_dtype, dq), absmax


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_serialized_tensors_equal_bitsandbytes_state_dict(nested, compute_dtype):
    prefix = "transformer.blocks.3.attn.to_q"
    w = torch.randn(96, 4608, generator=gen(11)) * 0.02
    ref = _bnb_linear_state_dict(w, compute_dtype, nested, prefix)
    ours, _ = _ours(w, compute_dtype, nested, prefix)
    assert list(ours) == list(ref)
    for key in ref:
        a, b = ours[key], ref[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert torch.equal(bits(a) if a.is_floating_point() else a, bits(b) if b.is_floating_point() else b), key
    meta = json.loads(bytes(ours[f"{prefix}.weight.quant_state.bitsandbytes__nf4"].numpy()))
    assert meta["dtype"] == {torch.bfloat16: "bfloat16", torch.float32: "float32"}[compute_dtype]
    assert meta["shape"] == [96, 4608] and meta["quant_type"] == "nf4" and meta["blocksize"] == 64
    if nested:
        assert meta["nested_blocksize"] == 256 and meta["nested_dtype"] == "float32"


@pytest.mark.parametrize("nested", [True, False])
def test_quant_state_as_dict_equal_params4bit(nested):
    w = torch.randn(40, 512, generator=gen(12))
    param = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=nested).to("cpu")
    ref = {"weight": param.data, **{f"weight.{k}": v for k, v in param.quant_state.as_dict(packed=True).items()}}
    ours, _ = _ours(w, torch.float32, nested, "")
    assert list(ours) == list(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), key


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_from_prequantized_loads_and_dequantizes(nested, compute_dtype):
    prefix = "blocks.0.ff.w1"
    w = torch.randn(64, 512, generator=gen(13))
    ours, absmax = _ours(w, compute_dtype, nested, prefix)
    key = f"{prefix}.weight"
    stats = {k[len(key) + 1 :]: v for k, v in ours.items() if k.startswith(key + ".")}
    param = bnb.nn.Params4bit.from_prequantized(data=ours[key], quantized_stats=stats, device="cpu")
    assert param.quant_state.shape == w.shape and param.quant_state.dtype == compute_dtype
    ref = F.dequantize_4bit(param.data, param.quant_state)
    assert ref.dtype == compute_dtype and ref.shape == w.shape

    parsed = nf4.parse_nf4_serialized(ours, prefix)
    assert parsed.shape == tuple(w.shape) and parsed.dtype == compute_dtype
    assert torch.equal(parsed.packed, ours[key])
    if not nested:
        assert_same_bits(parsed.absmax, absmax)
    mine = nf4.dequantize_nf4(parsed.packed, parsed.absmax, parsed.shape, parsed.dtype)
    assert_same_bits(mine, ref)
    rel = float((ref.float() - w).norm() / w.norm())
    assert rel < GAUSSIAN_REL_ERROR_BOUND, rel


def test_parse_rejects_what_it_cannot_read():
    w = torch.randn(8, 128)
    ours, _ = _ours(w, torch.bfloat16, True, "m")
    with pytest.raises(IdeoquantError):
        nf4.parse_nf4_serialized(ours, "other")
    fp4 = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in ours.items()}
    with pytest.raises(IdeoquantError, match="FP4"):
        nf4.parse_nf4_serialized(fp4, "m")
    broken = dict(ours)
    broken["m.weight"] = ours["m.weight"][:-1]
    with pytest.raises(IdeoquantError):
        nf4.parse_nf4_serialized(broken, "m")
    meta_key = "m.weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(ours[meta_key].numpy()))
    meta["blocksize"] = 128
    other_bs = dict(ours)
    other_bs[meta_key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(IdeoquantError, match="blocksize"):
        nf4.parse_nf4_serialized(other_bs, "m")


def test_serialized_sizes_for_ideogram_shapes():
    # No data needed: the layout alone, for the largest Ideogram 4 matrix.
    shape = (4608, 53248)
    n = math.prod(shape)
    packed = torch.empty(n // 2, 1, dtype=torch.uint8)
    nested = nf4.NestedAbsmax(
        codes=torch.zeros(n // 64, dtype=torch.uint8),
        nested_absmax=torch.ones(-(-n // 64 // 256)),
        nested_quant_map=nf4.dynamic_quant_map(),
        offset=0.01,
    )
    out = nf4.nf4_serialized_tensors("x", packed, torch.empty(0), shape, torch.bfloat16, nested)
    assert out["x.weight"].shape == (n // 2, 1)
    assert out["x.weight.absmax"].shape == (n // 64,)
    assert out["x.weight.nested_absmax"].shape == (n // 64 // 256,)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux peak-RSS reset")
def test_quantize_memory_is_bounded():
    # 8.5 M weights (34 MB): the encoder's extra memory is its outputs plus a few chunk-sized
    # buffers (~9 MB), where whole-tensor temporaries would take 34 MB each.
    w = torch.randn(160, 53248, generator=gen(15))
    nf4.quantize_nf4(w[:2])  # lookup tables built outside the measurement
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak-RSS mark")
    before = _rss_kib("VmRSS")
    packed, absmax = nf4.quantize_nf4(w)
    extra_mib = (_rss_kib("VmHWM") - before) / 1024
    outputs_mib = (packed.numel() + 4 * absmax.numel()) / 2**20
    assert extra_mib < outputs_mib + 24, (extra_mib, outputs_mib)
