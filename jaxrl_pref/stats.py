"""Statistics the project's studies, reports, benchmarks and tests share: a run's final score, windowed and best-window
means, Student-t and bootstrap intervals, AUC. Host-side numpy."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np

# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_quantile(n: int, level: float = 0.95) -> float:
    """Two-sided Student-t quantile for ``n`` samples (n-1 degrees of freedom). Without scipy: for 95%, a table to
    10 degrees of freedom, then the Cornish-Fisher expansion around the normal's 1.96 (within 0.002); other levels
    fall back to the normal quantile."""
    if n < 2:
        return math.nan
    try:
        from scipy.stats import t
        return float(t.ppf(0.5 + level / 2, n - 1))
    except ImportError:
        pass
    z = 1.959963984540054
    if level != 0.95:
        return z
    df = n - 1
    if df <= len(_T975):
        return _T975[df - 1]
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the ``level`` Student-t confidence interval, n) over the finite values; half-width NaN
    for n < 2."""
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    if v.size == 1:
        return float(v[0]), math.nan, 1
    return float(v.mean()), float(t_quantile(v.size, level) * v.std(ddof=1) / math.sqrt(v.size)), int(v.size)


# -- a run's final score ----------------------------------------------------------------------------------------------

_ROUNDING = {"floor": math.floor, "ceil": math.ceil, "round": round}


def tail_length(n: int, *, last: Optional[int] = None, frac: Optional[float] = None, rounding: str = "floor") -> int:
    """How many of ``n`` updates a final score covers: ``last``, or the last ``frac`` of them rounded down
    (``"floor"``), up (``"ceil"``) or to the nearest (``"round"``, halves to even); at least one."""
    if (last is None) == (frac is None):
        raise ValueError("tail_length: give one of last and frac")
    if last is not None:
        return max(1, int(last))
    if rounding not in _ROUNDING:
        raise ValueError(f"tail_length: rounding must be one of {sorted(_ROUNDING)}, got {rounding!r}")
    return max(1, int(_ROUNDING[rounding](n * frac)))


def windowed_mean(x, episodes=None, window: int = 5) -> np.ndarray:
    """Per update (of a 1-d curve): the mean of ``x`` over the episodes that ended in the last ``window`` updates
    (each update's value weighted by its number of finished episodes; NaN until one ended). ``episodes`` None: 1
    where ``x`` is set."""
    e = (~np.isnan(x)).astype(np.float64) if episodes is None else np.nan_to_num(episodes)
    num = np.convolve(np.nan_to_num(x) * e, np.ones(window))[:len(x)]
    den = np.convolve(e, np.ones(window))[:len(x)]
    with np.errstate(all="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def forward_fill(x) -> np.ndarray:
    """NaN (no episode ended in that update) replaced by the last value seen (0 before any)."""
    out, last = np.empty_like(x), 0.0
    for i, v in enumerate(x):
        last = last if np.isnan(v) else v
        out[i] = last
    return out


def final_score(values, *, last: Optional[int] = None, frac: Optional[float] = None, rounding: str = "floor",
                episodes=None, carry: bool = False, pooled: bool = False, finite: bool = False):
    """A run's final score: the mean of a per-update metric ``values`` (``[..., updates]``, NaN where no episode
    ended, e.g. ``episode_return``) over the last updates (:func:`tail_length` of ``last``/``frac``/``rounding``),
    per row (seed); a 1-d curve gives a 0-d array. What is averaged:

    * by default, the updates' values, NaN skipped (NaN for a row without any);
    * ``finite``: the finite values only (infinities skipped too);
    * ``pooled``: every row's tail together, one float (NaN if no value is finite);
    * ``episodes`` (``[..., updates]``, episodes ended per update) or ``carry``: the episodes that ended in the tail,
      each update's value weighted by its count: the last point of :func:`windowed_mean` over the tail's length
      (NaN without an episode; ``episodes`` None: one per set value). ``carry``: when none ended in the tail, the
      last earlier window's value (0 before any; :func:`forward_fill`)."""
    x = np.asarray(values)
    k = tail_length(x.shape[-1], last=last, frac=frac, rounding=rounding)
    if episodes is not None or carry:
        rows = x.reshape(-1, x.shape[-1])
        eps = [None] * len(rows) if episodes is None else np.asarray(episodes).reshape(rows.shape)
        ends = [windowed_mean(r, e, k) for r, e in zip(rows, eps)]
        return np.array([(forward_fill(w) if carry else w)[-1] for w in ends]).reshape(x.shape[:-1])
    tail = x[..., -k:]
    if pooled:
        return float(np.nanmean(tail)) if np.isfinite(tail).any() else float("nan")
    if finite:
        rows = [r[np.isfinite(r)] for r in tail.reshape(int(np.prod(tail.shape[:-1])), tail.shape[-1])]
        return np.array([r.mean() if r.size else np.nan for r in rows]).reshape(tail.shape[:-1])
    with warnings.catch_warnings():  # a row whose tail ended no episode: NaN, by design
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(tail, axis=-1)


def episode_mean(sums, counts) -> np.ndarray:
    """The mean of episodes given as totals (per seed: the sum of their returns and their count, e.g. gathered by
    another implementation): ``sums / counts`` in float64, NaN where none ended."""
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def best_window_mean(x, window: int):
    """Per seed (rows of ``x``), the best mean over ``window`` consecutive updates (updates with no ended episode,
    NaN, skipped; windows of none ignored)."""
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(x, np.float64), window, axis=1)
    with warnings.catch_warnings():  # early windows without any ended episode: NaN, by design
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(np.nanmean(windows, -1), -1)


# -- classification and intervals -------------------------------------------------------------------------------------


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
