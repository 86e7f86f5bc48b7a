"""Careless and hostile inputs: each gets one `error:` line, a non-zero exit, and no output.

Safetensors headers are built by hand (struct + json) and every malformed one is also given
to the `safetensors` library, which must reject it too: the reader is held to be at least
as strict as the format's reference implementation.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from ideoquant.errors import IdeoquantError, printable
from ideoquant.io.input_files import parse_json
from ideoquant.io.safetensors_reader import SafetensorsFile

# A regression that blocks (a FIFO) or faults must fail the test, not hang or kill the run.
CLI_TIMEOUT = 120


def run_cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ideoquant.cli", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> str:
    assert proc.returncode not in (0, None), proc.stderr
    assert proc.returncode > 0, f"killed by signal {-proc.returncode}: {proc.stderr}"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    if out.exists():
        leftovers = [p.name for p in out.rglob("*") if p.is_file()]
        assert leftovers == [], leftovers


# --- hand-built safetensors files --------------------------------------------------------

def safetensors_bytes(header: object = None, data: bytes = b"", raw: bytes | None = None) -> bytes:
    """8-byte length, the header (JSON of `header`, or `raw` bytes as given), padding, data."""
    text = raw if raw is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def entry(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def library_accepts(path: Path) -> bool:
    """Whether the safetensors library opens the file and reads every tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return True
    except Exception:
        return False


ENTRY = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'

MALFORMED = {
    "overlap": (safetensors_bytes({"a": entry("F32", [2], [0, 8]), "b": entry("F32", [2], [4, 12])}, bytes(12)),
                "overlaps 'a'"),
    "alias": (safetensors_bytes({"a": entry("F32", [2], [0, 8]), "b": entry("F32", [2], [0, 8])}, bytes(8)),
              "overlaps 'a'"),
    "gap": (safetensors_bytes({"a": entry("F32", [1], [0, 4]), "b": entry("F32", [1], [8, 12])}, bytes(12)),
            "leaves a gap after 'a'"),
    "not_from_zero": (safetensors_bytes({"a": entry("F32", [1], [4, 8])}, bytes(8)), "leaves a gap after the start"),
    "trailing_bytes": (safetensors_bytes({"a": entry("F32", [1], [0, 4])}, bytes(8)), "4 bytes after the last tensor"),
    "truncated": (safetensors_bytes({"a": entry("F32", [2], [0, 8])}, bytes(4)), "truncated file"),
    "negative_dim": (safetensors_bytes({"a": entry("F32", [-1, -4], [0, 16])}, bytes(16)), "non-negative integers"),
    "float_dim": (safetensors_bytes({"a": entry("F32", [2.0], [0, 8])}, bytes(8)), "non-negative integers"),
    "bool_dim": (safetensors_bytes({"a": entry("F32", [True], [0, 4])}, bytes(4)), "non-negative integers"),
    "duplicate_key": (safetensors_bytes(raw=f'{{"a":{ENTRY},"a":{{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}}}'.encode(),
                                        data=bytes(12)), "duplicate key 'a'"),
    "end_before_begin": (safetensors_bytes({"a": entry("F32", [0], [8, 0])}, bytes(8)), "byte range 8-0"),
    "three_offsets": (safetensors_bytes({"a": entry("F32", [2], [0, 8, 8])}, bytes(8)), "two non-negative integers"),
    "unknown_dtype": (safetensors_bytes({"a": entry("Q4", [2], [0, 8])}, bytes(8)), "dtype 'Q4'"),
    "missing_field": (safetensors_bytes({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "dtype, shape and data_offsets"),
    "numel_overflow": (safetensors_bytes({"a": entry("F32", [1 << 62, 1 << 62], [0, 0])}), "does not match its shape"),
    "header_is_a_list": (safetensors_bytes([1, 2]), "header is not a JSON object"),
    "metadata_is_a_list": (safetensors_bytes({"__metadata__": ["x"], "a": entry("F32", [2], [0, 8])}, bytes(8)),
                           "__metadata__ must be an object"),
    "metadata_not_strings": (safetensors_bytes({"__metadata__": {"k": 1}, "a": entry("F32", [2], [0, 8])}, bytes(8)),
                             "__metadata__ value for 'k'"),
    "deep_nesting": (safetensors_bytes(raw=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested deeper"),
    "number_1e400": (safetensors_bytes(raw=b'{"a":{"dtype":"F32","shape":[1e400],"data_offsets":[0,0]}}'), "1e400 is out of range"),
    "number_5000_digits": (safetensors_bytes(raw=b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}'),
                           "integer of 5000 digits"),
    "not_utf8": (safetensors_bytes(raw=b'{"\xff":1}'), "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors_rejected_like_the_library(tmp_path, case):
    data, needle = MALFORMED[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    assert not library_accepts(path), "the safetensors library accepts this file: the case is not malformed"
    with pytest.raises(IdeoquantError, match=None) as err:
        SafetensorsFile(path)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_identical_duplicate_keys_refused_although_the_library_keeps_one(tmp_path):
    path = tmp_path / "dup.safetensors"
    path.write_bytes(safetensors_bytes(raw=f'{{"a":{ENTRY},"a":{ENTRY}}}'.encode(), data=bytes(8)))
    assert library_accepts(path)  # the library keeps the last of two identical entries
    with pytest.raises(IdeoquantError, match="duplicate key 'a'"):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    "header, data",
    [
        ({"a": entry("F32", [2], [0, 8]), "b": entry("BF16", [3], [8, 14])}, bytes(range(14))),
        ({"__metadata__": {"format": "pt"}, "a": entry("U8", [2, 2], [0, 4])}, b"\x01\x02\x03\x04"),
        ({"__metadata__": None, "z": entry("F32", [0], [0, 0]), "y": entry("F32", [0], [0, 0]), "x": entry("I8", [], [0, 1])}, b"\x05"),
        ({"a": {**entry("F16", [1], [0, 2]), "note": "extra fields are allowed"}}, b"\x00\x3c"),
        ({}, b""),
    ],
)
def test_well_formed_files_read_the_same_as_the_library(tmp_path, header, data):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    st = SafetensorsFile(path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(st.tensors) == sorted(f.keys())
        for name in f.keys():
            ours, theirs = st.read(name), f.get_tensor(name)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            assert ours.view(-1).view(__import__("torch").uint8).tolist() == theirs.view(-1).view(__import__("torch").uint8).tolist()


@pytest.mark.parametrize("case, needle", [("deep_nesting", "nested deeper"), ("number_1e400", "out of range"),
                                          ("number_5000_digits", "5000 digits"), ("metadata_is_a_list", "__metadata__"),
                                          ("alias", "overlaps")])
def test_cli_inspect_and_convert_malformed_headers(tmp_path, case, needle):
    path = tmp_path / "model.safetensors"
    path.write_bytes(MALFORMED[case][0])
    assert_one_line_error(run_cli("inspect", str(path)), needle)
    if case in ("alias", "deep_nesting"):  # convert reads headers through the same reader
        out = tmp_path / "out"
        assert_one_line_error(run_cli("convert", str(path), "--format", "q8_0", "--out", str(out)), needle)
        assert_nothing_written(out)


# --- JSON ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, needle",
    [
        ("[" * 50_000 + "]" * 50_000, "nested deeper"),
        ('{"num_layers": 1e400}', "out of range"),
        ('{"num_layers": -1e400}', "out of range"),
        ('{"num_layers": ' + "7" * 5000 + "}", "5000 digits"),
        ('{"num_layers": NaN}', "NaN is not valid JSON"),
        ('{"num_layers": Infinity}', "Infinity is not valid JSON"),
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ('{"a": 1', "not valid JSON"),
    ],
)
def test_strict_json(text, needle):
    with pytest.raises(IdeoquantError) as err:
        parse_json(text, "config.json")
    assert needle in str(err.value) and str(err.value).startswith("config.json: ")


def test_strict_json_keeps_ordinary_values():
    text = '{"a": [1, -2, 3.5, 1e308, "x[{\\"", null, true], "b": {"c": {}}, "n": 18446744073709551615}'
    assert parse_json(text, "x") == json.loads(text)


# --- names with control characters --------------------------------------------------------

def test_printable_escapes_line_breaks_and_terminal_controls():
    assert printable("a\nerror: forged\r\x1b[2J\u2028\u202e\x85") == "a\\nerror: forged\\r\\x1b[2J\\u2028\\u202e\\x85"
    assert printable("layers.0.attention.qkv.weight é") == "layers.0.attention.qkv.weight é"


def test_control_characters_in_tensor_names_are_escaped(tmp_path):
    name = "evil\nerror: forged line\x1b[31m"
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({name: entry("F32", [1], [0, 4]), "b": entry("F32", [1], [0, 4])}, bytes(4)))
    proc = run_cli("inspect", str(path))
    line = assert_one_line_error(proc, "overlaps")
    assert "evil\\nerror: forged line\\x1b[31m" in line
    assert "forged" not in "".join(l for l in proc.stderr.splitlines() if not l.startswith("error:"))
    # A readable file with such a name: the table escapes it too.
    path.write_bytes(safetensors_bytes({name: entry("F32", [1], [0, 4])}, bytes(4)))
    proc = run_cli("inspect", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "evil\\nerror: forged line\\x1b[31m" in proc.stdout
    assert not any(l.startswith("error:") for l in proc.stdout.splitlines())
    assert "\x1b" not in proc.stdout


# --- special files and files that change -------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_as_source_file_is_refused_without_blocking(tmp_path):
    folder = tmp_path / "branch"
    folder.mkdir()
    os.mkfifo(folder / "diffusion_pytorch_model.safetensors")
    out = tmp_path / "out"
    proc = run_cli("convert", str(folder), "--format", "q8_0", "--out", str(out), timeout=60)
    assert_one_line_error(proc, "a FIFO, not a regular file")
    assert_nothing_written(out)
    proc = run_cli("inspect", str(folder / "diffusion_pytorch_model.safetensors"), timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_as_json_file_is_refused_without_blocking(tmp_path):
    from ideoquant.io.input_files import load_json

    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(IdeoquantError, match="a FIFO, not a regular file"):
        load_json(tmp_path / "config.json")


def test_source_truncated_after_opening_is_one_line_not_sigbus(tmp_path, tiny_fp8):
    """Open the source, truncate a file under it, then read: a one-line error, no SIGBUS.
    Run in a child process so a fault fails this test instead of killing the test run."""
    src = tmp_path / "src"
    shutil.copytree(tiny_fp8, src)
    script = textwrap.dedent(f"""
        import os, sys
        from ideoquant.errors import IdeoquantError
        from ideoquant.io.source import open_source
        source = open_source({str(src)!r})
        bs = source.branches["transformer"]
        path = bs.files[0].path
        os.truncate(path, os.path.getsize(path) // 2)
        try:
            for name in bs.specs:
                bs.read_float32(name)
        except IdeoquantError as e:
            print("error:", e)
            sys.exit(1)
        sys.exit(0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "changed since it was opened" in proc.stdout


def test_file_shrinking_during_a_read_is_one_line(tmp_path, monkeypatch):
    """The size is checked before reading, and a short read (the file shrank in between) is
    an error too: simulated by truncating the file from inside the read loop."""
    import ideoquant.io.safetensors_reader as reader

    path = tmp_path / "a.safetensors"
    path.write_bytes(safetensors_bytes({"a": entry("F32", [64], [0, 256])}, bytes(256)))
    st = SafetensorsFile(path)
    monkeypatch.setattr(reader, "READ_CHUNK", 16)

    def identity_then_truncate(s):
        # The check in read() passes (the file is as it was opened), then the file is cut.
        os.truncate(path, 100)
        return st._identity

    monkeypatch.setattr(reader, "_identity", identity_then_truncate)
    with pytest.raises(IdeoquantError, match="file shrank while tensor 'a' was read"):
        st.read("a")


# --- compare --images ----------------------------------------------------------------------

def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR claiming width x height RGB, one tiny IDAT and IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height, needle", [
    (100_000, 100_000, "image header claims more pixels"),  # past Pillow's own bomb limit
    (9000, 9000, "9000x9000 pixels is more than"),  # 81 megapixels: under Pillow's limit, over ours
])
def test_compare_images_refuses_oversized_images_before_decoding(tmp_path, width, height, needle):
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "img.png").write_bytes(png_header_only(width, height))
    proc = run_cli("compare", "--images", str(tmp_path / "a"), str(tmp_path / "b"))
    assert_one_line_error(proc, needle)


def direct_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM straight from the definition, one window position at a time (slow, small images)."""
    r = np.arange(-5, 6)
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px = x[i : i + 11, j : j + 11].astype(np.float64)
            py = y[i : i + 11, j : j + 11].astype(np.float64)
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_banded_psnr_and_ssim_match_the_definition(monkeypatch):
    """With bands of a few rows (as a large image gets), the metrics still match the
    definitions computed over the whole image at once."""
    import ideoquant.export.compare as compare

    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (37, 29, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int32) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    expected_psnr = 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2))
    expected_ssim = np.mean([direct_ssim(a[:, :, c], b[:, :, c]) for c in range(3)])
    monkeypatch.setattr(compare, "_BAND_PIXELS", 29 * 3 * 4)  # 4 rows per band: many bands, a ragged last one
    assert compare.psnr(a, b) == pytest.approx(expected_psnr, abs=1e-9)
    assert compare.ssim(a, b) == pytest.approx(expected_ssim, abs=1e-9)


def test_control_characters_in_paths_and_warnings_are_escaped(tmp_path, edit_source):
    """Messages that quote a path or a tensor name raw are escaped on their way out: the
    error line and warnings alike."""
    proc = run_cli("convert", str(tmp_path / "missing\nerror: forged"), "--format", "q8_0", "--out", str(tmp_path / "o"))
    line = assert_one_line_error(proc, "no such file or folder")
    assert "missing\\nerror: forged" in line
    import torch

    src = edit_source(lambda t: {**t, "extra\nerror: forged\rwarning": torch.zeros(2)})
    proc = run_cli("inspect", str(src), "--plan", "q8_0")
    assert proc.returncode == 0, proc.stderr
    assert "extra\\nerror: forged\\rwarning" in proc.stderr
    assert not any(l.startswith("error:") for l in proc.stderr.splitlines()), proc.stderr


# --- statistics and prompt files ----------------------------------------------------------

def stats_file(tmp_path: Path, meta: object) -> Path:
    path = tmp_path / "stats.safetensors"
    header = {"__metadata__": {"ideoquant.calibration": meta if isinstance(meta, str) else json.dumps(meta)},
              "transformer/layers.0.attention.qkv/count": entry("I64", [1], [0, 8])}
    path.write_bytes(safetensors_bytes(header, struct.pack("<q", 3)))
    return path


@pytest.mark.parametrize(
    "meta, needle",
    [
        ({"format": "ideoquant-calibration", "version": "1"}, "version must be an integer, not a string"),
        ({"format": "ideoquant-calibration", "version": None}, "version must be an integer, not null"),
        ({"format": "ideoquant-calibration", "version": 1, "checksums": ["x"]}, "checksums must be an object"),
        ({"format": "ideoquant-calibration", "version": 1, "max_samples": 0}, "max_samples must be at least 1"),
        ({"format": "ideoquant-calibration", "version": 1, "branches": [1]}, "branches entry must be a string"),
        ('{"format": "ideoquant-calibration", "version": ' + "1" * 5000 + "}", "integer of 5000 digits"),
        ('{"format": ' + "[" * 10_000 + "]" * 10_000 + "}", "nested deeper"),
        (["ideoquant-calibration"], "not an ideoquant calibration statistics file"),
    ],
)
def test_statistics_metadata_fields_are_type_checked(tmp_path, meta, needle):
    from ideoquant.calibrate.statistics import load_importance, load_statistics

    path = stats_file(tmp_path, meta)
    for read in (lambda: load_statistics(path), lambda: load_importance(path, "layers.0.attention.qkv")):
        with pytest.raises(IdeoquantError) as err:
            read()
        assert needle in str(err.value) and "\n" not in str(err.value)


def test_statistics_count_of_the_wrong_shape(tmp_path):
    from ideoquant.calibrate.statistics import load_importance

    path = tmp_path / "stats.safetensors"
    meta = json.dumps({"format": "ideoquant-calibration", "version": 1})
    header = {"__metadata__": {"ideoquant.calibration": meta},
              "transformer/layers.0.attention.qkv/count": entry("I64", [0], [0, 0]),
              "transformer/layers.0.attention.qkv/sumsq": entry("F64", [1], [0, 8])}
    path.write_bytes(safetensors_bytes(header, bytes(8)))
    with pytest.raises(IdeoquantError, match="count must hold one number"):
        load_importance(path, "layers.0.attention.qkv")


def test_imatrix_statistics_with_a_malformed_header_is_one_line(tmp_path, tiny_fp8):
    stats = tmp_path / "stats.safetensors"
    stats.write_bytes(MALFORMED["overlap"][0])
    out = tmp_path / "out"
    proc = run_cli("convert", str(tiny_fp8), "--format", "q4_0", "--imatrix", str(stats), "--out", str(out))
    assert_one_line_error(proc, "overlaps 'a'")
    assert_nothing_written(out)


@pytest.mark.parametrize("line, needle", [
    ('{"id": "a", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"id": "a", "prompt": "x", "seed": ' + "9" * 5000 + "}", "a number too long"),
])
def test_prompt_file_hostile_json(tmp_path, line, needle):
    from ideoquant.calibrate.prompts import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(IdeoquantError, match=needle):
        load_prompts(path, require_caption=False)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_prompt_file_fifo_is_refused(tmp_path):
    from ideoquant.calibrate.prompts import load_prompts

    os.mkfifo(tmp_path / "p.jsonl")
    with pytest.raises(IdeoquantError, match="a FIFO, not a regular file"):
        load_prompts(tmp_path / "p.jsonl")


# --- checkpoint JSON files: index and config ----------------------------------------------

@pytest.mark.parametrize("index, needle", [
    ({"weight_map": ["a.safetensors"]}, "weight_map must be an object, not a list"),
    ({"weight_map": {"x": 3}}, "weight_map['x'] must be a string, not an integer"),
    ({"weight_map": {"x": None}}, "must be a string, not null"),
    ({"weight_map": {"x": "../outside.safetensors"}}, "shard name '../outside.safetensors' points outside its folder"),
    ({"weight_map": {"x": "/etc/passwd"}}, "points outside its folder"),
    ({"weight_map": {"x": "sub/../../x.safetensors"}}, "points outside its folder"),
    ({"weight_map": {"x": ""}}, "points outside its folder"),
    ({"weight_map": {"x": ".."}}, "points outside its folder"),
    ({"metadata": {}}, "no weight_map"),
    ([{"weight_map": {}}], "the index must be an object, not a list"),
])
def test_weight_map_fields_and_paths(tmp_path, index, needle):
    from ideoquant.io.tensor_folder import read_index

    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    with pytest.raises(IdeoquantError) as err:
        read_index(path)
    assert needle in str(err.value)


def test_weight_map_of_shards_beside_the_index(tmp_path):
    from ideoquant.io.tensor_folder import read_index

    path = tmp_path / "model.safetensors.index.json"
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    path.write_text(json.dumps({"metadata": {"total_size": 8}, "weight_map": weight_map}))
    assert read_index(path) == weight_map


@pytest.mark.parametrize("config, needle", [
    ('{"num_layers": "34"}', "num_layers must be an integer, not a string"),
    ('{"num_layers": null}', "num_layers must be an integer, not null"),
    ('{"num_layers": true}', "num_layers must be an integer, not true or false"),
    ('{"num_layers": 0}', "num_layers must be at least 1"),
    ('{"num_layers": 34.5}', "num_layers must be an integer, not a number"),
    ('{"num_layers": 1e400}', "out of range"),
    ('{"num_layers": ' + "3" * 5000 + "}", "5000 digits"),
    ('{"num_attention_heads": "18"}', "num_attention_heads must be an integer"),
    ('[1, 2]', "the file must be an object, not a list"),
    ('"transformer"', "the file must be an object, not a string"),
    ('{"rope_theta": "big"}', "rope_theta must be a number, not a string"),
    ('{"mrope_section": 3}', "mrope_section must be a list, not an integer"),
    ('{"mrope_section": [1, "2"]}', "mrope_section entry must be an integer"),
    ('{"quantization_config": []}', "quantization_config must be an object, not a list"),
])
def test_model_config_fields_are_type_checked(tmp_path, config, needle):
    from ideoquant.io.tensor_folder import read_config

    (tmp_path / "config.json").write_text(config)
    with pytest.raises(IdeoquantError) as err:
        read_config(tmp_path)
    assert needle in str(err.value) and "\n" not in str(err.value)


# --- quantization reports ------------------------------------------------------------------

def good_report() -> dict:
    return {
        "format": "q8_0", "family": "gguf", "source": {"name": "src", "base_model": None},
        "branches": {"transformer": {
            "files": [{"path": "ideogram4-Q8_0.gguf", "size": 10, "sha256": "0" * 64}],
            "tensors": [{"name": "input_proj.weight", "shape": [8, 4], "out_type": "Q8_0", "nbytes": 34, "rel_error": 0.01}],
            "source_checksum": "ab", "recipe": {"alphas": {}},
        }},
        "files": [{"path": "LICENSE", "size": 3, "sha256": "1" * 64}],
    }


def _edit(path: str, value):
    def apply(report):
        *keys, last = path
        target = report
        for k in keys:
            target = target[k]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
        return report
    return apply


T = ("branches", "transformer")
REPORT_CASES = {
    "branches a list": (_edit(("branches",), []), "branches must be an object, not a list"),
    "unknown branch": (lambda r: {**r, "branches": {"../x": r["branches"]["transformer"]}}, "unknown branch '../x'"),
    "files a dict": (_edit(T + ("files",), {}), "branches.transformer.files must be a list"),
    "path outside": (_edit(T + ("files", 0, "path"), "../../etc/passwd"), "is not a file name inside"),
    "path absolute": (_edit(("files", 0, "path"), "/etc/passwd"), "is not a file name inside"),
    "size a string": (_edit(T + ("files", 0, "size"), "10"), "files[0].size must be an integer, not a string"),
    "size negative": (_edit(T + ("files", 0, "size"), -1), "files[0].size must be at least 0"),
    "no sha256": (_edit(T + ("files", 0, "sha256"), KeyError), "files[0] has no sha256"),
    "shape null": (_edit(T + ("tensors", 0, "shape"), None), "tensors[0].shape must be a list, not null"),
    "dim a string": (_edit(T + ("tensors", 0, "shape", 1), "4"), "tensors[0].shape[1] must be an integer"),
    "rel_error a string": (_edit(T + ("tensors", 0, "rel_error"), "0.1"), "tensors[0].rel_error must be a number"),
    "tensor a list": (_edit(T + ("tensors", 0), [1]), "tensors[0] must be an object"),
    "format a number": (_edit(("format",), 8), "format must be a string"),
    "recipe a list": (_edit(T + ("recipe",), []), "recipe must be an object"),
    "source a list": (_edit(("source",), []), "source must be an object"),
}


@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_report_fields_are_type_checked(tmp_path, case):
    from ideoquant.export.report_schema import check_report

    assert check_report(good_report(), tmp_path, "r.json")
    edit, needle = REPORT_CASES[case]
    with pytest.raises(IdeoquantError) as err:
        check_report(edit(good_report()), tmp_path, "r.json")
    assert needle in str(err.value) and str(err.value).startswith("r.json: ")


# --- which branch a lone file holds ----------------------------------------------------------

def test_lone_unconditional_file_is_read_as_the_unconditional_branch(tmp_path, tiny_fp8):
    """A file under `unconditional_transformer/` is that branch, whatever the file is called."""
    from ideoquant.io.source import open_source

    src = tiny_fp8 / "unconditional_transformer" / "diffusion_pytorch_model.safetensors"
    assert list(open_source(src).branches) == ["unconditional_transformer"]
    out = tmp_path / "out"
    proc = run_cli("convert", str(src), "--format", "q8_0", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "quantization_report.json").read_text())
    assert list(report["branches"]) == ["unconditional_transformer"]
    ggufs = [p.name for p in out.glob("*.gguf")]
    assert len(ggufs) == 1 and "uncond" in ggufs[0].lower(), ggufs


def test_branch_from_config_name_or_path(tmp_path, tiny_fp8):
    from ideoquant.io.source import open_source

    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(tiny_fp8 / "unconditional_transformer" / "diffusion_pytorch_model.safetensors", folder / "model.safetensors")
    config = json.loads((tiny_fp8 / "unconditional_transformer" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "ideogram-4/unconditional_transformer"}))
    assert list(open_source(folder).branches) == ["unconditional_transformer"]
    assert list(open_source(folder / "model.safetensors").branches) == ["unconditional_transformer"]


def test_file_name_alone_does_not_pick_the_branch(tmp_path, tiny_fp8):
    from ideoquant.io.source import open_source

    lone = tmp_path / "ideogram4_uncond_fp8.safetensors"
    shutil.copy(tiny_fp8 / "unconditional_transformer" / "diffusion_pytorch_model.safetensors", lone)
    out = tmp_path / "out"
    proc = run_cli("convert", str(lone), "--format", "q8_0", "--out", str(out))
    assert_one_line_error(proc, "pass --branches uncond or --branches cond")
    assert_nothing_written(out)
    assert list(open_source(lone, "uncond").branches) == ["unconditional_transformer"]
    assert list(open_source(lone, "cond").branches) == ["transformer"]
    # A name that says nothing: the conditional branch, as before.
    plain = tmp_path / "ideogram4.safetensors"
    shutil.copy(lone, plain)
    assert list(open_source(plain).branches) == ["transformer"]


# --- config.json and index through the CLI -------------------------------------------------

def _branch_copy(tmp_path: Path, tiny_fp8: Path) -> Path:
    folder = tmp_path / "transformer"
    shutil.copytree(tiny_fp8 / "transformer", folder)
    return folder


@pytest.mark.parametrize("config, needle", [
    (lambda c: {**c, "num_layers": "2"}, "num_layers must be an integer, not a string"),
    (lambda c: {**c, "num_layers": None}, "num_layers must be an integer, not null"),
    (lambda c: [c], "must be an object, not a list"),
])
def test_cli_malformed_config(tmp_path, tiny_fp8, config, needle):
    folder = _branch_copy(tmp_path, tiny_fp8)
    path = folder / "config.json"
    path.write_text(json.dumps(config(json.loads(path.read_text()))))
    out = tmp_path / "out"
    assert_one_line_error(run_cli("convert", str(folder), "--format", "q8_0", "--out", str(out)), needle)
    assert_nothing_written(out)


@pytest.mark.parametrize("weight_map, needle", [
    (["diffusion_pytorch_model.safetensors"], "weight_map must be an object, not a list"),
    ({"input_proj.weight": 7}, "must be a string, not an integer"),
    ({"input_proj.weight": "../outside/diffusion_pytorch_model.safetensors"}, "points outside its folder"),
    ({"input_proj.weight": "OUTSIDE"}, "points outside its folder"),  # an absolute path, filled in below
])
def test_cli_malformed_or_escaping_index(tmp_path, tiny_fp8, weight_map, needle):
    folder = _branch_copy(tmp_path, tiny_fp8)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(folder / "diffusion_pytorch_model.safetensors", outside / "diffusion_pytorch_model.safetensors")
    if weight_map == {"input_proj.weight": "OUTSIDE"}:
        weight_map = {"input_proj.weight": str(outside / "diffusion_pytorch_model.safetensors")}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "out"
    assert_one_line_error(run_cli("convert", str(folder), "--format", "q8_0", "--out", str(out)), needle)
    assert_nothing_written(out)


# --- verify on a tampered folder -----------------------------------------------------------

@pytest.fixture(scope="module")
def converted_q8(tmp_path_factory, tiny_fp8) -> Path:
    out = tmp_path_factory.mktemp("verify") / "q8"
    proc = run_cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--branches", "cond", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def _tampered(tmp_path: Path, converted: Path, edit) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(converted, folder, symlinks=True)
    path = folder / "quantization_report.json"
    report = json.loads(path.read_text())
    result = edit(report, folder)
    path.write_text(result if isinstance(result, str) else json.dumps(result))
    return folder


def _set_first_file_path(value):
    def edit(report, folder):
        report["branches"]["transformer"]["files"][0]["path"] = value
        return report
    return edit


@pytest.mark.parametrize("edit, needle", [
    (lambda r, f: "[" * 100_000 + "]" * 100_000, "nested deeper"),
    (lambda r, f: [r], "must be an object, not a list"),
    (lambda r, f: {**r, "branches": []}, "branches must be an object, not a list"),
    (lambda r, f: {**r, "branches": {"../../x": r["branches"]["transformer"]}}, "unknown branch '../../x'"),
    (lambda r, f: {**r, "branches": {"transformer": {**r["branches"]["transformer"], "tensors": 3}}},
     "branches.transformer.tensors must be a list, not an integer"),
    (_set_first_file_path("../../etc/passwd"), "is not a file name inside"),
    (_set_first_file_path("/etc/passwd"), "is not a file name inside"),
    (lambda r, f: json.dumps(r).replace('"size": ', '"size": 1e400, "x": ', 1), "out of range"),
])
def test_verify_malformed_report(tmp_path, converted_q8, edit, needle):
    folder = _tampered(tmp_path, converted_q8, edit)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert_one_line_error(run_cli("verify", str(folder)), needle)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before  # nothing recorded


def test_verify_refuses_a_listed_file_that_links_outside(tmp_path, converted_q8):
    folder = tmp_path / "copy"
    shutil.copytree(converted_q8, folder)
    gguf = next(folder.glob("*.gguf"))
    outside = tmp_path / "elsewhere.gguf"
    shutil.move(gguf, outside)
    gguf.symlink_to(outside)  # same bytes, same sha256: only the place is wrong
    assert_one_line_error(run_cli("verify", str(folder)), "leads outside")


def test_verify_still_passes_an_untampered_folder(converted_q8, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(converted_q8, folder)
    proc = run_cli("verify", str(folder))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("meta, needle", [
    ("[" * 100_000 + "]" * 100_000, "unreadable quant state"),
    ('{"shape": [' + "9" * 5000 + "]}", "unreadable quant state"),
    ("[1]", "not a JSON object"),
    ('{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": ["4", 8]}', "non-negative integers"),
])
def test_nf4_quant_state_json_is_checked(meta, needle):
    import torch

    from ideoquant.codecs.nf4 import parse_nf4_serialized

    state = torch.tensor(list(meta.encode()), dtype=torch.uint8)
    with pytest.raises(IdeoquantError, match=needle):
        parse_nf4_serialized({"x.weight.quant_state.bitsandbytes__nf4": state}, "x")
