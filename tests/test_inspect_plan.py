"""`inspect --plan` shows what `convert` will write: the same types per tensor, read back from the
GGUF files with the `gguf` package, for plain, `--max-size` and `--calibration` plans."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from ideoquant.calibrate.run import calibrate
from ideoquant.cli import main

CALIB = dict(synthetic=True, steps=2, resolution=64, synthetic_inputs=2, text_tokens=8, max_samples=64, quiet=True)


@pytest.fixture(scope="module")
def stats(tiny_fp8, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "stats.safetensors"
    calibrate(tiny_fp8, path, **CALIB)
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def planned(output: str) -> dict[str, dict[str, tuple[str, str]]]:
    """branch -> tensor name -> (type, encoding or "") from the printed plan tables (columns
    cut at the dashed rule under each header)."""
    plans: dict[str, dict[str, tuple[str, str]]] = {}
    branch, header, spans = None, None, None
    for line in output.splitlines():
        if line.startswith(("transformer:", "unconditional_transformer:")):
            branch, header, spans = line.split(":")[0], None, None
            plans[branch] = {}
        elif line.startswith("name ") and branch is not None:
            header = line
        elif header and spans is None and set(line) <= {"-", " "} and line:
            starts = [i for i, ch in enumerate(line) if ch == "-" and (i == 0 or line[i - 1] == " ")]
            spans = list(zip(starts, starts[1:] + [None]))
            names = [header[a:b].strip() for a, b in spans]
        elif spans and line and not line.startswith(("tensor data", "total", "--max-size")):
            cells = dict(zip(names, (line[a:b].strip() for a, b in spans)))
            plans[branch][cells["name"]] = (cells["type"], cells.get("encoding", ""))
    return plans


def written(out: Path) -> dict[str, dict[str, str]]:
    """branch -> tensor name -> ggml type name, as the `gguf` package reads the files."""
    result = {}
    for path in sorted(out.glob("*.gguf")):
        branch = "unconditional_transformer" if "uncond" in path.name else "transformer"
        result[branch] = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    return result


def assert_plan_matches(plan: dict, files: dict) -> None:
    assert set(plan) == set(files) == {"transformer", "unconditional_transformer"}
    for branch in files:
        assert {n: t for n, (t, _) in plan[branch].items()} == files[branch], branch


def test_plain_plan_is_what_convert_writes(tiny_fp8, tmp_path):
    shown = invoke("inspect", tiny_fp8, "--plan", "q4_k_m")
    assert shown.exit_code == 0, shown.output
    assert invoke("convert", tiny_fp8, "--format", "q4_k_m", "--out", tmp_path / "out", "--quiet").exit_code == 0
    assert_plan_matches(planned(shown.output), written(tmp_path / "out"))


def test_budgeted_calibrated_plan_is_what_convert_writes(tiny_fp8, stats, tmp_path):
    assert invoke("convert", tiny_fp8, "--format", "q4_k", "--out", tmp_path / "plain", "--quiet").exit_code == 0
    size = sum(p.stat().st_size for p in (tmp_path / "plain").glob("*.gguf"))
    shown = invoke("inspect", tiny_fp8, "--plan", "q4_k_m", "--max-size", size, "--calibration", stats)
    assert shown.exit_code == 0, shown.output
    plan = planned(shown.output)
    convert = invoke("convert", tiny_fp8, "--format", "q4_k_m", "--out", tmp_path / "budget", "--quiet",
                     "--max-size", size, "--calibration", stats)
    assert convert.exit_code == 0, convert.output
    files = written(tmp_path / "budget")
    assert_plan_matches(plan, files)
    # The budget changed the plan away from the named mix, and the printed total fits it.
    assert any(types != written_types for types, written_types in
               zip(files["transformer"].values(), planned(invoke("inspect", tiny_fp8, "--plan", "q4_k_m").output)
                   ["transformer"].values()))
    total = int(shown.output.strip().splitlines()[-1].split(":")[1].split()[0].replace(",", ""))
    assert total <= size
    # Error feedback is shown exactly where the type takes it and statistics exist.
    encodings = {n: e for n, (_, e) in plan["transformer"].items()}
    assert encodings["layers.0.feed_forward.w2.weight"] in ("error feedback", "stock encoder")
    assert all(e == "-" for n, e in encodings.items() if plan["transformer"][n][0] == "F32")
    assert any(e == "error feedback" for e in encodings.values())
    # No text ever reaches the unconditional branch's llm_cond_proj: no statistics, stock codes.
    assert plan["unconditional_transformer"]["llm_cond_proj.weight"][1] != "error feedback"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--plan", "q4_k", "--max-size", "10000"], "below the smallest plan"),
        (["--plan", "nf4", "--calibration", "STATS"], "plan GGUF formats, not nf4"),
        (["--plan", "q2_k", "--calibration", "STATS"], "q2_k stores its block linears in Q2_K"),
        (["--max-size", "11GiB"], "give --plan FORMAT too"),
    ],
)
def test_bad_plan_options_are_one_line_errors(tiny_fp8, stats, args, needle):
    result = invoke("inspect", tiny_fp8, *[str(stats) if a == "STATS" else a for a in args])
    assert result.exit_code != 0
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
