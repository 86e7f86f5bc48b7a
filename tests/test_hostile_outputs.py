"""Hostile and careless use of the output side: nothing outside `--out` is touched, nothing
half-written or non-finite is left looking finished, every refusal is one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from ideoquant.cli import main
from ideoquant.io.staging import LOCK_NAME
from ideoquant.io.synthetic import write_synthetic_pipeline

from .test_cli_errors import assert_one_line_error, run_cli

GGUF = "ideogram4-Q8_0.gguf"
UNCOND_GGUF = "ideogram4-uncond-Q8_0.gguf"

# The CLI with each GGUF chunk write slowed down: a real conversion that is still writing
# when the test acts on it (a signal, a second run). The second file's chunks take
# SECOND_FILE_DELAY seconds each: a window no busy machine closes before the signal lands.
SLOW_CLI = (
    "import os, sys, time\n"
    "import ideoquant.io.gguf_writer as w\n"
    "files = []\n"
    "real_init, real_write = w.GGUFStreamWriter.__init__, w.GGUFStreamWriter.write_chunk\n"
    "def init(self, *args, **kwargs):\n"
    "    files.append(1)\n"
    "    real_init(self, *args, **kwargs)\n"
    "def slow(self, data):\n"
    "    time.sleep(0.02 if len(files) < 2 else float(os.environ.get('SECOND_FILE_DELAY', '0.02')))\n"
    "    return real_write(self, data)\n"
    "w.GGUFStreamWriter.__init__, w.GGUFStreamWriter.write_chunk = init, slow\n"
    "from ideoquant.cli import main\n"
    "sys.argv[0] = 'ideoquant'\n"
    "main()\n"
)


def cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI in this process (no interpreter start-up): for refusals that end before writing."""
    result = CliRunner().invoke(main, list(args))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.output)


def default_signals() -> None:
    """The signal dispositions of a command started from a terminal (a test run started in the
    background inherits SIGINT ignored, which the run rightly keeps ignoring)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def start_slow_convert(*args: str, second_file_delay: float = 0.02) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, "convert", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_signals, env={**os.environ, "SECOND_FILE_DELAY": str(second_file_delay)},
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path.name} appeared: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path.name} did not appear")
        time.sleep(0.005)


def snapshot(path: Path) -> tuple[bytes, int]:
    """Content and mtime of a file that must not change."""
    return path.read_bytes(), path.stat().st_mtime_ns


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def assert_no_staging_left(folder: Path) -> None:
    assert not [p for p in files_under(folder) if p.endswith(".partial") or p.endswith(LOCK_NAME)], files_under(folder)


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside every output folder that a hostile link points at."""
    p = tmp_path / "elsewhere" / "precious.txt"
    p.parent.mkdir()
    p.write_text("not to be overwritten\n")
    return p


@pytest.fixture
def bf16_source(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bf16") / "src"
    write_synthetic_pipeline(out, size="tiny", dtype="bf16", layout="fused", seed=3)
    return out


def edit_tensors(folder: Path, branch: str, fn) -> None:
    f = folder / branch / "diffusion_pytorch_model.safetensors"
    tensors = fn(load_file(f))
    save_file(tensors, f, metadata={"format": "pt"})


# --- 1. links at output names ------------------------------------------------------------------

def test_symlink_at_staging_name_is_refused(tiny_fp8, tmp_path, victim):
    out = tmp_path / "o"
    out.mkdir()
    (out / f"{GGUF}.partial").symlink_to(victim)
    before = snapshot(victim)
    proc = cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet")
    assert_one_line_error(proc, "is a symbolic link; refusing to write through it")
    assert snapshot(victim) == before
    assert files_under(out) == [f"{GGUF}.partial"]  # the link itself, nothing of the run


def test_hard_link_at_staging_name_is_replaced_not_written_through(tiny_fp8, tmp_path, victim):
    out = tmp_path / "o"
    out.mkdir()
    os.link(victim, out / f"{GGUF}.partial")
    before = snapshot(victim)
    proc = run_cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(victim) == before
    assert_no_staging_left(out)


def test_symlinked_branch_folder_leading_outside_is_refused(tiny_fp8, tmp_path, victim):
    out = tmp_path / "o"
    out.mkdir()
    (out / "transformer").symlink_to(victim.parent, target_is_directory=True)
    proc = cli("convert", str(tiny_fp8), "--format", "nf4", "--out", str(out), "--quiet")
    assert_one_line_error(proc, "leads outside")
    assert sorted(p.name for p in victim.parent.iterdir()) == ["precious.txt"]
    assert files_under(out) == ["transformer"]


def test_symlinked_final_name_is_replaced_by_the_file_not_followed(tiny_fp8, tmp_path, victim):
    out = tmp_path / "o"
    out.mkdir()
    (out / GGUF).symlink_to(victim)
    before = snapshot(victim)
    proc = run_cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet")
    assert_one_line_error(proc, "already exists (use --overwrite")
    proc = run_cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(victim) == before
    assert not (out / GGUF).is_symlink() and (out / GGUF).read_bytes()[:4] == b"GGUF"


# --- 2. two runs into one folder ----------------------------------------------------------------

def test_second_run_into_the_same_folder_is_refused_while_the_first_runs(tiny_fp8, tmp_path):
    out = tmp_path / "o"
    first = start_slow_convert(str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet")
    try:
        wait_for(out / f"{GGUF}.partial", first)
        first.send_signal(signal.SIGSTOP)  # mid-write for as long as the second run takes
        second = run_cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet", "--overwrite")
        assert_one_line_error(second, "is in use by another ideoquant run")
        assert f"pid {first.pid}" in second.stderr
        assert first.poll() is None  # refused while the first still runs (stopped mid-run)
        assert any(p.endswith(".partial") or p.endswith(".gguf") for p in files_under(out))  # nothing of it removed
    finally:
        first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    verified = run_cli("verify", str(out))
    assert verified.returncode == 0, verified.stderr
    assert_no_staging_left(out)


# --- 3. overflow ---------------------------------------------------------------------------------

def test_f16_overflow_of_a_finite_bf16_weight_is_an_error_naming_it(bf16_source, tmp_path):
    def big(t):
        t["layers.1.feed_forward.w2.weight"][3, 5] = 70000.0
        return t

    edit_tensors(bf16_source, "unconditional_transformer", big)
    out = tmp_path / "o"
    proc = run_cli("convert", str(bf16_source), "--format", "f16", "--out", str(out), "--quiet")
    assert_one_line_error(proc, "tensor layers.1.feed_forward.w2.weight: 1 values overflow F16")
    assert "--clamp-overflow stores them as ±65504" in proc.stderr
    assert not out.exists()  # the first branch's finished file and the folder itself removed


def test_clamp_overflow_stores_the_largest_f16_and_records_it(bf16_source, tmp_path):
    from gguf import GGUFReader

    def big(t):
        t["layers.1.feed_forward.w2.weight"][3, 5] = 70000.0
        t["layers.1.feed_forward.w2.weight"][4, 6] = -1e30
        return t

    edit_tensors(bf16_source, "transformer", big)
    out = tmp_path / "o"
    proc = run_cli("convert", str(bf16_source), "--format", "f16", "--out", str(out), "--quiet", "--clamp-overflow")
    assert proc.returncode == 0, proc.stderr
    reader = GGUFReader(out / "ideogram4-F16.gguf")
    tensor = next(t for t in reader.tensors if t.name == "layers.1.feed_forward.w2.weight")
    values = tensor.data.reshape(-1, int(tensor.shape[0]))  # the gguf package's own view, [out, in]
    assert values[3, 5] == 65504.0 and values[4, 6] == -65504.0
    assert int((abs(values.astype("float32")) == 65504.0).sum()) == 2
    report = json.loads((out / "quantization_report.json").read_text())
    branch = report["branches"]["transformer"]
    assert branch["recipe"]["clamped"] == {"layers.1.feed_forward.w2.weight": 2}
    assert report["options"]["clamp_overflow"] is True
    entry = next(t for t in branch["tensors"] if t["name"] == "layers.1.feed_forward.w2.weight")
    assert "2 values beyond the F16 range stored as ±65504" in entry["note"] and entry["rel_error"] > 0
    assert "clamped: layers.1.feed_forward.w2.weight 2" in (out / "README.md").read_text()
    assert "clamped" not in report["branches"]["unconditional_transformer"]["recipe"]


def test_q8_0_block_scale_overflow_is_an_error(bf16_source, tmp_path):
    # A block maximum of 1e7 needs a Q8_0 scale of 1e7 / 127 > 65504, the fp16 maximum.
    def big(t):
        t["layers.0.attention.qkv.weight"][0, 0] = 1e7
        return t

    edit_tensors(bf16_source, "transformer", big)
    proc = run_cli("convert", str(bf16_source), "--format", "q8_0", "--out", str(tmp_path / "o"), "--quiet")
    assert_one_line_error(proc, "tensor layers.0.attention.qkv.weight: 32 values overflow Q8_0")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["q8_0", "nf4"])
def test_huge_fp8_scale_overflowing_float32_is_an_error(edit_source, tmp_path, fmt):
    def huge(t):
        t["layers.0.feed_forward.w1.weight_scale"] = torch.full_like(t["layers.0.feed_forward.w1.weight_scale"], 1e38)
        return t

    src = edit_source(huge)
    out = tmp_path / "o"
    proc = run_cli("convert", str(src), "--format", fmt, "--out", str(out), "--quiet")
    assert_one_line_error(proc, "source values overflow float32 when decoded")
    assert "layers.0.feed_forward.w1" in proc.stderr
    assert not out.exists()


def test_int8_overflow_is_an_error(edit_source, tiny_fp8, tmp_path):
    from ideoquant.calibrate.run import calibrate

    def huge(t):
        t["layers.1.attention.o.weight_scale"] = torch.full_like(t["layers.1.attention.o.weight_scale"], 1e38)
        return t

    src = edit_source(huge, branch="unconditional_transformer")
    stats = tmp_path / "stats.safetensors"  # statistics of this very source, as convert demands
    calibrate(src, stats, synthetic=True, steps=1, resolution=32, synthetic_inputs=1, text_tokens=4,
              max_samples=16, quiet=True)
    out = tmp_path / "o"
    proc = run_cli("convert", str(src), "--format", "int8", "--calibration", str(stats), "--out", str(out), "--quiet")
    assert_one_line_error(proc, "source values overflow float32 when decoded")
    assert "layers.1.attention" in proc.stderr
    assert not out.exists()


def test_fp8_decode_matches_torch_on_huge_and_tiny_scales():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F].view(torch.float8_e4m3fn)  # every non-NaN e4m3 value
    from ideoquant.codecs.fp8 import fp8_to_float32

    for s in (1.0, 3.5e-3, 1e36, 2e36, 1e38, 3.4e38, 1e-40):
        scale = torch.tensor(s, dtype=torch.float32)
        ours = fp8_to_float32(codes, scale)
        theirs = codes.to(torch.float32) * scale
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), s
    rows = torch.full((codes.numel(), 1), 1e38)
    assert torch.equal(fp8_to_float32(codes.reshape(-1, 1), rows).view(torch.int32),
                       (codes.reshape(-1, 1).to(torch.float32) * rows).view(torch.int32))


# --- 4. licence links -----------------------------------------------------------------------------

def test_license_symlink_leading_outside_the_source_is_not_copied_or_listed(tiny_fp8, tmp_path, victim):
    src = tmp_path / "src"
    shutil.copytree(tiny_fp8, src)
    (src / "LICENSE").symlink_to(victim)
    (src / "README.md").symlink_to(victim)
    out = tmp_path / "o"
    proc = run_cli("convert", str(src), "--format", "q8_0", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "leads outside the source; not copied" in proc.stderr
    assert not (out / "LICENSE").exists()
    assert "not to be overwritten" not in (out / "README.md").read_text()
    plan = run_cli("publish", str(out), "--repo-id", "someone/x", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "LICENSE" not in plan.stdout and "ideogram4-Q8_0.gguf" in plan.stdout


def test_license_symlink_within_the_source_is_copied(tiny_fp8, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_fp8, src)
    (src / "licence-text.md").write_text("the licence\n")
    (src / "LICENSE.md").symlink_to("licence-text.md")
    out = tmp_path / "o"
    proc = run_cli("convert", str(src), "--format", "q8_0", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (out / "LICENSE.md").read_text() == "the licence\n" and not (out / "LICENSE.md").is_symlink()


# --- 5. --out and the source -------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "inside_source", "source_inside", "branch_file_inside"])
def test_out_and_source_may_not_contain_each_other(tiny_fp8, tmp_path, where):
    root = tmp_path / "r"
    src = root / "src"
    shutil.copytree(tiny_fp8, src)
    weights = src / "transformer" / "diffusion_pytorch_model.safetensors"
    given, out = {
        "same": (src, src),
        "inside_source": (src, src / "q8"),
        "source_inside": (src, root),
        "branch_file_inside": (weights, src / "transformer"),
    }[where]
    before = {p: snapshot(p) for p in src.rglob("*") if p.is_file()}
    listing = files_under(root)
    proc = cli("convert", str(given), "--format", "nf4", "--out", str(out), "--quiet", "--overwrite")
    assert_one_line_error(proc, "--out")
    assert {p: snapshot(p) for p in src.rglob("*") if p.is_file()} == before
    assert files_under(root) == listing


# --- 6. signals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_write_ends_the_run_cleanly_and_a_rerun_works(tiny_fp8, tmp_path, sig):
    out = tmp_path / "o"
    proc = start_slow_convert(str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet", second_file_delay=1.0)
    # The second branch's staging file: the first branch's file is finished by then.
    wait_for(out / f"{UNCOND_GGUF}.partial", proc)
    assert (out / GGUF).exists()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 128 + sig, stderr
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                          f"interrupted ({signal.Signals(sig).name}); partial outputs removed")
    assert not out.exists(), files_under(out)
    rerun = run_cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet")
    assert rerun.returncode == 0, rerun.stderr


def test_an_ignored_sighup_stays_ignored(tiny_fp8, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, "convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # as `nohup` starts it
    )
    wait_for(out / f"{GGUF}.partial", proc)
    proc.send_signal(signal.SIGHUP)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert run_cli("verify", str(out)).returncode == 0


# --- 10. card fields -------------------------------------------------------------------------------

HOSTILE_CARD = """---
license: other
license_name: "evil` <script>alert(1)</script>\\n\\n# Heading [click](javascript:alert(1))"
license_link: "javascript:alert(1)"
---
# a source
"""


def test_card_fields_from_the_source_are_escaped(tiny_fp8, tmp_path):
    from markdown_it import MarkdownIt

    src = tmp_path / "src"
    shutil.copytree(tiny_fp8, src)
    (src / "README.md").write_text(HOSTILE_CARD)
    out = tmp_path / "o"
    proc = run_cli("convert", str(src), "--format", "q8_0", "--out", str(out), "--quiet", "--base-model", "owner/model")
    assert proc.returncode == 0, proc.stderr
    card = ModelCard.load(out / "README.md")
    assert "\n" not in card.data.license_name and "<script>" in card.data.license_name  # kept, as one line of text
    assert card.data.license_link != "javascript:alert(1)"
    html = MarkdownIt().render(card.text)
    assert "<script" not in html and 'href="javascript' not in html and "<h1>Heading" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown as text


@pytest.mark.parametrize("bad", ["evil](javascript:alert(1))", "a/b/c", "owner/name\n# x", "../etc"])
def test_base_model_must_be_a_repo_id(tiny_fp8, tmp_path, bad):
    out = tmp_path / "o"
    proc = cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--base-model", bad)
    assert_one_line_error(proc, "--base-model")
    assert "is not a Hugging Face repo id" in proc.stderr
    assert not out.exists()


# --- 12. smaller -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["q8_0", "f16", "nf4"])
def test_imatrix_on_a_format_that_ignores_it_is_an_error(tiny_fp8, tmp_path, fmt):
    out = tmp_path / "o"
    proc = cli("convert", str(tiny_fp8), "--format", fmt, "--out", str(out), "--imatrix", "ones", "--quiet")
    assert_one_line_error(proc, "--imatrix")
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["q8_0", "nf4"])
def test_clamp_overflow_on_a_format_without_f16_tensors_is_an_error(tiny_fp8, tmp_path, fmt):
    out = tmp_path / "o"
    proc = cli("convert", str(tiny_fp8), "--format", fmt, "--out", str(out), "--clamp-overflow", "--quiet")
    assert_one_line_error(proc, "--clamp-overflow applies to")
    assert not out.exists()


def test_disk_space_message_shows_small_sizes(tiny_fp8, tmp_path, monkeypatch):
    import ideoquant.io.staging as staging

    monkeypatch.setattr(staging.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    result = CliRunner().invoke(main, ["convert", str(tiny_fp8), "--format", "q8_0", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 1
    line = next(l for l in result.output.splitlines() if l.startswith("error:"))
    assert "1000 bytes free" in line and "0.00 GiB" not in line
    assert "MiB" in line or "KiB" in line
    assert not (tmp_path / "o").exists()


def test_failure_after_making_folders_leaves_none(edit_source, tmp_path):
    def poison(t):
        w = t["layers.1.feed_forward.w2.weight"].float()
        w[0, 0] = float("nan")
        t["layers.1.feed_forward.w2.weight"] = w.to(torch.float8_e4m3fn)
        return t

    src = edit_source(poison, branch="unconditional_transformer")
    out = tmp_path / "deep" / "er" / "o"
    proc = run_cli("convert", str(src), "--format", "nf4", "--out", str(out), "--quiet")
    assert_one_line_error(proc, "NaN/Inf")
    assert not (tmp_path / "deep").exists()  # every folder the run made is gone again


def test_lock_file_link_is_refused(tiny_fp8, tmp_path, victim):
    out = tmp_path / "o"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(victim)
    before = snapshot(victim)
    proc = cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet")
    assert_one_line_error(proc, "is a symbolic link")
    assert snapshot(victim) == before


def test_stale_lock_file_of_a_killed_run_does_not_block(tiny_fp8, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / LOCK_NAME).write_text("999999\n")  # left by a run killed with SIGKILL: nobody holds it
    (out / f"{GGUF}.partial").write_bytes(b"half a file")
    proc = run_cli("convert", str(tiny_fp8), "--format", "q8_0", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert_no_staging_left(out)
    assert json.loads((out / "quantization_report.json").read_text())["format"] == "q8_0"
