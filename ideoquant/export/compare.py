"""Paired comparison of two quantized variants.

Two kinds of comparison are offered:

* Per-prompt scores. Each variant is scored on the same prompts with the same
  seeds and the scores are written to a CSV file (one row per prompt, or per
  prompt and seed). :func:`compare_score_files` pairs the rows of two such files
  by key and, for every metric column present in both, reports the mean of each
  variant and a paired bootstrap confidence interval for the mean difference
  ``B - A`` (:func:`paired_bootstrap`).

* Images. :func:`compare_image_dirs` pairs same-named images from two folders
  (for example the same prompt and seed rendered by the reference and by a
  quantized checkpoint) and reports PSNR and SSIM for each pair.

Score CSV format
----------------
* A key column, ``prompt_id`` or ``id`` (``prompt_id`` wins when both exist).
* Optionally a ``seed`` column holding integers. When it exists, rows are
  paired by ``(id, seed)``; otherwise by id alone.
* Metric columns: every other column, except the descriptive columns listed in
  :data:`DESCRIPTIVE_COLUMNS` (``category``, ``prompt``, ``image``, ...), which
  are ignored. Every non-empty metric cell must be a finite number; an empty
  cell means the metric was not measured for that row (for example OCR exact
  match on a prompt without text) and the row is left out for that metric only.
  Binary metrics such as OCR exact match are written as 0/1.

Image metrics
-------------
* PSNR over all pixels and channels with a data range of 255; identical images
  give ``inf``.
* SSIM as defined by Wang et al. (2004): an 11x11 Gaussian window with sigma
  1.5, K1 = 0.01, K2 = 0.03, data range 255, population (not sample) variances,
  evaluated at every position where the window fits entirely inside the image
  (no padding) and averaged. Colour images are handled per channel and the
  per-channel SSIM values are averaged (RGB, not luminance). This matches
  ``skimage.metrics.structural_similarity(a, b, channel_axis=-1,
  data_range=255, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)``.

Nothing here depends on the CLI; errors meant for the user are raised as
:class:`~ideoquant.errors.IdeoquantError` with a one-line message.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ideoquant.errors import IdeoquantError, printable
from ideoquant.io.input_files import open_regular

__all__ = [
    "DESCRIPTIVE_COLUMNS",
    "IMAGE_SUFFIXES",
    "ImageComparison",
    "PairedResult",
    "ScoreComparison",
    "compare_image_dirs",
    "compare_score_files",
    "format_comparison",
    "load_scores",
    "pair_key",
    "paired_bootstrap",
    "psnr",
    "ssim",
]

KEY_COLUMNS = ("prompt_id", "id")
SEED_COLUMN = "seed"

#: Columns that describe a row rather than score it; never treated as metrics.
DESCRIPTIVE_COLUMNS = frozenset(
    {
        "category",
        "prompt",
        "target_text",
        "ocr_text",
        "text",
        "image",
        "image_path",
        "path",
        "file",
        "filename",
        "model",
        "variant",
        "width",
        "height",
        "steps",
        "notes",
    }
)

#: Image file suffixes that :func:`compare_image_dirs` reads (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Bootstrap index matrices are drawn in chunks of at most this many entries.
_CHUNK_ELEMENTS = 1 << 21

# SSIM constants (Wang et al. 2004).
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_DATA_RANGE = 255.0
# Pixels per band of rows in PSNR and SSIM: about 100 MB of float64 working arrays.
_BAND_PIXELS = 1 << 20

#: Largest image (width x height) that `compare --images` reads: 8192 x 8192. Larger images,
#: and files whose header claims more (decompression bombs), are refused before decoding.
MAX_IMAGE_PIXELS = 1 << 26


# --------------------------------------------------------------------------- scores


def pair_key(prompt_id: str, seed: int | None = None) -> str:
    """The pairing key used by :func:`load_scores`: the id, or ``id#seed``."""
    return prompt_id if seed is None else f"{prompt_id}#{seed}"


def load_scores(csv_path: str | Path) -> dict[str, dict[str, float]]:
    """Read a per-prompt score CSV into ``{key: {metric: value}}``.

    The key is the prompt id, or ``id#seed`` when the file has a ``seed``
    column (see :func:`pair_key`). Empty metric cells are left out of the
    inner dict. Dict order follows the file (rows) and the header (metrics).

    Raises IdeoquantError for a missing file, a missing key column, an empty
    key, a non-integer seed, a non-numeric or non-finite metric value, a row
    with the wrong number of fields, or a duplicate key.
    """
    path = Path(csv_path)
    # A regular file only: a FIFO given as A or B would block the comparison forever.
    handle = io.TextIOWrapper(open_regular(path, "score file"), newline="", encoding="utf-8-sig")
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise IdeoquantError(f"{path}: empty score file, expected a header row")
            header = [name.strip() for name in header]
            if len(set(header)) != len(header):
                dupes = sorted({name for name in header if header.count(name) > 1})
                raise IdeoquantError(f"{path}:1: duplicate column name(s): {', '.join(dupes)}")
            key_column = next((name for name in KEY_COLUMNS if name in header), None)
            if key_column is None:
                raise IdeoquantError(f"{path}:1: no key column, expected one of: {', '.join(KEY_COLUMNS)}")
            key_index = header.index(key_column)
            seed_index = header.index(SEED_COLUMN) if SEED_COLUMN in header else None
            metric_columns = [
                (i, name)
                for i, name in enumerate(header)
                if name not in KEY_COLUMNS
                and name != SEED_COLUMN
                and name.lower() not in DESCRIPTIVE_COLUMNS
                and name != ""
            ]

            scores: dict[str, dict[str, float]] = {}
            first_line: dict[str, int] = {}
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise IdeoquantError(f"{path}:{line}: row has {len(row)} fields, header has {len(header)}")
                prompt_id = row[key_index].strip()
                if not prompt_id:
                    raise IdeoquantError(f"{path}:{line}: empty {key_column}")
                seed = None
                if seed_index is not None:
                    seed = _parse_seed(row[seed_index], path, line)
                key = pair_key(prompt_id, seed)
                if key in scores:
                    what = f"{key_column} {prompt_id!r}" + ("" if seed is None else f" with seed {seed}")
                    raise IdeoquantError(f"{path}:{line}: duplicate {what} (first on line {first_line[key]})")
                values: dict[str, float] = {}
                for index, name in metric_columns:
                    cell = row[index].strip()
                    if not cell:
                        continue
                    values[name] = _parse_metric(cell, name, path, line)
                scores[key] = values
                first_line[key] = line
        except csv.Error as exc:
            raise IdeoquantError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
        except UnicodeDecodeError:
            raise IdeoquantError(f"{path}: not a UTF-8 text file") from None
    return scores


def _parse_seed(cell: str, path: Path, line: int) -> int:
    text = cell.strip()
    try:
        return int(text)
    except ValueError:
        raise IdeoquantError(f"{path}:{line}: seed {text!r} is not an integer") from None


def _parse_metric(cell: str, name: str, path: Path, line: int) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise IdeoquantError(f"{path}:{line}: column {name!r} has non-numeric value {cell!r}") from None
    if not math.isfinite(value):
        raise IdeoquantError(
            f"{path}:{line}: column {name!r} has non-finite value {cell!r} (leave the cell empty instead)"
        )
    return value


# ------------------------------------------------------------------------ bootstrap


@dataclass(frozen=True)
class PairedResult:
    """Paired comparison of one metric between variant A and variant B.

    ``mean_diff`` is ``mean(b - a)``; ``[ci_low, ci_high]`` is its percentile
    bootstrap interval at ``confidence``; ``excludes_zero`` is true when the
    whole interval lies strictly above or strictly below zero.
    """

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_low: float
    ci_high: float
    excludes_zero: bool
    confidence: float = 0.95


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedResult:
    """Percentile bootstrap interval for the mean paired difference ``b - a``.

    ``a[i]`` and ``b[i]`` must be the scores of the same prompt and seed. Each
    resample draws ``n`` pair indices with replacement from
    ``numpy.random.default_rng(seed)`` (one row of ``n`` draws per resample,
    in order, so the result does not depend on the chunking) and takes the
    mean difference; the interval is given by the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles (linear interpolation) of those means,
    clipped to the range of the observed differences.
    """
    a_arr = np.asarray(a, dtype=np.float64)
    b_arr = np.asarray(b, dtype=np.float64)
    if a_arr.ndim != 1 or b_arr.ndim != 1:
        raise IdeoquantError("paired scores must be one-dimensional arrays")
    if a_arr.shape != b_arr.shape:
        raise IdeoquantError(f"paired scores differ in length: {a_arr.size} vs {b_arr.size}")
    n = int(a_arr.size)
    if n == 0:
        raise IdeoquantError("no paired scores to compare")
    if not (np.all(np.isfinite(a_arr)) and np.all(np.isfinite(b_arr))):
        raise IdeoquantError("paired scores contain non-finite values")
    if isinstance(resamples, bool) or int(resamples) != resamples or resamples < 1:
        raise IdeoquantError(f"resamples must be a positive integer, got {resamples!r}")
    resamples = int(resamples)
    if not 0.0 < confidence < 1.0:
        raise IdeoquantError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")

    diff = b_arr - a_arr
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    chunk = max(1, min(resamples, _CHUNK_ELEMENTS // n))
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        indices = rng.integers(0, n, size=(rows, n))
        means[start : start + rows] = diff[indices].mean(axis=1)

    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    # A mean of resampled differences cannot leave [min, max]; clipping only
    # removes summation rounding (constant differences give an exact point).
    d_min, d_max = float(diff.min()), float(diff.max())
    low = min(max(float(low), d_min), d_max)
    high = min(max(float(high), d_min), d_max)
    return PairedResult(
        n=n,
        mean_a=float(a_arr.mean()),
        mean_b=float(b_arr.mean()),
        mean_diff=float(diff.mean()),
        ci_low=low,
        ci_high=high,
        excludes_zero=bool(low > 0.0 or high < 0.0),
        confidence=float(confidence),
    )


class ScoreComparison(list):
    """``[(metric, PairedResult), ...]`` plus how the two files were paired.

    Attributes: ``n_common`` (keys present in both files), ``only_in_a`` and
    ``only_in_b`` (sorted keys present in one file only, dropped),
    ``skipped_metrics`` (metrics in both files without a single key that has
    a value in both), ``resamples``, ``seed`` and ``confidence``.
    """

    def __init__(
        self,
        results: Iterable[tuple[str, PairedResult]] = (),
        *,
        n_common: int = 0,
        only_in_a: Sequence[str] = (),
        only_in_b: Sequence[str] = (),
        skipped_metrics: Sequence[str] = (),
        resamples: int = 0,
        seed: int = 0,
        confidence: float = 0.95,
    ):
        super().__init__(results)
        self.n_common = n_common
        self.only_in_a = list(only_in_a)
        self.only_in_b = list(only_in_b)
        self.skipped_metrics = list(skipped_metrics)
        self.resamples = resamples
        self.seed = seed
        self.confidence = confidence


def compare_score_files(
    a_csv: str | Path,
    b_csv: str | Path,
    resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> ScoreComparison:
    """Pair two score CSVs by key and bootstrap every metric present in both.

    Keys found in one file only are dropped and listed on the result
    (``only_in_a`` / ``only_in_b``). Pairs are taken in sorted key order, so
    the intervals do not depend on row order. Metrics are reported in the
    column order of ``a_csv``.

    Raises IdeoquantError when the files share no key or no metric.
    """
    scores_a = load_scores(a_csv)
    scores_b = load_scores(b_csv)
    common = sorted(set(scores_a) & set(scores_b))
    only_a = sorted(set(scores_a) - set(scores_b))
    only_b = sorted(set(scores_b) - set(scores_a))
    if not common:
        raise IdeoquantError(
            f"{a_csv} and {b_csv} share no prompt key "
            f"({len(scores_a)} and {len(scores_b)} rows); were they scored on the same prompts and seeds?"
        )

    metrics_b = {metric for values in scores_b.values() for metric in values}
    metrics: list[str] = []
    for values in scores_a.values():
        for metric in values:
            if metric in metrics_b and metric not in metrics:
                metrics.append(metric)
    if not metrics:
        raise IdeoquantError(f"{a_csv} and {b_csv} share no metric column")

    results: list[tuple[str, PairedResult]] = []
    skipped: list[str] = []
    for metric in metrics:
        keys = [k for k in common if metric in scores_a[k] and metric in scores_b[k]]
        if not keys:
            skipped.append(metric)
            continue
        a = np.array([scores_a[k][metric] for k in keys], dtype=np.float64)
        b = np.array([scores_b[k][metric] for k in keys], dtype=np.float64)
        results.append((metric, paired_bootstrap(a, b, resamples=resamples, seed=seed, confidence=confidence)))
    if not results:
        raise IdeoquantError(f"{a_csv} and {b_csv} have no metric value on a common key")
    return ScoreComparison(
        results,
        n_common=len(common),
        only_in_a=only_a,
        only_in_b=only_b,
        skipped_metrics=skipped,
        resamples=resamples,
        seed=seed,
        confidence=confidence,
    )


# --------------------------------------------------------------------------- images


def _check_pair(img_a: np.ndarray, img_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(img_a)
    b = np.asarray(img_b)
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise IdeoquantError(f"images must be uint8 arrays, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise IdeoquantError(f"image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim not in (2, 3) or a.size == 0:
        raise IdeoquantError(f"expected an HxW or HxWxC image, got shape {a.shape}")
    return a, b


def psnr(img_a: np.ndarray, img_b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels (data range 255).

    ``10 * log10(255**2 / MSE)``; identical images give ``inf``. The squared differences
    are summed exactly as integers, a band of rows at a time (bounded memory).
    """
    a, b = _check_pair(img_a, img_b)
    step = _band_rows(a)
    total = 0
    for r in range(0, a.shape[0], step):
        d = a[r : r + step].astype(np.int32) - b[r : r + step]
        total += int(np.sum(d * d, dtype=np.int64))
    if total == 0:
        return math.inf
    return 10.0 * math.log10(_DATA_RANGE**2 / (total / a.size))


def _band_rows(img: np.ndarray) -> int:
    """Rows per band so that one band's float64 working arrays stay near _BAND_PIXELS pixels."""
    per_row = max(1, int(np.prod(img.shape[1:])))
    return max(1, _BAND_PIXELS // per_row)


def _gaussian_window() -> np.ndarray:
    radius = _SSIM_WINDOW // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(x**2) / (2.0 * _SSIM_SIGMA**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation with ``g`` over the 'valid' region only."""
    k = g.size
    h, w = img.shape
    rows = np.zeros((h - k + 1, w), dtype=np.float64)
    for i in range(k):
        rows += g[i] * img[i : i + h - k + 1, :]
    out = np.zeros((h - k + 1, w - k + 1), dtype=np.float64)
    for j in range(k):
        out += g[j] * rows[:, j : j + w - k + 1]
    return out


def _ssim_sum(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    """Sum of the SSIM map over the valid window positions of one channel (float64)."""
    c1 = (_SSIM_K1 * _DATA_RANGE) ** 2
    c2 = (_SSIM_K2 * _DATA_RANGE) ** 2
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    mu_x = _filter_valid(x, g)
    mu_y = _filter_valid(y, g)
    var_x = _filter_valid(x * x, g) - mu_x * mu_x
    var_y = _filter_valid(y * y, g) - mu_y * mu_y
    cov = _filter_valid(x * y, g) - mu_x * mu_y
    numerator = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return float(np.sum(numerator / denominator))


def _ssim_channel(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    """Mean SSIM of one channel, computed over bands of output rows (each band reads its
    rows plus the window's overlap), so memory stays bounded whatever the image size."""
    k = g.size
    out_rows, out_cols = x.shape[0] - k + 1, x.shape[1] - k + 1
    step = _band_rows(x)
    total = 0.0
    for r in range(0, out_rows, step):
        rows = slice(r, min(r + step, out_rows) + k - 1)
        total += _ssim_sum(x[rows], y[rows], g)
    return total / (out_rows * out_cols)


def ssim(img_a: np.ndarray, img_b: np.ndarray) -> float:
    """Mean structural similarity (Wang et al. 2004), averaged over channels.

    11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 255,
    valid window positions only. An HxWxC image is scored per channel and the
    C values are averaged (for RGB this is the mean of R, G and B SSIM, not a
    luminance SSIM). Both sides must be at least 11 pixels high and wide.
    """
    a, b = _check_pair(img_a, img_b)
    if a.shape[0] < _SSIM_WINDOW or a.shape[1] < _SSIM_WINDOW:
        raise IdeoquantError(
            f"SSIM needs images of at least {_SSIM_WINDOW}x{_SSIM_WINDOW} pixels, got {a.shape[1]}x{a.shape[0]}"
        )
    if a.ndim == 2:
        a = a[:, :, None]
        b = b[:, :, None]
    g = _gaussian_window()
    values = [_ssim_channel(a[:, :, c], b[:, :, c], g) for c in range(a.shape[2])]
    return float(np.mean(values))


class ImageComparison(list):
    """``[(name, psnr, ssim), ...]`` sorted by file name, plus the unmatched names.

    Attributes: ``only_in_a`` and ``only_in_b`` (sorted file names found in one
    folder only, skipped).
    """

    def __init__(
        self,
        results: Iterable[tuple[str, float, float]] = (),
        *,
        only_in_a: Sequence[str] = (),
        only_in_b: Sequence[str] = (),
    ):
        super().__init__(results)
        self.only_in_a = list(only_in_a)
        self.only_in_b = list(only_in_b)


def _list_images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise IdeoquantError(f"{folder}: not a directory")
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _read_rgb(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8; its size is checked from the header before decoding."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    where = printable(str(path))
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns (and, past twice its limit, raises) on open; both
            # mean the header claims more pixels than this tool reads.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise IdeoquantError(
                        f"{where}: {width}x{height} pixels is more than the {MAX_IMAGE_PIXELS:,} this comparison reads"
                    )
                # An RGB file is used as decoded (no converted copy): one image's worth of memory less.
                rgb = image if image.mode == "RGB" else image.convert("RGB")
                return np.asarray(rgb, dtype=np.uint8)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise IdeoquantError(f"{where}: image header claims more pixels than this comparison reads "
                             f"({MAX_IMAGE_PIXELS:,}); not decoded") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise IdeoquantError(f"{where}: cannot read image ({printable(str(exc))})") from None


def compare_image_dirs(dir_a: str | Path, dir_b: str | Path) -> ImageComparison:
    """PSNR and SSIM for every pair of same-named PNG/JPEG files in two folders.

    Files are matched by exact file name (non-recursive) and read as 8-bit RGB
    (alpha dropped, greyscale expanded). Names present in one folder only are
    listed on the result and skipped. Raises IdeoquantError when no name is
    shared or when a pair differs in size.
    """
    folder_a, folder_b = Path(dir_a), Path(dir_b)
    images_a = _list_images(folder_a)
    images_b = _list_images(folder_b)
    common = sorted(set(images_a) & set(images_b))
    if not common:
        raise IdeoquantError(
            f"{folder_a} and {folder_b} share no image file name ({len(images_a)} and {len(images_b)} PNG/JPEG files)"
        )
    results = []
    for name in common:
        a = _read_rgb(images_a[name])
        b = _read_rgb(images_b[name])
        if a.shape != b.shape:
            raise IdeoquantError(
                f"{name}: image sizes differ ({a.shape[1]}x{a.shape[0]} in {folder_a}, "
                f"{b.shape[1]}x{b.shape[0]} in {folder_b})"
            )
        results.append((name, psnr(a, b), ssim(a, b)))
    return ImageComparison(
        results,
        only_in_a=sorted(set(images_a) - set(images_b)),
        only_in_b=sorted(set(images_b) - set(images_a)),
    )


# ------------------------------------------------------------------------- formatting


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Columns padded to width; the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [str(cell).ljust(widths[i]) if i < left else str(cell).rjust(widths[i]) for i, cell in enumerate(row)]
        return "  ".join(cells).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def _format_scores(results: Sequence[tuple[str, PairedResult]]) -> str:
    confidence = results[0][1].confidence if results else getattr(results, "confidence", 0.95)
    percent = f"{confidence * 100:g}%"
    header = ["metric", "n", "mean A", "mean B", "B - A", f"{percent} CI", "sig"]
    rows = []
    for metric, r in results:
        rows.append(
            [
                metric,
                str(r.n),
                f"{r.mean_a:.4f}",
                f"{r.mean_b:.4f}",
                f"{r.mean_diff:+.4f}",
                f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]",
                "*" if r.excludes_zero else "",
            ]
        )
    lines = _table(header, rows)
    lines.append(f"* = the {percent} paired bootstrap interval of B - A excludes zero")
    if isinstance(results, ScoreComparison):
        note = f"paired on {results.n_common} keys ({results.resamples} resamples, seed {results.seed})"
        if results.only_in_a or results.only_in_b:
            note += f"; dropped {len(results.only_in_a)} keys only in A and {len(results.only_in_b)} only in B"
        lines.append(note)
        if results.skipped_metrics:
            lines.append("no common values for: " + ", ".join(results.skipped_metrics))
    return "\n".join(lines)


def _format_images(results: Sequence[tuple[str, float, float]]) -> str:
    rows = [[name, "inf" if math.isinf(p) else f"{p:.2f}", f"{s:.4f}"] for name, p, s in results]
    lines = _table(["image", "PSNR dB", "SSIM"], rows)
    finite = [p for _, p, _ in results if not math.isinf(p)]
    identical = len(results) - len(finite)
    mean_ssim = float(np.mean([s for _, _, s in results])) if results else float("nan")
    summary = f"{len(results)} image pairs; mean SSIM {mean_ssim:.4f}"
    if finite:
        summary += f"; mean PSNR {float(np.mean(finite)):.2f} dB over {len(finite)} differing pairs"
    if identical:
        summary += f"; {identical} identical"
    lines.append(summary)
    if isinstance(results, ImageComparison) and (results.only_in_a or results.only_in_b):
        lines.append(f"skipped {len(results.only_in_a)} files only in A and {len(results.only_in_b)} only in B")
    return "\n".join(lines)


def format_comparison(
    results: Sequence[tuple[str, PairedResult]] | Sequence[tuple[str, float, float]],
) -> str:
    """Plain-text table for the result of :func:`compare_score_files` or :func:`compare_image_dirs`.

    Plain lists of ``(metric, PairedResult)`` or ``(name, psnr, ssim)`` tuples
    are accepted too; the pairing notes are printed only for the result types.
    """
    if isinstance(results, ImageComparison):
        return _format_images(results)
    if isinstance(results, ScoreComparison):
        return _format_scores(results)
    items = list(results)
    if items and len(items[0]) == 3 and not isinstance(items[0][1], PairedResult):
        return _format_images(items)
    return _format_scores(items)
