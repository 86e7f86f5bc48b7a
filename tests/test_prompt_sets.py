"""The packaged prompt sets and the prompt file loader."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from ideoquant.calibrate.prompts import (
    CATEGORIES,
    PROMPT_SET_NAMES,
    PROMPTS_DIR,
    PromptRecord,
    default_prompt_file,
    load_prompts,
)
from ideoquant.errors import IdeoquantError

MIN_COUNTS = {"calibration": 128, "evaluation_quality": 200, "evaluation_text": 100}
ID_PREFIX = {"calibration": "cal", "evaluation_quality": "evq", "evaluation_text": "evt"}
ALLOWED_FIELDS = {"id", "category", "prompt", "target_text", "width", "height", "seed"}


@pytest.fixture(scope="module")
def sets() -> dict[str, list[PromptRecord]]:
    return {name: load_prompts(default_prompt_file(name)) for name in PROMPT_SET_NAMES}


@pytest.fixture(scope="module")
def raw_lines() -> dict[str, list[dict]]:
    out = {}
    for name in PROMPT_SET_NAMES:
        text = default_prompt_file(name).read_text(encoding="utf-8")
        assert text.endswith("\n")
        out[name] = [json.loads(line) for line in text.splitlines()]
    return out


def test_default_prompt_file_locates_the_packaged_sets():
    for name in PROMPT_SET_NAMES:
        path = default_prompt_file(name)
        assert path == PROMPTS_DIR / f"{name}.jsonl"
        assert path.is_file()
        assert default_prompt_file(f"{name}.jsonl") == path
    assert PROMPTS_DIR.name == "calibration_prompts"
    assert (PROMPTS_DIR / "README.md").is_file()
    with pytest.raises(IdeoquantError, match="unknown prompt set"):
        default_prompt_file("nonexistent")


def test_every_line_follows_the_schema(raw_lines):
    for name, records in raw_lines.items():
        for lineno, rec in enumerate(records, start=1):
            where = f"{name}:{lineno}"
            assert isinstance(rec, dict), where
            assert set(rec) <= ALLOWED_FIELDS, where
            assert re.fullmatch(rf"{ID_PREFIX[name]}-\d{{4}}", rec["id"]), where
            assert rec["category"] in CATEGORIES, where
            assert isinstance(rec["prompt"], str), where
            caption = json.loads(rec["prompt"])
            # Key order as in the caption schema of the prompt enhancer.
            assert list(caption) == ["high_level_description", "compositional_deconstruction"], where
            comp = caption["compositional_deconstruction"]
            assert list(comp) == ["background", "elements"], where
            assert caption["high_level_description"].strip() and comp["background"].strip(), where
            assert comp["elements"], where
            for element in comp["elements"]:
                if element["type"] == "obj":
                    assert list(element) == ["type", "desc"], where
                else:
                    assert element["type"] == "text", where
                    assert list(element) == ["type", "text", "desc"], where
                    assert element["text"].strip(), where
                assert element["desc"].strip(), where
            assert isinstance(rec["width"], int) and isinstance(rec["height"], int), where
            assert rec["width"] % 16 == 0 and rec["height"] % 16 == 0, where
            assert 512 <= rec["width"] <= 2048 and 512 <= rec["height"] <= 2048, where
            assert isinstance(rec["seed"], int) and rec["seed"] >= 0, where
            assert ("target_text" in rec) == (name == "evaluation_text"), where


def test_counts(sets):
    for name, minimum in MIN_COUNTS.items():
        assert len(sets[name]) >= minimum, name


def test_ids_unique_across_all_files(sets):
    ids = [r.id for records in sets.values() for r in records]
    assert len(ids) == len(set(ids))


def test_seeds_unique_within_each_file(sets):
    for name, records in sets.items():
        seeds = [r.seed for r in records]
        assert len(seeds) == len(set(seeds)), name


def test_calibration_and_evaluation_are_disjoint(sets):
    def normalized(record: PromptRecord) -> str:
        return " ".join(record.prompt.split()).lower()

    calibration = {normalized(r) for r in sets["calibration"]}
    for name in ("evaluation_quality", "evaluation_text"):
        assert not calibration & {normalized(r) for r in sets[name]}, name
    quality = {normalized(r) for r in sets["evaluation_quality"]}
    assert not quality & {normalized(r) for r in sets["evaluation_text"]}
    for name, records in sets.items():
        assert len({normalized(r) for r in records}) == len(records), f"duplicate prompt in {name}"


def test_text_prompts_carry_their_target(sets):
    for record in sets["evaluation_text"]:
        target = record.target_text
        assert target and target.strip() == target, record.id
        assert target in record.prompt, record.id
        # One text element, and it is the target, so OCR has a single string to match.
        assert record.text_elements() == [target], record.id


def test_category_spread(sets):
    for name, records in sets.items():
        counts = Counter(r.category for r in records)
        assert len(counts) >= 6, (name, counts)
        # No category dominates a set.
        assert max(counts.values()) <= 0.25 * len(records), (name, counts)
    assert {r.category for r in sets["calibration"]} == set(CATEGORIES)
    assert {r.category for r in sets["evaluation_quality"]} == set(CATEGORIES)


def _scripts(text: str) -> set[str]:
    names = set()
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            names.add(name.split()[0] if name else "?")
    return names


def test_multilingual_text_uses_several_scripts(sets):
    scripts = set()
    for record in sets["evaluation_text"]:
        if record.category == "multilingual_text":
            scripts |= _scripts(record.target_text)
    # e.g. LATIN, CJK, HIRAGANA, KATAKANA, HANGUL, CYRILLIC, GREEK, ARABIC, HEBREW, DEVANAGARI, THAI
    assert len(scripts) >= 6, scripts
    assert {"CYRILLIC", "HANGUL", "ARABIC", "DEVANAGARI"} <= scripts


def test_first_lines_of_calibration_span_categories(sets):
    assert len({r.category for r in sets["calibration"][:14]}) == 14


def test_generator_output_is_up_to_date():
    script = Path(__file__).resolve().parents[1] / "tools" / "make_prompts.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------ loader

GOOD_CAPTION = json.dumps(
    {
        "high_level_description": "A red mug on a desk, a product photograph.",
        "compositional_deconstruction": {
            "background": "Light oak desk.",
            "elements": [
                {"type": "obj", "desc": "Red mug."},
                {"type": "text", "text": "HELLO", "desc": "White letters on the mug."},
            ],
        },
    }
)


def _line(**fields) -> str:
    record = {"id": "t-1", "category": "product", "prompt": GOOD_CAPTION}
    record.update(fields)
    return json.dumps({k: v for k, v in record.items() if v is not None}, ensure_ascii=False)


def test_load_prompts_accepts_a_valid_file(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(
        _line(target_text="HELLO", width=1024, height=768, seed=3)
        + "\n\n"
        + _line(id="t-2", prompt="a free-form prompt")
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(IdeoquantError, match=r"ok\.jsonl:3: prompt is not a JSON caption"):
        load_prompts(path)
    records = load_prompts(path, require_caption=False)
    assert [r.id for r in records] == ["t-1", "t-2"]
    assert records[0] == PromptRecord("t-1", "product", GOOD_CAPTION, "HELLO", 1024, 768, 3)
    assert records[0].text_elements() == ["HELLO"]
    assert records[1].target_text is None and records[1].seed is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json\n", r"bad\.jsonl:1: invalid JSON"),
        ("[1, 2]\n", r"bad\.jsonl:1: line is not a JSON object"),
        (_line(id=None) + "\n", r"bad\.jsonl:1: missing field 'id'"),
        (_line(extra=1) + "\n", r"bad\.jsonl:1: unknown field"),
        (_line(id="has space") + "\n", r"bad\.jsonl:1: 'id' must be"),
        (_line(category="selfies") + "\n", r"bad\.jsonl:1: unknown category"),
        (_line(prompt="") + "\n", r"bad\.jsonl:1: 'prompt' must be a non-empty string"),
        (_line(prompt='{"high_level_description": "x"}') + "\n", r"bad\.jsonl:1: caption: missing key"),
        (
            _line(prompt=GOOD_CAPTION.replace('"obj"', '"shape"')) + "\n",
            r"bad\.jsonl:1: caption element 0: 'type' must be",
        ),
        (_line(target_text="GOODBYE") + "\n", r"bad\.jsonl:1: target_text 'GOODBYE' is not in any text element"),
        (_line(target_text="") + "\n", r"bad\.jsonl:1: 'target_text' must be a non-empty string"),
        (_line(width=1000, height=1024) + "\n", r"bad\.jsonl:1: 'width' must be a positive multiple of 16"),
        (_line(width=1024) + "\n", r"bad\.jsonl:1: 'width' and 'height' must be given together"),
        (_line(seed="7") + "\n", r"bad\.jsonl:1: 'seed' must be an integer"),
        (_line(seed=True) + "\n", r"bad\.jsonl:1: 'seed' must be an integer"),
        (_line(seed=-1) + "\n", r"bad\.jsonl:1: 'seed' must lie in"),
        (_line() + "\n" + _line() + "\n", r"bad\.jsonl:2: duplicate id 't-1' \(first on line 1\)"),
        ("\n\n", r"bad\.jsonl: no prompts in file"),
    ],
)
def test_load_prompts_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(IdeoquantError, match=message) as info:
        load_prompts(path)
    assert "\n" not in str(info.value)


def test_load_prompts_missing_and_undecodable_files(tmp_path):
    with pytest.raises(IdeoquantError, match="no such prompt file"):
        load_prompts(tmp_path / "absent.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(IdeoquantError, match="not a UTF-8 text file"):
        load_prompts(binary)
