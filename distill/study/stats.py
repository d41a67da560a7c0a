"""The statistics of a study: mean and spread over seeds, and intervals for paired differences
that account for both the seed-to-seed spread and the finite validation set.

Two runs of a study that share a seed are paired; so are all runs, over one validation set. The
mean difference over seeds then varies for two reasons (Bouthillier et al., "Accounting for
variance in machine learning benchmarks", MLSys 2021): the seeds (initialisation, data order),
which averaging over seeds shrinks, and the validation images, which every seed shares, so that
no number of seeds shrinks it. An interval over seeds alone misses the second and over-claims.

With per-image results of both runs on every seed (predictions.npz) the variance of the mean
difference is estimated exactly, from the two-way table seeds x images (a crossed random-effects
ANOVA); without them it is bounded from the accuracies and the validation size alone. The seeds'
t half-width and the images' normal half-width are added in quadrature (``_widen``).
docs/studies-statistics.md gives the formulas and what they assume.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95

# What an interval accounts for, as the report says it.
METHODS = {
    "seeds": "seed-to-seed spread only",
    "images": "seed-to-seed spread and the validation set's sampling noise, exact from per-image results",
    "bound": "seed-to-seed spread and the validation set's sampling noise, bounded from the accuracies and the "
    "validation size (no per-image results)",
}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    clean = [v for v in values if v is not None and math.isfinite(v)]
    if not clean:
        return math.nan, math.nan
    return statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else 0.0


@dataclass(frozen=True)
class Paired:
    """A paired difference a - b over seeds and its 95% confidence interval."""

    mean: float  # mean of a - b over seeds
    sd: float  # sample standard deviation of the per-seed differences (nan with one seed)
    lo: float  # the interval; nan where there is none (one seed, or see ``note``)
    hi: float
    n: int  # seeds
    method: str = "seeds"  # a key of METHODS
    note: str = ""  # why there is no interval, where n > 1 and there is none

    @property
    def has_interval(self) -> bool:
        return self.n > 1 and math.isfinite(self.lo) and math.isfinite(self.hi)

    @property
    def beyond_noise(self) -> bool:
        """The interval excludes zero: the only case a verdict says 'beats'."""
        return self.has_interval and (self.lo > 0 or self.hi < 0)


def _t(df: Any) -> Any:
    from scipy.stats import t

    return t.ppf(0.5 + CONFIDENCE / 2, df)


def _no_interval(diffs: list[float], method: str, note: str = "") -> Paired:
    sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    return Paired(statistics.fmean(diffs), sd, math.nan, math.nan, len(diffs), method, note=note)


def paired_difference(a: list[float], b: list[float]) -> Paired:
    """Mean difference a - b over paired seeds, with the two-sided 95% t-interval of the per-seed
    differences (n - 1 degrees of freedom): the seed spread alone. Seeds that all show the same
    difference give an interval of zero width."""
    if len(a) != len(b) or not a:
        raise ValueError("paired samples need equal, non-zero lengths")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n < 2:
        return _no_interval(diffs, "seeds")
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(_t(n - 1)) * sd / math.sqrt(n)
    return Paired(mean, sd, mean - half, mean + half, n, "seeds")


def seed_half_width(diffs: np.ndarray) -> np.ndarray:
    """The 95% t half-width of the mean of per-seed differences (..., seeds): t(S-1) * sd / sqrt(S)."""
    s = diffs.shape[-1]
    return _t(s - 1) * diffs.std(-1, ddof=1) / math.sqrt(s)


def images_interval(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, half-width) of the mean paired difference from per-image results: arrays (..., seeds,
    images) of 0/1 (right or wrong), one validation set shared by the seeds; leading axes are
    independent studies. With D = a - b over seeds s and images i, the variance of its mean is
    sigma_seed^2/S + sigma_image^2/N + sigma_rest^2/(S N); the spread of the per-seed means holds
    all but the image term, which the two-way ANOVA mean squares give without bias:
    sigma_image^2/N = (MS_image - MS_rest) / (S N)."""
    d = np.asarray(correct_a, dtype=np.float64) - np.asarray(correct_b, dtype=np.float64)
    s, n = d.shape[-2:]
    grand = d.mean(axis=(-2, -1))
    per_seed, per_image = d.mean(axis=-1), d.mean(axis=-2)
    ms_image = s * ((per_image - grand[..., None]) ** 2).sum(-1) / (n - 1)
    rest = d - per_seed[..., :, None] - per_image[..., None, :] + grand[..., None, None]
    ms_rest = (rest**2).sum(axis=(-2, -1)) / ((s - 1) * (n - 1))
    image_var = np.maximum(ms_image - ms_rest, 0.0) / (s * n)  # a negative estimate of a variance is 0
    return grand, _widen(seed_half_width(per_seed), image_var, n)


def bound_interval(a: np.ndarray, b: np.ndarray, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, half-width) of the mean paired difference from accuracies alone: arrays (..., seeds)
    of fractions over one validation set of ``val_size`` images. The validation set's share,
    sigma_image^2/N, is bounded by the largest variance a per-image difference can have given the
    accuracies: the runs disagree on as many images as they can, q = min(a + b, 2 - a - b), and
    the variance is at most mean(q) - mean(a - b)^2 (McNemar's worst case)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a - b
    mean = d.mean(-1)
    discordant = np.minimum(a + b, 2.0 - a - b).mean(-1)
    image_var = np.maximum(discordant - mean**2, 0.0) / val_size
    return mean, _widen(seed_half_width(d), image_var, val_size)


def _widen(seed_half: np.ndarray, image_var: np.ndarray, val_size: int) -> np.ndarray:
    """The seeds' t half-width and the validation set's normal half-width, added in quadrature:
    sqrt((t(S-1) SE_seed)^2 + (z SE_image)^2), each part right where it dominates. In simulated
    studies of 2-5 seeds it covered the true difference in 95-99% of them where Welch-Satterthwaite's
    pooled t covered 88-93% with 2-3 seeds (docs/studies-statistics.md; tests/test_report.py checks
    one setting). The image variance is never below one image's worth, (1/N)^2, so a non-zero
    difference never gets an interval of zero width."""
    z = _t(math.inf)
    image_var = np.maximum(image_var, 1.0 / float(val_size) ** 2)
    return np.sqrt(seed_half**2 + z**2 * image_var)


def paired_interval(
    a: list[float], b: list[float], val_size: int | None, images: tuple[np.ndarray, np.ndarray] | None = None
) -> Paired:
    """Paired difference of accuracies ``a`` - ``b`` (fractions, one per shared seed) in points,
    with a 95% interval over seeds and validation images: exact from ``images`` (per-image 0/1
    arrays (seeds, images) of a and b) where given, else bounded from the accuracies and
    ``val_size``. One seed, or no known validation size, gives no interval, and says why."""
    diffs = [100 * (x - y) for x, y in zip(a, b, strict=True)]
    if len(diffs) < 2:
        return _no_interval(diffs, "seeds")
    if images is not None:
        mean, half = images_interval(*images)
        method = "images"
        diffs = list(100 * (images[0].mean(-1) - images[1].mean(-1)))
    elif val_size:
        mean, half = bound_interval(np.array(a), np.array(b), val_size)
        method = "bound"
    else:
        return _no_interval(diffs, "seeds", "the runs do not record their validation set's size (summary.json)")
    m, h = 100 * float(mean), 100 * float(half)
    return Paired(m, statistics.stdev(diffs), m - h, m + h, len(diffs), method)


def seeds_text(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def verdict(a: str, b: str, p: Paired, unit: str = "points") -> str:
    """A plain sentence: who wins by how much (only where the interval excludes zero), that the
    difference is within noise, or why there is no verdict."""
    seeds = seeds_text(p.n)
    if p.n < 2:
        return f"{a} - {b}: {p.mean:+.2f} {unit} from {seeds}; too few seeds for a confidence interval (at least 2)"
    if not p.has_interval:
        return f"{a} - {b}: {p.mean:+.2f} {unit} ({seeds}); no interval: {p.note}"
    if p.beyond_noise:
        win, lose, sign = (a, b, 1) if p.mean > 0 else (b, a, -1)
        lo, hi = sorted((sign * p.lo, sign * p.hi))
        return f"{win} beats {lose} by {abs(p.mean):.2f} {unit} (95% CI {lo:.2f} to {hi:.2f}, {seeds})"
    return f"{a} vs {b}: no difference beyond noise ({p.mean:+.2f} {unit}, 95% CI {p.lo:.2f} to {p.hi:.2f}, {seeds})"
