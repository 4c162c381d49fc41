"""GAE against a hand-computed example and the PPO loss pieces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_pref.losses import gae, ppo_loss
from jaxrl_pref.rollout import Transition, next_values


def test_gae_hand_example_with_termination_and_truncation():
    g, lam = 0.9, 0.5
    # 4 steps of one env: step 1 terminates, step 2 is truncated (final obs value 10), step 3 is cut by the rollout
    r = jnp.array([1.0, 2.0, 3.0, 4.0])[:, None]
    v = jnp.array([0.5, 1.0, 1.5, 2.0])[:, None]
    term = jnp.array([False, True, False, False])[:, None]
    trunc = jnp.array([False, False, True, False])[:, None]
    traj = Transition(None, None, None, v, r, term, trunc, jnp.full((4, 1, 1), 7.0), {})
    last_value = jnp.array([3.0])
    nxt = next_values(traj, last_value, lambda obs: obs[..., 0] + 3.0)  # V(final_obs) = 10 on every step
    # step0: next is step1's value 1.0; step1: terminated (value irrelevant); step2: V(final)=10; step3: last=3
    np.testing.assert_allclose(nxt[[0, 2, 3], 0], [1.0, 10.0, 3.0])
    adv, ret = gae(r, v, nxt, term, term | trunc, g, lam)
    d3 = 4.0 + g * 3.0 - 2.0            # 4.7
    d2 = 3.0 + g * 10.0 - 1.5           # 10.5  (bootstraps from the final obs, episode ends: no recursion)
    d1 = 2.0 + 0.0 - 1.0                # 1.0   (terminal: no bootstrap)
    d0 = 1.0 + g * 1.0 - 0.5            # 1.4
    a3, a2, a1 = d3, d2, d1
    a0 = d0 + g * lam * a1              # 1.85
    np.testing.assert_allclose(adv[:, 0], [a0, a1, a2, a3], rtol=1e-6)
    np.testing.assert_allclose(ret[:, 0], np.array([a0, a1, a2, a3]) + np.array([0.5, 1.0, 1.5, 2.0]), rtol=1e-6)


def test_gae_lambda_one_is_discounted_return_minus_value():
    r = jnp.ones((5, 2))
    v = jnp.zeros((5, 2))
    z = jnp.zeros((5, 2), bool)
    adv, _ = gae(r, v, jnp.zeros((5, 2)), z, z, 0.5, 1.0)
    expected = np.array([sum(0.5 ** k for k in range(5 - t)) for t in range(5)])
    np.testing.assert_allclose(adv[:, 0], expected, rtol=1e-6)


def _loss(new_lp, old_lp, adv, **kw):
    n = len(adv)
    args = dict(entropy=jnp.zeros(n), new_value=jnp.zeros(n), old_value=jnp.zeros(n), returns=jnp.zeros(n),
                clip_eps=0.2, vf_coef=0.5, ent_coef=0.0, normalize_advantages=False)
    args.update(kw)
    return ppo_loss(jnp.asarray(new_lp), jnp.asarray(old_lp), jnp.asarray(adv), **args)


def test_policy_clipping_both_sides():
    lr = jnp.log(jnp.array([1.5, 0.5]))
    total, m = _loss(lr, jnp.zeros(2), jnp.array([1.0, -1.0]))
    # ratio 1.5 with A>0 clips to 1.2; ratio 0.5 with A<0 clips to 0.8 -> loss = -(1.2 - 0.8)/2
    assert float(m["loss/policy"]) == pytest.approx(-(1.2 * 1.0 + 0.8 * -1.0) / 2)
    assert float(m["loss/clip_frac"]) == 1.0
    # the clipped side gives no gradient
    g = jax.grad(lambda x: _loss(x, jnp.zeros(2), jnp.array([1.0, -1.0]))[0])(lr)
    np.testing.assert_allclose(g, 0.0)
    # unclipped side: pessimistic min keeps the unclipped term (ratio 0.5, A>0)
    _, m = _loss(jnp.log(jnp.array([0.5])), jnp.zeros(1), jnp.array([1.0]))
    assert float(m["loss/policy"]) == pytest.approx(-0.5)


def test_value_clipping_and_entropy_sign_and_kl():
    total, m = _loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), new_value=jnp.array([2.0]),
                     old_value=jnp.array([0.0]), returns=jnp.array([1.0]))
    # unclipped error (2-1)^2 = 1, clipped value 0.2 -> (0.2-1)^2 = 0.64; max -> 1, times 0.5
    assert float(m["loss/value"]) == pytest.approx(0.5)
    _, m2 = _loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), new_value=jnp.array([0.5]),
                  old_value=jnp.array([0.0]), returns=jnp.array([1.0]))
    assert float(m2["loss/value"]) == pytest.approx(0.5 * (1.0 - 0.2) ** 2)  # clipped error is the larger
    _, m3 = _loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), new_value=jnp.array([0.5]),
                  old_value=jnp.array([0.0]), returns=jnp.array([1.0]), clip_value=False)
    assert float(m3["loss/value"]) == pytest.approx(0.5 * 0.25)
    t_hi, _ = _loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), entropy=jnp.ones(2), ent_coef=0.1)
    t_lo, m4 = _loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), entropy=jnp.zeros(2), ent_coef=0.1)
    assert float(t_hi) < float(t_lo)  # more entropy lowers the loss
    assert float(m4["loss/approx_kl"]) == pytest.approx(0.0, abs=1e-7)
    _, m5 = _loss(jnp.log(jnp.array([1.1, 0.9])), jnp.zeros(2), jnp.zeros(2))
    assert 0.0 < float(m5["loss/approx_kl"]) < 0.01


def test_advantage_normalisation():
    _, m = _loss(jnp.zeros(4), jnp.zeros(4), jnp.array([1.0, 2.0, 3.0, 4.0]), normalize_advantages=True)
    assert float(m["loss/policy"]) == pytest.approx(0.0, abs=1e-6)  # normalised advantages have mean 0
