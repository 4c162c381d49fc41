"""Statistics the project's studies and benchmarks share: AUC and bootstrap intervals."""
from __future__ import annotations

import numpy as np


def auc(scores, labels) -> float:
    """Mann-Whitney AUC: P(score of a random positive > that of a random negative), ties 1/2; NaN without both
    classes."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    d = pos[:, None] - neg[None, :]
    return float((d > 0).mean() + 0.5 * (d == 0).mean())


def bootstrap_interval(stat, *arrays, level: float = 0.95, resamples: int = 1000, seed: int = 0) -> tuple:
    """Percentile bootstrap interval of ``stat(*arrays)`` resampling the arrays' rows together (seeded); resamples
    where ``stat`` is NaN (e.g. AUC without a positive) are skipped."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        v = stat(*(a[idx] for a in arrays))
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_mean_interval(x, level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``x`` over its entries (e.g. seeds), all resamples drawn at
    once (seeded)."""
    x = np.asarray(x, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))
    lo, hi = np.quantile(x[idx].mean(1), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
