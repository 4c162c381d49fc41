"""The shared statistics (jaxrl_pref.stats: Student-t interval, a run's final score, windowed and best-window means;
exact binomial intervals, Fisher's exact test, Holm's correction; rliable's IQM and probability of improvement) and
the shared Bradley-Terry loss (jaxrl_pref.losses), on hand-computed values; the BT loss also against the two formulas
its callers had before (HERON's pairwise loss, ONI-Ranking's soft-label loss)."""
import builtins
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_pref import stats
from jaxrl_pref.losses import bradley_terry_loss, bradley_terry_nll
from jaxrl_pref.rewards import preference, ranking

NAN = np.nan


def _no_scipy(monkeypatch):
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("scipy") else real_import(name, *a, **k))


# -- Student-t interval ---------------------------------------------------------------------------------------------

def test_mean_ci_is_the_student_t_interval_of_the_finite_values(monkeypatch):
    _no_scipy(monkeypatch)  # the table: t(3 df) = 3.182, t(1 df) = 12.706
    m, half, n = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; sample std sqrt(((1.5^2 + 0.5^2) * 2) / 3) = sqrt(5/3); half-width t * std / sqrt(4)
    assert (m, n) == (2.5, 4) and half == pytest.approx(3.182 * math.sqrt(5 / 3) / 2, rel=1e-12)
    m, half, n = stats.mean_ci([1.0, NAN, np.inf, 3.0])  # NaN and inf dropped: [1, 3]
    assert (m, n) == (2.0, 2) and half == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2), rel=1e-12)
    assert stats.mean_ci([5.0])[:2] == (5.0, pytest.approx(NAN, nan_ok=True)) and stats.mean_ci([5.0])[2] == 1
    assert all(math.isnan(v) for v in stats.mean_ci([NAN])[:2]) and stats.mean_ci([])[2] == 0


def test_mean_ci_with_scipy_is_within_the_tables_rounding():
    pytest.importorskip("scipy")
    m, half, _ = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert half == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-5)


# -- final score ------------------------------------------------------------------------------------------------------

X = np.array([[1.0, NAN, 3.0, 5.0, NAN, 7.0, 9.0, 11.0, NAN, 15.0],
              [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0]])


def test_tail_length_rounds_as_asked_and_keeps_one_update():
    assert stats.tail_length(10, last=3) == 3 and stats.tail_length(10, last=0) == 1
    assert [stats.tail_length(10, frac=0.25, rounding=r) for r in ("floor", "ceil", "round")] == [2, 3, 2]  # 2.5
    assert [stats.tail_length(10, frac=0.35, rounding=r) for r in ("floor", "ceil", "round")] == [3, 4, 4]  # 3.5
    assert stats.tail_length(9, frac=0.1) == 1 and stats.tail_length(0, frac=0.1) == 1
    assert all(stats.tail_length(n, frac=0.1) == max(1, n // 10) for n in range(2000))
    for kw in ({}, dict(last=2, frac=0.1), dict(frac=0.1, rounding="up")):
        with pytest.raises(ValueError):
            stats.tail_length(10, **kw)


def test_final_score_per_update_values_skip_nan():
    np.testing.assert_array_equal(stats.final_score(X, last=3), [13.0, 18.0])  # [11, -, 15], [16, 18, 20]
    np.testing.assert_array_equal(stats.final_score(X, frac=0.25), [15.0, 19.0])  # 2 updates: [-, 15], [18, 20]
    np.testing.assert_array_equal(stats.final_score(X, frac=0.25, rounding="ceil"), [13.0, 18.0])
    np.testing.assert_array_equal(stats.final_score(X, frac=0.35, rounding="round"), [35 / 3, 17.0])
    one = stats.final_score(X[1], last=4)  # a single curve: a 0-d array
    assert one.shape == () and float(one) == 17.0
    assert np.isnan(stats.final_score([[1.0, NAN, NAN]], last=2)).all()  # no episode in the tail: NaN


def test_final_score_finite_only_and_pooled():
    x = np.array([1.0, np.inf, 3.0])
    assert float(stats.final_score(x, last=2)) == np.inf
    assert float(stats.final_score(x, last=2, finite=True)) == 3.0
    assert np.isnan(stats.final_score(np.array([np.inf, NAN]), last=2, finite=True))
    assert stats.final_score(X, last=2, pooled=True) == pytest.approx((15 + 18 + 20) / 3, rel=1e-15)
    assert math.isnan(stats.final_score(np.full((2, 3), NAN), last=2, pooled=True))


def test_final_score_over_the_episodes_that_ended_in_the_tail():
    x, e = np.array([0.0, 1.0, NAN, 0.5]), np.array([2.0, 1.0, 0.0, 4.0])
    assert float(stats.final_score(x, last=2, episodes=e)) == 0.5  # 4 episodes at 0.5
    assert float(stats.final_score(x, last=3, episodes=e)) == pytest.approx((1 + 4 * 0.5) / 5)
    assert float(stats.final_score(x, last=4, episodes=e)) == pytest.approx((0 + 1 + 2) / 7)
    np.testing.assert_allclose(stats.final_score(np.stack([x, x]), last=3, episodes=np.stack([e, e])), [0.6, 0.6])
    # none ended in the tail: NaN, or with carry the last window that ended one (0 before any)
    x, e = np.array([0.0, 1.0, 1.0, NAN, NAN]), np.array([1.0, 1.0, 1.0, 0.0, 0.0])
    assert np.isnan(stats.final_score(x, last=2, episodes=e))
    assert float(stats.final_score(x, last=2, episodes=e, carry=True)) == 1.0  # the window [1, -] before
    assert float(stats.final_score(x, last=3, episodes=e)) == 1.0
    assert float(stats.final_score(np.array([NAN, NAN]), last=1, carry=True)) == 0.0


def test_windowed_mean_forward_fill_best_window_and_episode_mean():
    np.testing.assert_allclose(stats.windowed_mean(np.array([1.0, 0.0]), np.array([1, 3])), [1.0, 0.25])
    np.testing.assert_array_equal(stats.windowed_mean(np.array([NAN, 1.0, 0.0]), window=2), [NAN, 1.0, 0.5])
    np.testing.assert_array_equal(stats.forward_fill(np.array([NAN, 2.0, NAN, 3.0])), [0.0, 2.0, 2.0, 3.0])
    # windows of 2: [1, 3] 2, [3, -] 3, [-, 5] 5, [5, 0] 2.5; windows of nothing ignored
    np.testing.assert_array_equal(stats.best_window_mean([[1.0, 3.0, NAN, 5.0, 0.0], [NAN, NAN, 2.0, NAN, NAN]], 2),
                                  [5.0, 2.0])
    np.testing.assert_array_equal(stats.episode_mean([6.0, 0.0], [3, 0]), [2.0, NAN])


# -- solved counts: exact binomial intervals, Fisher's exact test, Holm ---------------------------------------------

def test_clopper_pearson_known_values_and_edges():
    from scipy.stats import binom
    # k = 0 and k = n in closed form: the one-sided bound solves (1 - p)^n = a/2, resp. p^n = a/2
    assert stats.clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** 0.1, abs=1e-12))  # 0.3085
    assert stats.clopper_pearson(10, 10) == (pytest.approx(0.025 ** 0.1, abs=1e-12), 1.0)  # 0.6915
    lo, hi = stats.clopper_pearson(3, 10)
    assert (lo, hi) == (pytest.approx(0.0667, abs=5e-5), pytest.approx(0.6525, abs=5e-5))
    # its definition: P(X >= 3 | lo) = P(X <= 3 | hi) = 2.5%
    assert binom.sf(2, 10, lo) == pytest.approx(0.025, rel=1e-9) and binom.cdf(3, 10, hi) == pytest.approx(0.025)
    lo90, hi90 = stats.clopper_pearson(3, 10, level=0.9)
    assert lo < lo90 < 0.3 < hi90 < hi and binom.sf(2, 10, lo90) == pytest.approx(0.05, rel=1e-9)
    assert stats.clopper_pearson(np.int64(1), np.int64(1)) == (pytest.approx(0.025, rel=1e-12), 1.0)  # n = 1


def test_wilson_known_values_edges_and_narrower_than_exact():
    z2 = 1.959963984540054 ** 2
    assert stats.wilson(3, 10) == (pytest.approx(0.1078, abs=5e-5), pytest.approx(0.6032, abs=5e-5))
    assert stats.wilson(0, 10) == (0.0, pytest.approx(z2 / (10 + z2), rel=1e-12))  # 0.2775
    assert stats.wilson(10, 10) == (pytest.approx(10 / (10 + z2), rel=1e-12), 1.0)
    for k in range(11):
        (wl, wh), (cl, ch) = stats.wilson(k, 10), stats.clopper_pearson(k, 10)
        assert 0 <= cl <= wl <= k / 10 <= wh <= ch <= 1


@pytest.mark.parametrize("args", [(11, 10), (-1, 10), (0, 0), (0.5, 10), (3, 10.0)])
def test_counts_rejects_what_is_not_k_of_n(args):
    for f in (stats.clopper_pearson, stats.wilson):
        with pytest.raises((ValueError, TypeError)):
            f(*args)
    with pytest.raises(ValueError):
        stats.clopper_pearson(3, 10, level=1.0)


def test_fisher_exact_on_the_tea_tasting_table():
    # Fisher's lady: 3 of 4 milk-first cups named right vs 1 of 4: of the C(8,4) = 70 tables with these margins, 16
    # have 3 (and 16 have 1), 1 has 4 (and 1 has 0): two-sided p = 34/70 = 0.4857, one-sided 17/70
    assert stats.fisher_exact(3, 4, 1, 4) == pytest.approx(34 / 70, rel=1e-12)
    assert stats.fisher_exact(3, 4, 1, 4, "greater") == pytest.approx(17 / 70, rel=1e-12)
    assert stats.fisher_exact(3, 4, 1, 4, "less") == pytest.approx(69 / 70, rel=1e-12)
    assert stats.fisher_exact(5, 8, 5, 8) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        stats.fisher_exact(3, 4, 1, 4, "bigger")


def test_holm_step_down_monotone_and_capped():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (monotone)
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])  # 0.5 x 2 capped; 0.6 raised to it
    np.testing.assert_allclose(stats.holm([0.02]), [0.02])
    assert stats.holm([]).shape == (0,)
    for bad in ([0.1, NAN], [1.2], [-0.1], [[0.1]]):
        with pytest.raises(ValueError):
            stats.holm(bad)


def test_compare_counts_rows_against_the_baseline():
    rows = stats.compare_counts({"a": (3, 4), "base": (1, 4), "b": (1, 4)}, "base")
    assert [r["cell"] for r in rows] == ["a", "b"]
    a, b = rows
    assert (a["k"], a["n"], a["rate"]) == (3, 4, 0.75) and (a["low"], a["high"]) == stats.clopper_pearson(3, 4)
    assert a["p"] == pytest.approx(34 / 70) and b["p"] == pytest.approx(1.0)
    assert a["p_holm"] == pytest.approx(2 * 34 / 70) and b["p_holm"] == pytest.approx(1.0)
    one = stats.compare_counts({"base": (1, 4), "a": (3, 4)}, "base", alternative="greater")
    assert one[0]["p"] == pytest.approx(17 / 70) and one[0]["p_holm"] == one[0]["p"]
    with pytest.raises(KeyError):
        stats.compare_counts({"a": (1, 2)}, "ppo")


def test_bootstrap_mean_interval_clips_on_request():
    x = [1.0, 1.0, 0.5, 0.9]
    assert stats.bootstrap_mean_interval(x, clip=(0, 1)) == stats.bootstrap_mean_interval(x)  # already within
    lo, hi = stats.bootstrap_mean_interval([1.2, 1.4, 0.8])
    assert hi > 1 and stats.bootstrap_mean_interval([1.2, 1.4, 0.8], clip=(0, 1)) == (lo, 1.0)


# -- rliable's aggregates: IQM and probability of improvement -------------------------------------------------------

def test_iqm_is_the_mean_of_the_middle_half_of_all_runs_pooled():
    from scipy.stats import trim_mean
    m = [[0.0, 10.0], [1.0, 9.0], [2.0, 8.0], [100.0, -50.0]]  # pooled, sorted: -50 0 | 1 2 8 9 | 10 100
    assert stats.iqm(m) == 5.0
    x = np.random.default_rng(1).normal(size=(12, 5))
    assert stats.iqm(x) == pytest.approx(trim_mean(x.ravel(), 0.25), rel=1e-12)
    assert stats.iqm({"m": m, "x": x}) == {"m": 5.0, "x": stats.iqm(x)}
    assert stats.iqm([1.0, 2.0, 3.0, 4.0]) == 2.5  # 1-d: one task's runs
    with pytest.raises(ValueError):
        stats.iqm([[1.0, NAN]])


def test_iqm_interval_contains_the_estimate_and_is_seeded():
    x = np.random.default_rng(2).uniform(size=(10, 3))
    lo, hi = stats.iqm_interval(x, reps=300, seed=5)
    assert lo < stats.iqm(x) < hi and 0 <= lo and hi <= 1
    assert stats.iqm_interval(x, reps=300, seed=5) == (lo, hi) != stats.iqm_interval(x, reps=300, seed=6)
    lo90, hi90 = stats.iqm_interval(x, reps=300, seed=5, level=0.9)
    assert lo <= lo90 and hi90 <= hi
    both = stats.iqm_interval({"a": x, "b": x + 1}, reps=300, seed=5)
    assert both["a"] == (lo, hi) and both["b"] == pytest.approx((lo + 1, hi + 1))


def test_stratified_bootstrap_resamples_runs_within_each_task():
    m = np.column_stack([np.zeros(6), np.ones(6)])  # task 0 always 0, task 1 always 1
    first = lambda s: s[:, 0].mean()  # noqa: E731
    assert stats.stratified_bootstrap_interval(first, m, reps=200) == (0.0, 0.0)  # runs never cross tasks
    assert stats.stratified_bootstrap_interval(first, m, reps=200, task_bootstrap=True) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.stratified_bootstrap_interval(lambda a, b: 0.0, m, m, task_bootstrap=True)


def test_probability_of_improvement_values_and_interval():
    y = np.random.default_rng(3).normal(size=(8, 2))
    assert stats.probability_of_improvement(y + 10, y) == 1.0 > 0.9
    assert stats.probability_of_improvement(y, y) == 0.5 and stats.probability_of_improvement(y, y + 10) == 0.0
    # by hand, one task: x = 1 2 3 vs y = 0 2: pairs won 1>0, 2>0, 3>0, 3>2, tied 2=2: 4.5 / 6 = 0.75; a second
    # task x wins outright (1.0): averaged 0.875; per task it is the Mann-Whitney AUC
    xs, ys = [[1.0, 5.0], [2.0, 6.0], [3.0, 7.0]], [[0.0, 1.0], [2.0, 4.0]]
    assert stats.probability_of_improvement(xs, ys) == pytest.approx(0.875)
    assert stats.probability_of_improvement([1.0, 2.0, 3.0], [0.0, 2.0]) == stats.auc([1, 2, 3, 0, 2],
                                                                                      [1, 1, 1, 0, 0]) == 0.75
    assert stats.probability_of_improvement_interval(y + 10, y, reps=100) == (1.0, 1.0)
    lo, hi = stats.probability_of_improvement_interval(y, y, reps=200, seed=1)
    assert lo < 0.5 < hi and stats.probability_of_improvement_interval(y, y, reps=200, seed=1) == (lo, hi)
    better = np.random.default_rng(4).normal(1.5, 1.0, size=(10, 1))
    lo, hi = stats.probability_of_improvement_interval(better, y[:, :1], reps=200)
    assert 0.5 < lo < stats.probability_of_improvement(better, y[:, :1]) < hi <= 1
    with pytest.raises(ValueError):
        stats.probability_of_improvement(y, y[:, :1])


def test_missing_rliable_names_the_fix(monkeypatch):
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("rliable") else real_import(name, *a, **k))
    for call in (lambda: stats.iqm([1.0, 2.0]), lambda: stats.iqm_interval([1.0, 2.0]),
                 lambda: stats.probability_of_improvement([1.0], [0.0]),
                 lambda: stats.probability_of_improvement_interval([1.0], [0.0])):
        with pytest.raises(ImportError, match=r"pip install rliable.*\.\[study\]"):
            call()
    assert stats.clopper_pearson(3, 10)[0] == pytest.approx(0.0667, abs=5e-5)  # the rest needs scipy only


# -- Bradley-Terry loss ---------------------------------------------------------------------------------------------

def _sp(x):
    return math.log1p(math.exp(x))


def test_bradley_terry_loss_on_two_pairs():
    """Pair 1: d = 2, a preferred (p = 1): softplus(-2); pair 2: d = -1, a tie (p = 1/2): (softplus(1) +
    softplus(-1)) / 2; the loss is their (weighted) mean."""
    d, p = jnp.array([2.0, -1.0]), jnp.array([1.0, 0.5])
    want = (_sp(-2) + 0.5 * (_sp(1) + _sp(-1))) / 2
    assert float(bradley_terry_loss(d, p, jnp.ones(2))) == pytest.approx(want, rel=1e-6)
    assert float(bradley_terry_loss(d, p, jnp.array([1.0, 0.0]))) == pytest.approx(_sp(-2), rel=1e-6)
    assert float(bradley_terry_loss(d, p, jnp.zeros(2))) == 0.0  # no pair counted
    np.testing.assert_allclose(bradley_terry_nll(d, p), [_sp(-2), 0.5 * (_sp(1) + _sp(-1))], rtol=1e-6)
    # d/dd of the mean: -(p - sigmoid(d)) / 2 per pair
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    g = jax.grad(lambda d: bradley_terry_loss(d, p, jnp.ones(2)))(d)
    np.testing.assert_allclose(g, [-(1 - sig(2)) / 2, -(0.5 - sig(-1)) / 2], rtol=1e-5)


def _ranking_before(ra, rb, pref, weights):
    """ONI-Ranking's loss as it was written before the shared core."""
    d = ra - rb
    nll = -(pref * jax.nn.log_sigmoid(d) + (1 - pref) * jax.nn.log_sigmoid(-d))
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _preference_before(returns, labels, ties="skip"):
    """HERON's loss as it was written before the shared core."""
    b = returns.shape[0]
    d = returns[:, None] - returns[None, :]
    upper = jnp.triu(jnp.ones((b, b), bool), k=1)
    y = labels.astype(jnp.float32)
    decided = upper & (labels != 0)
    tied = upper & (labels == 0)
    pair_loss = jnp.where(decided, jax.nn.softplus(-y * d), 0.0)
    if ties == "half":
        pair_loss = pair_loss + jnp.where(tied, 0.5 * (jax.nn.softplus(-d) + jax.nn.softplus(d)), 0.0)
        counted = decided | tied
    else:
        counted = decided
    return pair_loss.sum() / jnp.maximum(counted.sum(), 1)


@pytest.mark.parametrize("seed", range(4))
def test_both_callers_equal_their_formulas_before(seed):
    """ONI-Ranking's loss is the core's formula unchanged: bitwise equal, eager and jitted, with its gradients. HERON's
    pairwise loss (hard labels +-1, ties 1/2) is bitwise equal eagerly; jitted, XLA fuses the two formulas
    differently, so loss and gradients agree to float32 rounding (a few ulp)."""
    k = jax.random.PRNGKey(seed)
    ra, rb = jax.random.normal(jax.random.fold_in(k, 0), (2, 64)) * 2
    pref = jax.random.choice(jax.random.fold_in(k, 1), jnp.array([0.0, 0.5, 1.0, 0.3]), (64,))
    w = (jax.random.uniform(jax.random.fold_in(k, 2), (64,)) > 0.3).astype(jnp.float32)
    for f in (lambda fn: fn, jax.jit):
        new, old = f(ranking.bt_loss), f(_ranking_before)
        assert np.asarray(new(ra, rb, pref, w)).tobytes() == np.asarray(old(ra, rb, pref, w)).tobytes()
        g_new = f(jax.grad(ranking.bt_loss, argnums=(0, 1)))(ra, rb, pref, w)
        g_old = f(jax.grad(_ranking_before, argnums=(0, 1)))(ra, rb, pref, w)
        assert np.asarray(g_new).tobytes() == np.asarray(g_old).tobytes()
    r = jax.random.normal(jax.random.fold_in(k, 3), (16,)) * 3
    labels = jax.random.randint(jax.random.fold_in(k, 4), (16, 16), -1, 2)
    for ties in ("skip", "half"):
        new = preference.bt_loss(r, labels, ties)[0]
        assert np.asarray(new).tobytes() == np.asarray(_preference_before(r, labels, ties)).tobytes()
        np.testing.assert_allclose(jax.jit(lambda r: preference.bt_loss(r, labels, ties)[0])(r),
                                   jax.jit(lambda r: _preference_before(r, labels, ties))(r), rtol=1e-6)
        np.testing.assert_allclose(jax.jit(jax.grad(lambda r: preference.bt_loss(r, labels, ties)[0]))(r),
                                   jax.jit(jax.grad(lambda r: _preference_before(r, labels, ties)))(r),
                                   rtol=1e-5, atol=1e-8)
