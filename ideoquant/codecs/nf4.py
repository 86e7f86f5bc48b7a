"""NF4 (bitsandbytes 4-bit NormalFloat) in pure torch: quantize, double-quantize, serialize, load.

The encoder reproduces `bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")`
on CPU byte for byte (bitsandbytes 0.50, whose CPU path is the backend-neutral torch kernel):

* absmax per block of `blocksize` consecutive weights of the flattened tensor (float32);
* scaled = clamp(w * (1 / max(absmax, 1e-38)), -1, 1) -- a multiply by the float32
  reciprocal, not a division;
* the code is the number of float32 midpoints (c[i] + c[i+1]) / 2 strictly below `scaled`,
  so a value exactly on a midpoint takes the LOWER code;
* two codes per byte, the first element in the HIGH nibble; packed shape [(n + 1) // 2, 1];
  an odd total is padded with a scaled 0 (code 7) in the last low nibble;
* a partial last block (n % blocksize != 0) stores max(absmax, 1e-38) and divides instead of
  multiplying, as bitsandbytes does.

Double quantization (`compress_statistics=True`) reproduces bitsandbytes' native CPU kernel
`cquantize_blockwise_cpu_fp32` (a 65536-entry lookup table over [-1, 1]), see
`double_quantize_absmax`. Nothing here imports bitsandbytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch

from ideoquant.errors import IdeoquantError

NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# Weights per vectorized chunk of `quantize_nf4`: the reused temporaries take ~18 bytes a weight
# (~9 MB); larger chunks fall out of cache and are slower, not faster.
DEFAULT_CHUNK_WEIGHTS = 1 << 19

# The 16 NF4 levels (QLoRA's NormalFloat4), as the float32 values bitsandbytes uses.
NF4_CODEBOOK: torch.Tensor = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# Decision thresholds: float32 midpoints between neighbouring levels (15 values).
_NF4_THRESHOLDS = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2

_SERIAL_KEY_SUFFIX = "quant_state.bitsandbytes__nf4"


# --------------------------------------------------------------------------------------
# 4-bit blockwise quantization
# --------------------------------------------------------------------------------------
def _check_blocksize(blocksize: int) -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise IdeoquantError(f"NF4 blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")


@lru_cache(maxsize=None)
def _prefix_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables over the top 16 bits of a float32: (codes below the prefix's range uint8, threshold inside it or +inf).

    The code of x is the number of thresholds strictly below x (`torch.bucketize`, right=False).
    Each 16-bit prefix covers a contiguous float range holding at most one threshold, so
    code = base[prefix] + (x > threshold[prefix]) exactly. NaN prefixes give 15, as bucketize does.
    """
    prefixes = torch.arange(65536, dtype=torch.int32) << 16
    ends = torch.stack([prefixes.view(torch.float32), (prefixes | 0xFFFF).view(torch.float32)])
    low, high = ends.amin(dim=0), ends.amax(dim=0)
    base = torch.searchsorted(_NF4_THRESHOLDS, low, right=False)
    inside = torch.searchsorted(_NF4_THRESHOLDS, high, right=False) - base
    if int(inside.max()) > 1:  # pragma: no cover - a property of the codebook
        raise AssertionError("NF4 thresholds closer than one float32 16-bit prefix")
    threshold = torch.full((65536,), float("inf"), dtype=torch.float32)
    threshold[inside > 0] = _NF4_THRESHOLDS[base[inside > 0]]
    base[torch.isnan(low)] = len(_NF4_THRESHOLDS)
    return base.to(torch.uint8).to(device), threshold.to(device)


class _Scratch:
    """Reusable buffers for one chunk, so the encoder does not churn the allocator (~18 bytes a weight)."""

    def __init__(self, chunk: int, blocksize: int, device: torch.device) -> None:
        self.staging = torch.empty(chunk, dtype=torch.float32, device=device)
        self.scaled = torch.empty(chunk, dtype=torch.float32, device=device)
        self.aux = torch.empty(chunk, dtype=torch.float32, device=device)
        self.prefix = torch.empty(chunk, dtype=torch.int32, device=device)
        self.codes = torch.empty(chunk, dtype=torch.uint8, device=device)
        self.above = torch.empty(chunk, dtype=torch.bool, device=device)
        self.recip = torch.empty(max(1, chunk // blocksize), dtype=torch.float32, device=device)


def _codes_of_scaled(scaled: torch.Tensor, scratch: _Scratch | None = None) -> torch.Tensor:
    """Map flat float32 scaled values to NF4 codes (uint8); midpoint ties take the lower code."""
    base, threshold = _prefix_tables(scaled.device)
    m = scaled.numel()
    if scratch is None:
        scratch = _Scratch(m, 1, scaled.device)
    prefix = torch.bitwise_right_shift(scaled.view(torch.int32), 16, out=scratch.prefix[:m])
    prefix.bitwise_and_(0xFFFF)
    codes = torch.index_select(base, 0, prefix, out=scratch.codes[:m])
    thresholds = torch.index_select(threshold, 0, prefix, out=scratch.aux[:m])
    codes += torch.gt(scaled, thresholds, out=scratch.above[:m])
    return codes


def _pack_pairs_into(codes: torch.Tensor, out: torch.Tensor) -> None:
    """Pack uint8 codes (even count) into `out` bytes, first of each pair in the high nibble."""
    torch.mul(codes[0::2], 16, out=out)
    out += codes[1::2]


def _flat_chunks(weight: torch.Tensor, chunk: int, staging: torch.Tensor):
    """Yield (start, float32 flat chunk) covering the row-major flattening of `weight`.

    `chunk` is a multiple of the block size. Contiguous float32 inputs are sliced without a copy;
    other dtypes are converted chunk by chunk into `staging`; non-contiguous 2-D inputs whose rows
    fit whole chunks are gathered one chunk of rows at a time.
    """
    n = weight.numel()
    if not weight.is_contiguous() and weight.dim() == 2 and chunk % weight.shape[1] == 0:
        cols = weight.shape[1]
        rows_per_chunk = chunk // cols
        for r0 in range(0, weight.shape[0], rows_per_chunk):
            part = weight[r0 : r0 + rows_per_chunk]
            buf = staging[: part.numel()]
            buf.view(part.shape).copy_(part)
            yield r0 * cols, buf
        return
    flat = weight.reshape(-1) if weight.is_contiguous() else weight.contiguous().view(-1)
    for start in range(0, n, chunk):
        part = flat[start : start + chunk]
        if part.dtype == torch.float32:
            yield start, part
        else:
            yield start, staging[: part.numel()].copy_(part)


def _encode_full_blocks(
    x: torch.Tensor, blocksize: int, absmax_out: torch.Tensor, packed_out: torch.Tensor, scratch: _Scratch
) -> None:
    """Encode float32 `x` (whole blocks) into the `absmax_out` and `packed_out` slices, as bitsandbytes does."""
    m = x.numel()
    nb = m // blocksize
    magnitudes = torch.abs(x, out=scratch.aux[:m])
    torch.amax(magnitudes.view(nb, blocksize), dim=1, out=absmax_out)
    # bitsandbytes: A * (1.0 / absmax.clamp(min=1e-38)); Tensor.__rtruediv__ is reciprocal().
    recip = torch.clamp(absmax_out, min=1e-38, out=scratch.recip[:nb])
    torch.reciprocal(recip, out=recip)
    scaled = torch.mul(x.view(nb, blocksize), recip.unsqueeze(1), out=scratch.scaled[:m].view(nb, blocksize))
    scaled.clamp_(-1.0, 1.0)
    _pack_pairs_into(_codes_of_scaled(scaled.view(-1), scratch), packed_out)


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE, *, chunk_weights: int = DEFAULT_CHUNK_WEIGHTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `weight` ([out, in] float32/bf16/fp16) to NF4: (packed uint8 [(n+1)//2, 1], absmax f32 [n_blocks])."""
    _check_blocksize(blocksize)
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise IdeoquantError(f"NF4 quantization needs a float32/bf16/fp16 tensor, got {weight.dtype}")
    n = weight.numel()
    if n == 0:
        raise IdeoquantError("cannot NF4-quantize an empty tensor")
    device = weight.device
    full = n // blocksize * blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)

    # Chunks hold whole blocks -- and whole rows when a non-contiguous 2-D input is copied by rows.
    chunk = max(blocksize, chunk_weights // blocksize * blocksize)
    if weight.dim() == 2 and not weight.is_contiguous() and weight.shape[1] % blocksize == 0:
        chunk = max(1, chunk // weight.shape[1]) * weight.shape[1]
    else:
        chunk = min(chunk, -(-n // blocksize) * blocksize)
    scratch = _Scratch(chunk, blocksize, device)

    with torch.no_grad():
        for start, x in _flat_chunks(weight, chunk, scratch.staging):
            body_stop = min(start + x.numel(), full)
            if body_stop > start:
                _encode_full_blocks(
                    x[: body_stop - start],
                    blocksize,
                    absmax[start // blocksize : body_stop // blocksize],
                    packed[start // 2 : body_stop // 2],
                    scratch,
                )
            if start + x.numel() > full:
                # Partial last block: bitsandbytes stores the clamped absmax and divides by it.
                tail = x[max(full, start) - start :]
                am = tail.abs().max().clamp(min=1e-38)
                absmax[-1] = am
                scaled = torch.clamp(tail / am, -1.0, 1.0)
                if scaled.numel() % 2:
                    scaled = torch.nn.functional.pad(scaled, (0, 1))  # pad code: scaled 0 -> 7
                _pack_pairs_into(_codes_of_scaled(scaled), packed[full // 2 :])
    return packed.unsqueeze(1), absmax


@lru_cache(maxsize=None)
def _pair_table(device: torch.device) -> torch.Tensor:
    """Byte -> its two levels (high nibble first) as one int64 holding two float32s, [256]."""
    pairs = torch.stack([NF4_CODEBOOK.repeat_interleave(16), NF4_CODEBOOK.repeat(16)], dim=1)
    return pairs.contiguous().view(torch.int64).view(-1).to(device)


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float32,
    blocksize: int = NF4_BLOCKSIZE,
    *,
    chunk_weights: int = DEFAULT_CHUNK_WEIGHTS // 2,
) -> torch.Tensor:
    """Decode NF4 `packed` bytes and float32 `absmax` to a `shape` tensor of `dtype` (level * absmax in f32, cast)."""
    _check_blocksize(blocksize)
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    raw = packed.reshape(-1)
    if raw.dtype != torch.uint8:
        raw = raw.view(torch.uint8)
    if raw.numel() != (n + 1) // 2:
        raise IdeoquantError(f"NF4 data holds {raw.numel()} bytes, shape {shape} needs {(n + 1) // 2}")
    if absmax.numel() != n_blocks:
        raise IdeoquantError(f"NF4 absmax holds {absmax.numel()} scales, shape {shape} needs {n_blocks}")
    device = raw.device
    absmax = absmax.reshape(-1).to(device=device, dtype=torch.float32)
    table = _pair_table(device)
    out = torch.empty(n, dtype=dtype, device=device)
    full = n // blocksize * blocksize
    if full:
        # On CPU, cache-sized chunks through reused buffers; elsewhere one pass.
        chunk = max(blocksize, chunk_weights // blocksize * blocksize) if device.type == "cpu" else full
        chunk = min(chunk, full)
        index = torch.empty(chunk // 2, dtype=torch.int32, device=device)
        pairs = torch.empty(chunk // 2, dtype=torch.int64, device=device)
        for start in range(0, full, chunk):
            half = min(chunk, full - start) // 2
            index[:half].copy_(raw[start // 2 : start // 2 + half])
            torch.index_select(table, 0, index[:half], out=pairs[:half])
            levels = pairs[:half].view(torch.float32).view(-1, blocksize)
            scales = absmax[start // blocksize : start // blocksize + levels.shape[0]].unsqueeze(1)
            torch.mul(levels, scales, out=out[start : start + 2 * half].view(-1, blocksize))
    if n > full:
        levels = table[raw[full // 2 :].to(torch.int64)].view(torch.float32)[: n - full]
        out[full:] = levels * absmax[-1]
    return out.view(shape)


# --------------------------------------------------------------------------------------
# Double quantization of absmax (bitsandbytes compress_statistics=True)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NestedAbsmax:
    """Absmax compressed as bitsandbytes' double quant: 8-bit dynamic codes per 256-block plus a mean offset."""

    codes: torch.Tensor  # uint8 [n_blocks]: dynamic-map codes of (absmax - offset)
    nested_absmax: torch.Tensor  # float32 [ceil(n_blocks / 256)]
    nested_quant_map: torch.Tensor  # float32 [256]: the signed 8-bit dynamic map
    offset: float  # the float32 mean of absmax, as a Python float
    blocksize: int = NESTED_BLOCKSIZE


@lru_cache(maxsize=1)
def _dynamic_map_cached() -> torch.Tensor:
    # Signed dynamic map, 7 exponent levels: level k holds 2**k means of a linspace(0.1, 1)
    # partition scaled by 10**(k-6), both signs; plus 0 and 1. 2 * 127 + 2 = 256 values.
    values: list[float] = [0.0, 1.0]
    for k in range(7):
        edges = torch.linspace(0.1, 1, 2**k + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        level = (10.0 ** (k - 6)) * centres
        values += level.tolist()
        values += (-level).tolist()
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_quant_map() -> torch.Tensor:
    """The 256-entry signed 8-bit dynamic map (float32) bitsandbytes uses for the nested absmax."""
    return _dynamic_map_cached().clone()


@lru_cache(maxsize=1)
def _dynamic_lut() -> torch.Tensor:
    # bitsandbytes' CPU blockwise kernel rounds through a 65536-entry table: entry i is the
    # number of float32 midpoints strictly below the float32 value 2i / 65535 - 1.
    code = _dynamic_map_cached()
    midpoints = (code[:-1] + code[1:]) * 0.5
    grid = torch.arange(65536, dtype=torch.float32) * 2.0
    grid = grid / torch.full_like(grid, 65535.0) - 1.0
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


def _blockwise_dynamic_quantize(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, float32 block absmax) of float32 `values`, as `cquantize_blockwise_cpu_fp32`."""
    n = values.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.zeros(n_blocks * blocksize, dtype=torch.float32, device=values.device)
    padded[:n] = values.reshape(-1)
    blocks = padded.view(n_blocks, blocksize)
    # absmax: NaN-ignoring max of |x|, floored at 0 (padding zeros change nothing).
    magnitudes = blocks.abs()
    block_absmax = magnitudes.masked_fill_(torch.isnan(magnitudes), 0.0).amax(dim=1)
    inv = 1.0 / block_absmax
    scaled = (blocks * inv.unsqueeze(1)).clamp_(-1.0, 1.0)
    # Table index: (uint16) fma((v + 1) * 0.5, 65535, 0.5). (v + 1) * 0.5 is a multiple of 2**-25
    # below 1, so the product and the sum are exact in float64; one rounding to float32 then
    # equals the fused multiply-add.
    half = (scaled + 1.0) * 0.5
    index = (half.to(torch.float64) * 65535.0 + 0.5).to(torch.float32).trunc()
    index = torch.nan_to_num(index, nan=0.0).to(torch.int64)  # NaN: the kernel reads entry 0
    codes = _dynamic_lut().to(values.device)[index]
    codes[block_absmax == 0] = 0  # an all-zero block is written as code 0
    return codes.view(-1)[:n].clone(), block_absmax


def double_quantize_absmax(absmax: torch.Tensor) -> NestedAbsmax:
    """Compress float32 absmax as bitsandbytes' compress_statistics=True does (mean offset, 8-bit dynamic codes)."""
    absmax = absmax.reshape(-1)
    if absmax.dtype != torch.float32:
        raise IdeoquantError(f"absmax must be float32, got {absmax.dtype}")
    # torch's float32 mean, exactly as bitsandbytes takes it. Over millions of blocks its last bit
    # can depend on the thread count -- for bitsandbytes as for us.
    offset = absmax.mean()
    codes, nested_absmax = _blockwise_dynamic_quantize(absmax - offset, NESTED_BLOCKSIZE)
    return NestedAbsmax(
        codes=codes,
        nested_absmax=nested_absmax,
        nested_quant_map=dynamic_quant_map().to(absmax.device),
        offset=offset.item(),
    )


def dequantize_nested_absmax(nested: NestedAbsmax) -> torch.Tensor:
    """Inverse of `double_quantize_absmax`: float32 absmax = map[code] * nested_absmax + offset."""
    codes = nested.codes.reshape(-1)
    n = codes.numel()
    bs = nested.blocksize
    n_blocks = -(-n // bs)
    if nested.nested_absmax.numel() != n_blocks:
        raise IdeoquantError(f"nested absmax holds {nested.nested_absmax.numel()} scales, {n} codes need {n_blocks}")
    values = nested.nested_quant_map.to(torch.float32)[codes.to(torch.int64)]
    scales = nested.nested_absmax.reshape(-1).to(torch.float32).repeat_interleave(bs)[:n]
    out = values * scales
    out += torch.tensor(nested.offset, dtype=torch.float32, device=out.device)
    return out


# --------------------------------------------------------------------------------------
# bitsandbytes state-dict layout
# --------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    # bitsandbytes writes str(dtype) without its "torch." prefix: "bfloat16", "float16", "float32".
    name = str(dtype)
    return name[len("torch.") :] if name.startswith("torch.") else name


def _weight_key(prefix: str) -> str:
    return f"{prefix}.weight" if prefix else "weight"


def nf4_serialized_tensors(
    prefix: str,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    compute_dtype: torch.dtype,
    nested: NestedAbsmax | None,
    *,
    blocksize: int = NF4_BLOCKSIZE,
) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' Linear4bit state dict holds for one NF4 weight (`absmax` unused when `nested`)."""
    _check_blocksize(blocksize)
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if packed.numel() != (n + 1) // 2:
        raise IdeoquantError(f"NF4 data holds {packed.numel()} bytes, shape {shape} needs {(n + 1) // 2}")
    n_blocks = -(-n // blocksize)
    key = _weight_key(prefix)
    out: dict[str, torch.Tensor] = {key: packed.reshape(-1, 1)}
    meta: dict[str, object] = {
        "quant_type": "nf4",
        "blocksize": blocksize,
        "dtype": _dtype_name(compute_dtype),
        "shape": list(shape),
    }
    if nested is None:
        if absmax.numel() != n_blocks or absmax.dtype != torch.float32:
            raise IdeoquantError(f"NF4 absmax must be float32 [{n_blocks}], got {absmax.dtype} {tuple(absmax.shape)}")
        out[f"{key}.absmax"] = absmax.reshape(-1)
        out[f"{key}.quant_map"] = NF4_CODEBOOK.clone()
    else:
        if nested.codes.numel() != n_blocks:
            raise IdeoquantError(f"nested absmax codes hold {nested.codes.numel()} entries, shape needs {n_blocks}")
        out[f"{key}.absmax"] = nested.codes.reshape(-1)
        out[f"{key}.quant_map"] = NF4_CODEBOOK.clone()
        out[f"{key}.nested_absmax"] = nested.nested_absmax.reshape(-1).to(torch.float32)
        out[f"{key}.nested_quant_map"] = nested.nested_quant_map.to(torch.float32).clone()
        meta.update(
            {
                "nested_blocksize": nested.blocksize,
                "nested_dtype": "float32",
                "nested_offset": float(nested.offset),
            }
        )
    out[f"{key}.{_SERIAL_KEY_SUFFIX}"] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out


class NF4Tensor(NamedTuple):
    """A parsed NF4 weight: packed bytes, float32 absmax, logical shape, compute dtype."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype


def _need(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise IdeoquantError(f"NF4 weight incomplete: no tensor {name}")
    return tensors[name]


def parse_nf4_serialized(tensors: dict[str, torch.Tensor], prefix: str) -> NF4Tensor:
    """Read `prefix`'s bitsandbytes NF4 tensors back: (packed, absmax float32, shape, dtype); undoes double quant."""
    key = _weight_key(prefix)
    meta_key = f"{key}.{_SERIAL_KEY_SUFFIX}"
    if meta_key not in tensors:
        other = f"{key}.quant_state.bitsandbytes__fp4"
        kind = "FP4, not NF4" if other in tensors else f"no {meta_key}"
        raise IdeoquantError(f"{key}: not an NF4 weight ({kind})")
    try:
        meta = json.loads(bytes(tensors[meta_key].cpu().to(torch.uint8).numpy()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # also too deep, or numbers too long
        raise IdeoquantError(f"{meta_key}: unreadable quant state ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise IdeoquantError(f"{meta_key}: quant state is not a JSON object")
    if meta.get("quant_type") != "nf4":
        raise IdeoquantError(f"{key}: quant_type {meta.get('quant_type')!r}, expected 'nf4'")
    if meta.get("blocksize") != NF4_BLOCKSIZE:
        raise IdeoquantError(f"{key}: NF4 blocksize {meta.get('blocksize')}, only {NF4_BLOCKSIZE} is supported")
    dtype = getattr(torch, str(meta.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise IdeoquantError(f"{key}: unknown dtype {meta.get('dtype')!r}")
    if not isinstance(meta.get("shape"), list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in meta["shape"]
    ):
        raise IdeoquantError(f"{key}: quant state has no shape of non-negative integers")
    shape = tuple(int(s) for s in meta["shape"])
    n = math.prod(shape)
    n_blocks = -(-n // NF4_BLOCKSIZE)

    packed = _need(tensors, key)
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1, 1)
    if packed.shape[0] != (n + 1) // 2:
        raise IdeoquantError(f"{key}: {packed.shape[0]} bytes for shape {shape}, expected {(n + 1) // 2}")
    quant_map = tensors.get(f"{key}.quant_map")
    if quant_map is not None and not torch.equal(quant_map.cpu().to(torch.float32), NF4_CODEBOOK):
        raise IdeoquantError(f"{key}: quant_map is not the NF4 codebook")

    stored_absmax = _need(tensors, f"{key}.absmax").reshape(-1)
    if f"{key}.nested_absmax" in tensors:
        if meta.get("nested_blocksize") is None or meta.get("nested_offset") is None:
            raise IdeoquantError(f"{key}: nested absmax without nested_blocksize/nested_offset")
        if stored_absmax.dtype != torch.uint8:
            raise IdeoquantError(f"{key}: nested absmax codes are {stored_absmax.dtype}, expected uint8")
        nested = NestedAbsmax(
            codes=stored_absmax,
            nested_absmax=tensors[f"{key}.nested_absmax"],
            nested_quant_map=_need(tensors, f"{key}.nested_quant_map"),
            offset=float(meta["nested_offset"]),
            blocksize=int(meta["nested_blocksize"]),
        )
        absmax = dequantize_nested_absmax(nested)
    else:
        absmax = stored_absmax.to(torch.float32)
    if absmax.numel() != n_blocks:
        raise IdeoquantError(f"{key}: {absmax.numel()} absmax values for shape {shape}, expected {n_blocks}")
    return NF4Tensor(packed=packed, absmax=absmax, shape=shape, dtype=dtype)
