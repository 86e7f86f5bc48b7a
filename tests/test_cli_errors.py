"""Bad input gets one line on stderr, a non-zero exit, and no finished-looking output."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ideoquant.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ideoquant.cli", *args], capture_output=True, text=True)


def assert_one_line_error(proc, needle: str) -> None:
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def assert_nothing_written(out: Path) -> None:
    if out.exists():
        leftovers = [p.name for p in out.rglob("*") if p.is_file()]
        assert leftovers == [], leftovers


def test_nonexistent_path(tmp_path):
    proc = run_cli("convert", str(tmp_path / "missing"), "--format", "q8_0", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "no such file or folder")
    assert_nothing_written(tmp_path / "o")


def test_truncated_file(tmp_path, tiny_fp8):
    data = (tiny_fp8 / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-1000])
    proc = run_cli("convert", str(tmp_path / "cut.safetensors"), "--format", "q8_0", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "truncated")
    assert_nothing_written(tmp_path / "o")


def test_not_safetensors(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 4 + b"garbage" * 100)
    proc = run_cli("inspect", str(tmp_path / "x.safetensors"))
    assert_one_line_error(proc, "not a safetensors file")
    (tmp_path / "notes.txt").write_text("hello")
    proc = run_cli("convert", str(tmp_path / "notes.txt"), "--format", "q8_0", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "not a .safetensors file")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: {k: v for k, v in t.items() if k != "layers.0.attention.qkv.weight"}, "missing tensor layers.0.attention.qkv.weight"),
        (lambda t: {**t, "final_layer.linear.bias": torch.zeros(7, dtype=torch.bfloat16)}, "final_layer.linear.bias has shape [7]"),
        (lambda t: {k: v for k, v in t.items() if k != "llm_cond_proj.weight_scale"}, "has no llm_cond_proj.weight_scale"),
    ],
)
def test_inventory_problems(edit_source, tmp_path, edit, needle):
    src = edit_source(edit)
    proc = run_cli("convert", str(src), "--format", "q8_0", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, needle)
    assert_nothing_written(tmp_path / "o")


def test_nan_weight_mid_conversion_leaves_nothing(edit_source, tmp_path):
    def poison(t):
        w = t["layers.1.feed_forward.w2.weight"].float()
        w[0, 0] = float("nan")
        t["layers.1.feed_forward.w2.weight"] = w.to(torch.float8_e4m3fn)
        return t

    # Poison the second branch so the first has already finished when the error comes.
    src = edit_source(poison, branch="unconditional_transformer")
    proc = run_cli("convert", str(src), "--format", "q8_0", "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(proc, "layers.1.feed_forward.w2.weight has 1 NaN/Inf")
    assert_nothing_written(tmp_path / "o")


def test_existing_output_refused_unless_overwrite(tiny_fp8, tmp_path):
    out = tmp_path / "o"
    assert run_cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet").returncode == 0
    before = (out / "ideogram4-Q8_0.gguf").stat().st_mtime_ns
    proc = run_cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet")
    assert_one_line_error(proc, "already exists (use --overwrite")
    assert (out / "ideogram4-Q8_0.gguf").stat().st_mtime_ns == before
    proc = run_cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet", "--overwrite")
    assert proc.returncode == 0, proc.stderr


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_not_enough_free_disk_checked_before_writing(tiny_fp8, tmp_path, monkeypatch):
    import ideoquant.io.staging as files

    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    result = _invoke(["convert", str(tiny_fp8), "--format", "q8_0", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 1
    assert "not enough free disk" in result.output
    assert_nothing_written(tmp_path / "o")


def test_disk_full_and_interrupt_mid_write_leave_nothing(tiny_fp8, tmp_path, monkeypatch, capsys):
    from ideoquant.io.gguf_writer import GGUFStreamWriter

    real_write = GGUFStreamWriter.write_chunk
    for exc_factory, code, needle in [
        (lambda: OSError(errno.ENOSPC, "No space left on device"), 1, "disk full while writing"),
        (lambda: KeyboardInterrupt(), 130, "interrupted"),
    ]:
        calls = {"n": 0}

        def failing_write(*a, **k):
            calls["n"] += 1
            if calls["n"] == 60:  # in the second branch, after the first file was finished
                raise exc_factory()
            return real_write(*a, **k)

        monkeypatch.setattr(GGUFStreamWriter, "write_chunk", failing_write)
        out = tmp_path / f"o{code}"
        result = _invoke(["convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet"])
        assert result.exit_code == code
        assert needle in result.output
        assert_nothing_written(out)


def test_inspect_shows_policy_per_tensor(tiny_fp8, tmp_path):
    proc = run_cli("inspect", str(tiny_fp8), "--plan", "q4_k")
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("input_proj.weight"))
    assert "Q8_0" in line and "fallback" in line
    assert run_cli("convert", str(tiny_fp8), "--format", "f16", "--out", str(tmp_path), "--quiet").returncode == 0
    proc = run_cli("inspect", str(tmp_path / "ideogram4-F16.gguf"))
    assert "layers.0.attention.qkv.weight" in proc.stdout and "F16" in proc.stdout
    assert "ideoquant.source.checksum" in proc.stdout
    proc = run_cli("inspect", str(tiny_fp8 / "transformer"))
    assert "float8_e4m3fn" in proc.stdout and "weight_scale" in proc.stdout


def test_imatrix_on_a_format_without_an_importance_encoder(tiny_fp8, tmp_path):
    proc = run_cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(tmp_path / "o"), "--imatrix", "ones")
    assert_one_line_error(proc, "--imatrix has no effect on q8_0")
    # ggml's quantize_row_*_impl encoders: every 4-bit and K type takes one, Q8_0 none.
    line = next(l for l in proc.stderr.splitlines() if l.startswith("error:"))
    named = set(line.split("use one: ")[1].split(")")[0].split(", "))
    assert named == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    assert_nothing_written(tmp_path / "o")
