"""The statistics of the evaluation reports: bootstrap intervals, the sign test, distinct-n."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def mean(xs: Sequence[float]) -> Optional[float]:
    return math.fsum(xs) / len(xs) if len(xs) else None


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> Optional[list[float]]:
    """Percentile bootstrap interval of the mean: ``resamples`` resamples of the values with
    replacement (numpy, seeded), the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of their
    means. None for no values; a single value gives ``[v, v]``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)  # (resamples,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def sign_test_p_value(wins: int, losses: int) -> Optional[float]:
    """Exact two-sided binomial test of ``wins`` among ``wins + losses`` decisive comparisons
    against p = 0.5 (ties excluded by the caller): ``scipy.stats.binomtest``. None when there is no
    decisive comparison."""
    n = wins + losses
    if n == 0:
        return None
    from scipy.stats import binomtest

    return float(binomtest(wins, n, 0.5, alternative="two-sided").pvalue)


def distinct_n(texts: Sequence[str], n: int) -> Optional[float]:
    """Distinct-n over a corpus: distinct word n-grams / all word n-grams of ``texts`` (lower-cased,
    split on whitespace). None when the texts have no n-gram."""
    total, seen = 0, set()
    for t in texts:
        words = (t or "").lower().split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None
