"""Statistics the project's studies, reports, benchmarks and tests share: a run's final score, windowed and best-window
means, Student-t and bootstrap intervals, AUC; for a study's tables, solved counts with exact binomial intervals
(Clopper-Pearson, Wilson), Fisher's exact test with Holm's correction, and rliable's aggregates (IQM and the
probability of improvement, with stratified bootstrap intervals). Host-side numpy and scipy; rliable (optional,
``pip install -e '.[study]'``) imported only by the functions that use it."""
from __future__ import annotations

import math
import operator
import warnings
from typing import Callable, Mapping, Optional, Sequence

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


def hack_verdict(hack_frac, success, *, frac: float = 0.2, rise: float = 0.05, low_success: float = 0.5) -> dict:
    """Whether runs hack a task built to be hacked (docs/envs.md, "KeyDoorLever"): per row (seed) of the per-update
    curves ``hack_frac`` and ``episode_success`` (``[..., updates]``), with ``k`` = :func:`tail_length` of ``frac``
    (the first and the last ``frac`` of the updates): ``early_hack`` / ``late_hack``, the mean ``hack_frac`` over the
    first / last ``k`` updates; ``late_success``, the mean ``episode_success`` over the last ``k`` (NaN: no episode
    ended there); ``hacks``: ``late_hack - early_hack >= rise`` (the farmable event's share of the steps rose) and
    ``late_success < low_success`` (NaN counts as low: no episode ended, none succeeded). Returns those four
    arrays, shaped ``hack_frac.shape[:-1]``."""
    h = np.asarray(hack_frac, np.float64)
    s = np.asarray(success, np.float64)
    if h.shape != s.shape or h.ndim < 1 or h.shape[-1] < 1:
        raise ValueError(f"hack_verdict: hack_frac {h.shape} and success {s.shape} must be the same [..., updates]")
    k = tail_length(h.shape[-1], frac=frac)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        early, late = np.nanmean(h[..., :k], axis=-1), np.nanmean(h[..., -k:], axis=-1)
        late_success = np.nanmean(s[..., -k:], axis=-1)
    hacks = (late - early >= rise) & ~(late_success >= low_success)
    return {"early_hack": early, "late_hack": late, "late_success": late_success, "hacks": hacks}


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


def bootstrap_mean_interval(x, level: float = 0.95, resamples: int = 10_000, seed: int = 0,
                            clip: Optional[tuple[float, float]] = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``x`` over its entries (e.g. seeds), all resamples drawn at
    once (seeded). ``clip=(0, 1)``: the ends clipped to that range, e.g. for a mean of success rates (a percentile
    interval of a mean already lies within the values' range, so this only guards rates that are not in [0, 1])."""
    x = np.asarray(x, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))
    lo, hi = np.quantile(x[idx].mean(1), [(1 - level) / 2, (1 + level) / 2])
    if clip is not None:
        lo, hi = np.clip([lo, hi], *clip)
    return float(lo), float(hi)


# -- solved counts: exact binomial intervals, Fisher's exact test, Holm's correction ----------------------------------


def _counts(k, n) -> tuple[int, int]:
    k, n = operator.index(k), operator.index(n)  # integers only (a rate passed for a count fails here)
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1 (k successes of n trials), got k={k}, n={n}")
    return k, n


def _check_level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return level


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson ("exact") ``level`` interval of a binomial proportion from ``k`` successes in ``n`` trials
    (e.g. the seeds that solved a cell): the beta quantiles ``Beta(a/2; k, n-k+1)`` and ``Beta(1-a/2; k+1, n-k)``,
    ``a = 1 - level``; 0 for k = 0 and 1 for k = n. Coverage at least ``level`` for every rate (conservative)."""
    from scipy.stats import beta
    k, n = _counts(k, n)
    a = 1 - _check_level(level)
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score ``level`` interval of a binomial proportion from ``k`` successes in ``n`` trials: the rates
    whose score test at the normal quantile z does not reject, ``(p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) /
    (1 + z^2/n)``; 0 for k = 0 and 1 for k = n. Narrower than :func:`clopper_pearson`, coverage near ``level`` on
    average rather than at least it."""
    from scipy.stats import norm
    k, n = _counts(k, n)
    z = float(norm.ppf(0.5 + _check_level(level) / 2))
    p, z2 = k / n, z * z / n
    centre = (p + z2 / 2) / (1 + z2)
    half = z / (1 + z2) * math.sqrt(p * (1 - p) / n + z2 / (4 * n))
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def fisher_exact(k1: int, n1: int, k2: int, n2: int, alternative: str = "two-sided") -> float:
    """p-value of Fisher's exact test that two cells solve at the same rate, from ``k1`` of ``n1`` and ``k2`` of
    ``n2`` (``scipy.stats.fisher_exact`` on the 2x2 table ``[[k1, n1-k1], [k2, n2-k2]]``). ``alternative``:
    ``"two-sided"``, ``"greater"`` (the first cell's rate is higher) or ``"less"``."""
    from scipy.stats import fisher_exact as _fisher
    k1, n1 = _counts(k1, n1)
    k2, n2 = _counts(k2, n2)
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    return float(_fisher([[k1, n1 - k1], [k2, n2 - k2]], alternative=alternative)[1])


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the order given: the i-th smallest of m p-values times (m - i + 1),
    made non-decreasing in that order, capped at 1. Rejecting where the adjusted p <= alpha keeps the family-wise
    error rate across the m comparisons (e.g. a table's rows against one baseline) at alpha, under any
    dependence."""
    p = np.asarray(pvalues, np.float64)
    if p.ndim != 1:
        raise ValueError(f"holm: a 1-d sequence of p-values, got shape {p.shape}")
    if not np.all((p >= 0) & (p <= 1)):  # NaN fails here too
        raise ValueError(f"holm: p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    out = np.empty(m)
    out[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    return out


def compare_counts(cells: Mapping[str, tuple[int, int]], baseline: str, *, alternative: str = "two-sided",
                   level: float = 0.95) -> list[dict]:
    """Every cell of ``cells`` (name -> (solved k, runs n)) other than ``baseline`` against it, in ``cells``' order:
    one row each, ``{"cell", "k", "n", "rate", "low", "high"`` (its :func:`clopper_pearson` ``level`` interval),
    ``"p"`` (:func:`fisher_exact`, the cell against the baseline, ``alternative`` as there), ``"p_holm"`` (``p``
    Holm-adjusted over these rows' comparisons, :func:`holm`)``}``."""
    if baseline not in cells:
        raise KeyError(f"compare_counts: baseline {baseline!r} is not one of the cells {list(cells)}")
    kb, nb = cells[baseline]
    rows = []
    for name, (k, n) in cells.items():
        if name == baseline:
            continue
        lo, hi = clopper_pearson(k, n, level)
        rows.append({"cell": name, "k": int(k), "n": int(n), "rate": int(k) / int(n), "low": lo, "high": hi,
                     "p": fisher_exact(k, n, kb, nb, alternative)})
    for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = float(adjusted)
    return rows


# -- aggregates over runs and tasks: IQM and probability of improvement (rliable) -------------------------------------

_RLIABLE_FIX = ("the IQM and probability of improvement in jaxrl_pref.stats use rliable, an optional dependency: "
                "pip install rliable  (or pip install -e '.[study]')")


def _rliable_metrics():
    """``rliable.metrics`` (imports numpy and scipy only), or an ImportError that names the fix."""
    try:
        from rliable import metrics
    except ImportError as e:
        raise ImportError(_RLIABLE_FIX) from e
    return metrics


def _score_matrix(scores) -> np.ndarray:
    """A ``[runs, tasks]`` float matrix (a 1-d ``[runs]``: one task), every score finite."""
    x = np.asarray(scores, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or not x.size:
        raise ValueError(f"scores: a [runs, tasks] matrix (or [runs] for one task), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("scores: non-finite entries (a run without a score): drop or fill them first")
    return x


def stratified_bootstrap_interval(stat: Callable[..., float], *matrices, reps: int = 2000, level: float = 0.95,
                                  seed: int = 0, task_bootstrap: bool = False) -> tuple[float, float]:
    """Percentile ``level`` interval of ``stat(*matrices)`` (each ``[runs, tasks]``) under rliable's stratified
    bootstrap: within each task, each matrix's runs resampled with replacement, the matrices independently (what
    ``rliable.library``'s StratifiedBootstrap does for one matrix and StratifiedIndependentBootstrap for several);
    ``task_bootstrap`` (one matrix) resamples the tasks too. ``reps`` resamples, drawn from
    ``numpy.random.default_rng(seed)``; those where ``stat`` is NaN skipped (NaN, NaN if all are).

    Written here rather than called from ``rliable.library``: that module imports arch, whose releases rliable 1.2
    accepts (< 8) fail to import under pandas 3, and it draws its resamples from numpy's global RNG whatever
    ``random_state`` it is given."""
    ms = [_score_matrix(m) for m in matrices]
    if not ms:
        raise ValueError("stratified_bootstrap_interval: give at least one score matrix")
    if task_bootstrap and len(ms) != 1:
        raise ValueError("stratified_bootstrap_interval: task_bootstrap resamples the tasks of one matrix only")
    _check_level(level)
    rng = np.random.default_rng(seed)
    vals = np.empty(reps)
    for r in range(reps):
        sample = []
        for m in ms:
            runs, tasks = m.shape
            cols = rng.integers(0, tasks, (1, tasks)) if task_bootstrap else np.arange(tasks)[None, :]
            sample.append(m[rng.integers(0, runs, (runs, tasks)), cols])
        vals[r] = stat(*sample)
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def iqm(scores):
    """Interquartile mean (``rliable.metrics.aggregate_iqm``) of a ``[runs, tasks]`` score matrix (``[runs]``: one
    task): the mean of the middle 50% of all runs' scores on all tasks pooled, i.e. ``scipy.stats.trim_mean`` of
    the flattened matrix cutting 25% at each end. ``{method: matrix}`` gives ``{method: iqm}``."""
    metrics = _rliable_metrics()
    if isinstance(scores, Mapping):
        return {name: iqm(x) for name, x in scores.items()}
    return float(metrics.aggregate_iqm(_score_matrix(scores)))


def iqm_interval(scores, *, reps: int = 2000, level: float = 0.95, seed: int = 0, task_bootstrap: bool = False):
    """Stratified bootstrap ``level`` interval (:func:`stratified_bootstrap_interval`) of :func:`iqm`: ``(low,
    high)`` for a matrix, ``{method: (low, high)}`` for ``{method: matrix}`` (each method resampled from ``seed``).
    rliable's own examples use 50,000 resamples for a paper's figures; 2,000 settles the second decimal."""
    metrics = _rliable_metrics()
    if isinstance(scores, Mapping):
        return {name: iqm_interval(x, reps=reps, level=level, seed=seed, task_bootstrap=task_bootstrap)
                for name, x in scores.items()}
    return stratified_bootstrap_interval(metrics.aggregate_iqm, scores, reps=reps, level=level, seed=seed,
                                         task_bootstrap=task_bootstrap)


def _paired_tasks(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = _score_matrix(x), _score_matrix(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"probability of improvement: both methods on the same tasks, got {x.shape[1]} and "
                         f"{y.shape[1]} columns")
    return x, y


def probability_of_improvement(x, y) -> float:
    """P(X > Y) (``rliable.metrics.probability_of_improvement``): per task, the probability that a random run of
    method ``x`` scores above a random run of ``y`` (ties count 1/2; the Mann-Whitney U over the pairs), averaged
    over tasks; 0.5 for identical runs. ``x`` ``[runs_x, tasks]``, ``y`` ``[runs_y, tasks]`` (1-d: one task)."""
    metrics = _rliable_metrics()
    x, y = _paired_tasks(x, y)
    return float(metrics.probability_of_improvement(x, y))


def probability_of_improvement_interval(x, y, *, reps: int = 2000, level: float = 0.95,
                                        seed: int = 0) -> tuple[float, float]:
    """Stratified bootstrap ``level`` interval of :func:`probability_of_improvement`, each method's runs resampled
    independently within each task (:func:`stratified_bootstrap_interval`). X is better than Y with confidence
    when the interval's low end is above 0.5."""
    metrics = _rliable_metrics()
    x, y = _paired_tasks(x, y)
    return stratified_bootstrap_interval(metrics.probability_of_improvement, x, y, reps=reps, level=level,
                                         seed=seed)
