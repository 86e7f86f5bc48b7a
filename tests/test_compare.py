"""Paired bootstrap comparison of score files, and PSNR / SSIM of image folders."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from ideoquant.errors import IdeoquantError
from ideoquant.export import compare
from ideoquant.export.compare import (
    ImageComparison,
    PairedResult,
    ScoreComparison,
    compare_image_dirs,
    compare_score_files,
    format_comparison,
    load_scores,
    pair_key,
    paired_bootstrap,
    psnr,
    ssim,
)

# --------------------------------------------------------------------- bootstrap


def loop_bootstrap(a, b, resamples, seed, confidence):
    """Straightforward reference: one resample at a time, percentile by hand."""
    n = len(a)
    diffs = [float(b[i]) - float(a[i]) for i in range(n)]
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(resamples):
        picks = rng.integers(0, n, size=n)
        means.append(sum(diffs[int(k)] for k in picks) / n)
    means.sort()

    def percentile(q):
        pos = q * (len(means) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(means) - 1)
        return means[lo] + (means[hi] - means[lo]) * (pos - lo)

    alpha = 1 - confidence
    return sum(diffs) / n, percentile(alpha / 2), percentile(1 - alpha / 2)


def test_constant_difference_gives_a_point_interval():
    a = np.arange(12, dtype=np.float64)
    r = paired_bootstrap(a, a + 0.25, resamples=500, seed=1)
    assert r.n == 12
    assert r.mean_diff == 0.25
    assert r.ci_low == r.ci_high == 0.25
    assert r.excludes_zero
    assert r.mean_b - r.mean_a == pytest.approx(0.25)

    same = paired_bootstrap(a, a.copy(), resamples=200)
    assert same.ci_low == same.ci_high == 0.0
    assert not same.excludes_zero


def test_single_pair():
    r = paired_bootstrap(np.array([0.5]), np.array([0.75]), resamples=50)
    assert (r.n, r.ci_low, r.ci_high, r.mean_diff) == (1, 0.25, 0.25, 0.25)


@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.5])
def test_matches_a_loop_bootstrap_with_the_same_draws(confidence):
    rng = np.random.default_rng(123)
    a = rng.normal(0.30, 0.05, size=37)
    b = a + rng.normal(0.004, 0.02, size=37)
    r = paired_bootstrap(a, b, resamples=3000, seed=7, confidence=confidence)
    mean_diff, low, high = loop_bootstrap(a, b, 3000, 7, confidence)
    assert r.mean_diff == pytest.approx(mean_diff, abs=1e-12)
    assert r.ci_low == pytest.approx(low, abs=1e-12)
    assert r.ci_high == pytest.approx(high, abs=1e-12)
    assert r.mean_a == pytest.approx(a.mean()) and r.mean_b == pytest.approx(b.mean())
    assert r.confidence == confidence


def test_result_does_not_depend_on_chunking(monkeypatch):
    rng = np.random.default_rng(5)
    a, b = rng.random(50), rng.random(50)
    whole = paired_bootstrap(a, b, resamples=999, seed=3)
    monkeypatch.setattr(compare, "_CHUNK_ELEMENTS", 170)  # 3 resamples per chunk
    chunked = paired_bootstrap(a, b, resamples=999, seed=3)
    assert whole == chunked


def test_seed_controls_the_draws():
    rng = np.random.default_rng(9)
    a, b = rng.random(40), rng.random(40)
    assert paired_bootstrap(a, b, 500, seed=1) == paired_bootstrap(a, b, 500, seed=1)
    assert paired_bootstrap(a, b, 500, seed=1) != paired_bootstrap(a, b, 500, seed=2)


def test_interval_excludes_or_includes_zero():
    rng = np.random.default_rng(0)
    a = rng.random(200)
    better = paired_bootstrap(a, a + 0.05 + rng.normal(0, 0.01, 200), resamples=2000)
    assert better.ci_low > 0 and better.excludes_zero
    worse = paired_bootstrap(a, a - 0.05 + rng.normal(0, 0.01, 200), resamples=2000)
    assert worse.ci_high < 0 and worse.excludes_zero
    # Differences of +1 and -1 in equal numbers: mean exactly 0, interval straddles it.
    diffs = np.array([1.0, -1.0] * 50)
    tie = paired_bootstrap(np.zeros(100), diffs, resamples=2000)
    assert tie.mean_diff == 0.0
    assert tie.ci_low < 0 < tie.ci_high and not tie.excludes_zero


def test_binary_metric_interval_stays_within_bounds():
    a = np.array([1, 0, 1, 1, 0, 1, 0, 1], dtype=float)
    b = np.array([1, 1, 1, 0, 0, 1, 1, 1], dtype=float)
    r = paired_bootstrap(a, b, resamples=1000)
    assert -1.0 <= r.ci_low <= r.mean_diff <= r.ci_high <= 1.0


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "message"),
    [
        ([1.0, 2.0], [1.0], {}, "differ in length"),
        ([], [], {}, "no paired scores"),
        ([[1.0]], [[1.0]], {}, "one-dimensional"),
        ([1.0, float("nan")], [1.0, 2.0], {}, "non-finite"),
        ([1.0], [2.0], {"resamples": 0}, "resamples"),
        ([1.0], [2.0], {"confidence": 1.0}, "confidence"),
    ],
)
def test_bootstrap_rejects_bad_input(a, b, kwargs, message):
    with pytest.raises(IdeoquantError, match=message):
        paired_bootstrap(np.array(a), np.array(b), **kwargs)


# ------------------------------------------------------------------- score files


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_load_scores_keys_and_values(tmp_path):
    path = write(
        tmp_path / "s.csv",
        "prompt_id,seed,category,clip,ocr_exact\n"
        "evt-0001,7,typography,0.31,1\n"
        "evt-0002,7,poster,0.29,\n"
        "evt-0001,8,typography,0.30,0\n",
    )
    scores = load_scores(path)
    assert list(scores) == ["evt-0001#7", "evt-0002#7", "evt-0001#8"]
    assert pair_key("evt-0001", 7) == "evt-0001#7"
    assert scores["evt-0001#7"] == {"clip": 0.31, "ocr_exact": 1.0}
    assert scores["evt-0002#7"] == {"clip": 0.29}  # empty cell: not measured


def test_load_scores_id_column_without_seed(tmp_path):
    path = write(tmp_path / "s.csv", "id,pickscore\r\na,21.5\r\nb,20.25\r\n")
    assert load_scores(path) == {"a": {"pickscore": 21.5}, "b": {"pickscore": 20.25}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"empty score file"),
        ("name,clip\na,0.3\n", r"s\.csv:1: no key column, expected one of: prompt_id, id"),
        ("id,clip\na,0.3\nb,high\n", r"s\.csv:3: column 'clip' has non-numeric value 'high'"),
        ("id,clip\na,0.3\na,0.4\n", r"s\.csv:3: duplicate id 'a' \(first on line 2\)"),
        ("id,seed,clip\na,1,0.3\na,1,0.4\n", r"s\.csv:3: duplicate id 'a' with seed 1"),
        ("id,seed,clip\na,x,0.3\n", r"s\.csv:2: seed 'x' is not an integer"),
        ("id,clip\na,0.3,9\n", r"s\.csv:2: row has 3 fields, header has 2"),
        ("id,clip\n,0.3\n", r"s\.csv:2: empty id"),
        ("id,clip\na,nan\n", r"s\.csv:2: column 'clip' has non-finite value"),
        ("id,clip,clip\na,1,2\n", r"s\.csv:1: duplicate column name"),
    ],
)
def test_load_scores_rejects_bad_csv(tmp_path, text, message):
    path = write(tmp_path / "s.csv", text)
    with pytest.raises(IdeoquantError, match=message) as info:
        load_scores(path)
    assert "\n" not in str(info.value)


def test_load_scores_missing_file(tmp_path):
    with pytest.raises(IdeoquantError, match="cannot read score file"):
        load_scores(tmp_path / "absent.csv")


def test_compare_pairs_by_key_and_drops_unmatched_rows(tmp_path):
    a_csv = write(
        tmp_path / "a.csv",
        "prompt_id,seed,clip,ocr_exact,only_a\n"
        "p1,0,0.10,1,5\n"
        "p2,0,0.20,1,5\n"
        "p3,0,0.30,0,5\n"
        "p4,0,0.40,1,5\n"
        "p5,0,0.50,,5\n",
    )
    # Different row order, one key missing (p1) and one extra (p6).
    b_csv = write(
        tmp_path / "b.csv",
        "ocr_exact,clip,seed,prompt_id\n1,0.62,0,p6\n0,0.45,0,p5\n1,0.41,0,p4\n1,0.33,0,p3\n0,0.21,0,p2\n",
    )
    result = compare_score_files(a_csv, b_csv, resamples=400, seed=11)
    assert isinstance(result, ScoreComparison)
    assert [metric for metric, _ in result] == ["clip", "ocr_exact"]
    assert result.n_common == 4
    assert result.only_in_a == ["p1#0"] and result.only_in_b == ["p6#0"]

    clip = dict(result)["clip"]
    a_clip = np.array([0.20, 0.30, 0.40, 0.50])  # p2..p5, sorted key order
    b_clip = np.array([0.21, 0.33, 0.41, 0.45])
    assert clip == paired_bootstrap(a_clip, b_clip, resamples=400, seed=11)
    assert clip.mean_a == pytest.approx(0.35) and clip.mean_b == pytest.approx(0.35)

    ocr = dict(result)["ocr_exact"]
    assert ocr.n == 3  # p5 has no OCR value in A
    assert ocr.mean_a == pytest.approx(2 / 3) and ocr.mean_b == pytest.approx(2 / 3)

    table = format_comparison(result)
    assert "clip" in table and "ocr_exact" in table and "95% CI" in table
    assert "paired on 4 keys" in table and "dropped 1 keys only in A and 1 only in B" in table


def test_compare_without_common_keys_or_metrics(tmp_path):
    a_csv = write(tmp_path / "a.csv", "id,clip\na,0.1\n")
    b_csv = write(tmp_path / "b.csv", "id,clip\nb,0.1\n")
    with pytest.raises(IdeoquantError, match="share no prompt key"):
        compare_score_files(a_csv, b_csv)
    c_csv = write(tmp_path / "c.csv", "id,pickscore\na,20.0\n")
    with pytest.raises(IdeoquantError, match="share no metric column"):
        compare_score_files(a_csv, c_csv)
    # The seed column changes the key: an unseeded and a seeded file do not pair.
    d_csv = write(tmp_path / "d.csv", "id,seed,clip\na,0,0.2\n")
    with pytest.raises(IdeoquantError, match="share no prompt key"):
        compare_score_files(a_csv, d_csv)


def test_format_comparison_accepts_plain_lists():
    r = PairedResult(10, 0.3, 0.31, 0.01, 0.002, 0.018, True, 0.9)
    table = format_comparison([("clip", r)])
    assert "90% CI" in table and "+0.0100" in table and "*" in table


# ------------------------------------------------------------------------ images


def pattern_rgb() -> tuple[np.ndarray, np.ndarray]:
    i, j, c = np.meshgrid(np.arange(24), np.arange(28), np.arange(3), indexing="ij")
    a = ((i * 7 + j * 13 + c * 29) % 256).astype(np.uint8)
    b = np.clip(a.astype(np.int64) + (i * 5 + j * 3 + c * 11) % 41 - 20, 0, 255).astype(np.uint8)
    return a, b


def direct_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM from its definition: an explicit weighted window at every valid position."""
    radius, sigma = 5, 1.5
    offsets = np.arange(-radius, radius + 1)
    g1 = np.exp(-(offsets**2) / (2 * sigma**2))
    w = np.outer(g1, g1)
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    if x.ndim == 2:
        x, y = x[:, :, None], y[:, :, None]
    per_channel = []
    for ch in range(x.shape[2]):
        xs, ys = x[:, :, ch].astype(float), y[:, :, ch].astype(float)
        values = []
        for r in range(radius, xs.shape[0] - radius):
            for col in range(radius, xs.shape[1] - radius):
                px = xs[r - radius : r + radius + 1, col - radius : col + radius + 1]
                py = ys[r - radius : r + radius + 1, col - radius : col + radius + 1]
                mx, my = (w * px).sum(), (w * py).sum()
                vx = (w * (px - mx) ** 2).sum()
                vy = (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(values))
    return float(np.mean(per_channel))


def test_psnr_identical_is_inf():
    a, _ = pattern_rgb()
    assert psnr(a, a.copy()) == math.inf


def test_psnr_of_a_known_perturbation():
    a = np.full((8, 8, 3), 100, dtype=np.uint8)
    b = a.copy()
    b[:2, :5, 1] += 20  # 10 values off by 20
    mse = 10 * 20**2 / a.size
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-12)
    assert psnr(b, a) == psnr(a, b)


def test_ssim_identical_is_one():
    a, _ = pattern_rgb()
    assert ssim(a, a.copy()) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_the_definition_and_skimage():
    a, b = pattern_rgb()
    value = ssim(a, b)
    assert value == pytest.approx(direct_ssim(a, b), abs=1e-6)
    # skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=255,
    # gaussian_weights=True, sigma=1.5, use_sample_covariance=False) on these arrays
    # (scikit-image 0.26.0).
    assert value == pytest.approx(0.9303308363800644, abs=1e-9)
    assert ssim(b, a) == pytest.approx(value, abs=1e-12)


def test_ssim_greyscale_matches_skimage():
    i, j = np.meshgrid(np.arange(20), np.arange(17), indexing="ij")
    g = ((i * 9 + j * 4) % 200 + 30).astype(np.uint8)
    h = np.clip(g.astype(int) + (i * j) % 9 - 4, 0, 255).astype(np.uint8)
    assert ssim(g, h) == pytest.approx(0.9860011403689634, abs=1e-9)
    assert ssim(g, h) == pytest.approx(direct_ssim(g, h), abs=1e-6)
    assert ssim(g[:, :, None], h[:, :, None]) == pytest.approx(ssim(g, h), abs=1e-15)


def test_image_metric_input_checks():
    a, b = pattern_rgb()
    with pytest.raises(IdeoquantError, match="shapes differ"):
        psnr(a, b[:-1])
    with pytest.raises(IdeoquantError, match="uint8"):
        ssim(a.astype(np.float32), b.astype(np.float32))
    with pytest.raises(IdeoquantError, match="at least 11x11"):
        ssim(a[:10], b[:10])


def save(path, array):
    Image.fromarray(array).save(path)


def test_compare_image_dirs(tmp_path):
    a, b = pattern_rgb()
    dir_a, dir_b = tmp_path / "ref", tmp_path / "int8"
    dir_a.mkdir()
    dir_b.mkdir()
    save(dir_a / "evq-0002.png", a)
    save(dir_b / "evq-0002.png", b)
    save(dir_a / "evq-0001.png", a)
    save(dir_b / "evq-0001.png", a)
    save(dir_a / "only-a.png", a)
    save(dir_b / "only-b.jpg", b)
    (dir_b / "notes.txt").write_text("ignored")

    result = compare_image_dirs(dir_a, dir_b)
    assert isinstance(result, ImageComparison)
    assert [name for name, _, _ in result] == ["evq-0001.png", "evq-0002.png"]
    assert result[0][1] == math.inf and result[0][2] == pytest.approx(1.0)
    assert result[1][1] == pytest.approx(psnr(a, b)) and result[1][2] == pytest.approx(ssim(a, b))
    assert result.only_in_a == ["only-a.png"] and result.only_in_b == ["only-b.jpg"]

    table = format_comparison(result)
    assert "evq-0002.png" in table and "inf" in table and "1 identical" in table
    assert "skipped 1 files only in A and 1 only in B" in table
    assert "evq-0001.png" in format_comparison(list(result))


def test_compare_image_dirs_errors(tmp_path):
    a, _ = pattern_rgb()
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    dir_a.mkdir()
    dir_b.mkdir()
    with pytest.raises(IdeoquantError, match="not a directory"):
        compare_image_dirs(dir_a, tmp_path / "missing")
    save(dir_a / "x.png", a)
    save(dir_b / "y.png", a)
    with pytest.raises(IdeoquantError, match="share no image file name"):
        compare_image_dirs(dir_a, dir_b)
    save(dir_b / "x.png", a[:20])
    with pytest.raises(IdeoquantError, match=r"x\.png: image sizes differ"):
        compare_image_dirs(dir_a, dir_b)
