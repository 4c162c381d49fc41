"""The shared statistics (jaxrl_pref.stats: Student-t interval, a run's final score, windowed and best-window means) and
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
