"""Recurrent PPO (``ppo.Config(network="gru" | "lstm")``): the cores against flax's cells, sequence vs step-by-step
calls, carry resets, the policy state through rollouts and targets, the sequence update against a reference,
resume, vmap over seeds, the host loop, config errors; learning tests (memory task, CartPole, MiniHack) are slow."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import envs
from agents import ppo
from envs.host import JaxHostEnv
from jaxrl_pref import recurrent
from jaxrl_pref.config import ConfigError
from jaxrl_pref.losses import gae, ppo_loss
from jaxrl_pref.networks import MLP, EncoderActorCritic, RecurrentActorCritic, RecurrentCore, distribution
from jaxrl_pref.recurrent import RecurrentState
from jaxrl_pref.rollout import collect

ROOT = Path(__file__).resolve().parents[1]
CELLS = ("gru", "lstm")
TINY = dict(env_name="CartPole-v1", num_envs=4, num_steps=16, total_timesteps=4 * 16 * 4, hidden=(16,),
            activation="relu", rnn_hidden=16, update_epochs=2, num_minibatches=2)


def bits(tree):
    return [(np.asarray(x).dtype.str, np.shape(x), np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


def rand_carry(cell, key, batch, h):
    k1, k2 = jax.random.split(key)
    c = jax.random.normal(k1, (batch, h))
    return (jax.random.normal(k2, (batch, h)), c) if cell == "lstm" else c


# -- the network ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("discrete", [True, False])
def test_shapes_and_dtypes(cell, discrete):
    T, B = 5, 3
    net = RecurrentActorCritic(4, discrete, hidden=(8,), activation="relu", cell=cell, rnn_hidden=16)
    carry = net.initialize_carry((B,))
    obs, start = jnp.ones((T, B, 6)), jnp.zeros((T, B), bool)
    params = net.init(jax.random.PRNGKey(0), carry, obs, start)
    carry_t, pi, value = net.apply(params, carry, obs, start)
    chex.assert_trees_all_equal_shapes_and_dtypes(carry_t, carry)
    chex.assert_shape(jax.tree.leaves(carry), (B, 16))
    chex.assert_shape(jax.tree.leaves(pi), (T, B, 4))
    chex.assert_shape(value, (T, B))
    chex.assert_type([value, *jax.tree.leaves(pi), *jax.tree.leaves(carry_t)], jnp.float32)
    k = params["params"]["core"]
    G = recurrent.CELLS[cell]
    chex.assert_shape([k["wi"], k["wh"], k["bi"], k["bh"]], [(8, G * 16), (16, G * 16), (G * 16,), (G * 16,)])


@pytest.mark.parametrize("cell", CELLS)
def test_sequence_call_equals_step_by_step(cell):
    T, B = 9, 3
    net = RecurrentActorCritic(2, hidden=(8,), activation="relu", cell=cell, rnn_hidden=16)
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    obs = jax.random.normal(k[0], (T, B, 5))
    start = jax.random.bernoulli(k[1], 0.3, (T, B))
    carry0 = rand_carry(cell, k[2], B, 16)
    params = net.init(jax.random.PRNGKey(0), carry0, obs, start)
    carry_t, pi, value = jax.jit(net.apply)(params, carry0, obs, start)
    step = jax.jit(net.apply)
    c = carry0
    for t in range(T):
        c, pi_t, v_t = step(params, c, obs[t:t + 1], start[t:t + 1])
        np.testing.assert_allclose(pi_t[0], pi[t], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v_t[0], value[t], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(carry_t)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_reset_zeroes_the_carry_exactly_where_start_is_set(cell):
    """Where ``start[t]`` is set, nothing before ``t`` (carry, earlier observations) changes the outputs from ``t`` on,
    bit for bit; elsewhere it does."""
    T, B, t0 = 8, 3, 4
    core = RecurrentCore(cell, 16)
    k = jax.random.split(jax.random.PRNGKey(2), 5)
    x = jax.random.normal(k[0], (T, B, 6))
    start = jnp.zeros((T, B), bool).at[t0, 0].set(True).at[0, 1].set(True)
    params = core.init(jax.random.PRNGKey(0), core.initialize_carry((B,)), x, start)
    run = jax.jit(core.apply)
    _, h1 = run(params, rand_carry(cell, k[1], B, 16), x, start)
    x2 = x.at[:t0].set(jax.random.normal(k[2], (t0, B, 6)))  # other inputs before t0
    _, h2 = run(params, rand_carry(cell, k[3], B, 16), x2, start)
    _, h0 = run(params, core.initialize_carry((B,)), x, start)
    np.testing.assert_array_equal(h1[t0:, 0], h2[t0:, 0])      # env 0 restarts at t0
    np.testing.assert_array_equal(h1[:, 1], h0[:, 1])          # env 1 starts at 0: the given carry is ignored
    assert not np.allclose(h1[t0:, 2], h2[t0:, 2])             # env 2 never restarts: it remembers
    assert not np.allclose(h1[:, 2], h0[:, 2])


def _flax_cell_as_fused(cell, p, H):
    """Parameters of flax's GRUCell/LSTMCell in our fused layout (kernels [., G*H], biases [G*H])."""
    cat = lambda *xs: jnp.concatenate(xs, axis=-1)  # noqa: E731
    if cell == "gru":
        z = jnp.zeros(H)
        return dict(wi=cat(p["ir"]["kernel"], p["iz"]["kernel"], p["in"]["kernel"]),
                    bi=cat(p["ir"]["bias"], p["iz"]["bias"], p["in"]["bias"]),
                    wh=cat(p["hr"]["kernel"], p["hz"]["kernel"], p["hn"]["kernel"]), bh=cat(z, z, p["hn"]["bias"]))
    g = "ifgo"
    return dict(wi=cat(*(p["i" + a]["kernel"] for a in g)), bi=jnp.zeros(4 * H),
                wh=cat(*(p["h" + a]["kernel"] for a in g)), bh=cat(*(p["h" + a]["bias"] for a in g)))


@pytest.mark.parametrize("cell", CELLS)
def test_core_matches_flax_cells_and_autodiff(cell):
    """Outputs equal flax's GRUCell/LSTMCell scanned step by step (with the carry reset by hand); the hand-written
    backward pass equals JAX's autodiff of that reference."""
    T, B, D, H = 7, 3, 5, 6
    k = jax.random.split(jax.random.PRNGKey(3), 5)
    x = jax.random.normal(k[0], (T, B, D))
    start = jax.random.bernoulli(k[1], 0.3, (T, B))
    carry0 = rand_carry(cell, k[2], B, H)
    w = jax.random.normal(k[3], (T, B, H))
    flax_cell = nn.GRUCell(H) if cell == "gru" else nn.LSTMCell(H)
    fp = flax_cell.init(k[4], carry0, x[0])["params"]
    fused = _flax_cell_as_fused(cell, fp, H)

    def reference(fp, carry0):
        def step(c, inp):
            xt, st = inp
            c = jax.tree.map(lambda a: jnp.where(st[:, None], 0.0, a), c)
            c, y = flax_cell.apply({"params": fp}, c, xt)
            return c, y
        return jax.lax.scan(step, carry0, (x, start))

    def ours(fused, carry0):
        return RecurrentCore(cell, H).apply({"params": fused}, carry0, x, start)

    ref_out, our_out = reference(fp, carry0), jax.jit(ours)(fused, carry0)
    for a, b in zip(jax.tree.leaves(our_out), jax.tree.leaves(ref_out)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)

    def loss(out):
        carry, hs = out
        return (hs * w).sum() + sum(jnp.sin(c).sum() for c in jax.tree.leaves(carry))

    g_ours = jax.grad(lambda f, c: loss(ours(f, c)), argnums=(0, 1))(fused, carry0)
    g_ref = jax.grad(lambda f, c: loss(reference(f, c)), argnums=(0, 1))(fp, carry0)
    g_ref = (_flax_cell_as_fused(cell, g_ref[0], H), g_ref[1])
    if cell == "gru":  # flax's r and z gates have no hidden bias: its gradient is that of the input bias
        g_ref[0]["bh"] = g_ref[0]["bh"].at[:2 * H].set(g_ours[0]["bi"][:2 * H])
    else:  # flax's LSTM input projections have no bias: ours sees the same gradient as the hidden bias
        g_ref[0]["bi"] = g_ref[0]["bh"]
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# -- rollouts, targets and the update ----------------------------------------------------------------------------

def _rollout(cfg, key=jax.random.PRNGKey(4), **env_kwargs):
    env, params = envs.make(cfg.env_name, num_envs=cfg.num_envs, **env_kwargs)
    agent = ppo.PPO(cfg, envs.spec(env, params))
    hp = ppo.hparams(cfg)
    state = agent.init(key, hp)
    obs, env_state = env.reset(key, params)
    ps0 = agent.initial_policy_state(cfg.num_envs)
    policy = jax.tree_util.Partial(agent.act, state.params)
    run = jax.jit(lambda es, o, k, ps: collect(env, params, policy, es, o, k, cfg.num_steps, policy_state=ps))
    env_state, obs, traj, ps = run(env_state, obs, key, ps0)
    # a second rollout continues from the first one's policy state
    env_state, obs, traj2, ps2 = run(env_state, obs, jax.random.fold_in(key, 1), ps)
    return agent, hp, state, (traj, obs, ps), (traj2, ps2), ps0


@pytest.mark.parametrize("cell", CELLS)
def test_rollout_stores_the_state_entering_each_step(cell):
    cfg = ppo.Config(**{**TINY, "network": cell})
    agent, hp, state, (traj, last_obs, ps), (traj2, _), ps0 = _rollout(cfg, max_steps_in_episode=6)
    T, N = cfg.num_steps, cfg.num_envs
    chex.assert_shape(jax.tree.leaves(traj.policy_state.carry), (T, N, cfg.rnn_hidden))
    assert bits(jax.tree.map(lambda x: x[0], traj.policy_state)) == bits(ps0)
    np.testing.assert_array_equal(traj.policy_state.start[1:], traj.done[:-1])  # start[t+1] = done[t]
    assert traj.done.any() and traj.truncated.any()
    assert bits(jax.tree.map(lambda x: x[0], traj2.policy_state)) == bits(ps)   # carried across rollouts
    # the stored carry entering step t+1 is the core's carry after step t (acting from the state entering t)
    net = agent.network
    for t in range(T):
        s = jax.tree.map(lambda x: x[t], traj.policy_state)
        after, _, v = net.apply(state.params, s.carry, traj.obs[t][None], s.start[None])
        nxt = ps.carry if t == T - 1 else jax.tree.map(lambda x: x[t + 1], traj.policy_state.carry)
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(nxt)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v[0], traj.value[t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_targets_bootstrap_truncation_from_the_carry_after_the_step(cell):
    cfg = ppo.Config(**{**TINY, "network": cell})
    agent, hp, state, (traj, last_obs, ps), _, _ = _rollout(cfg, max_steps_in_episode=6)
    adv, ret = jax.jit(agent.targets)(state.params, hp, traj, traj.reward, last_obs, ps)
    # reference, step by step: V(final_obs[t]) from the carry after step t, no reset; V(last_obs) from ps
    net, p = agent.network, state.params
    T, N = traj.reward.shape
    nxt = np.zeros((T, N), np.float32)
    for t in range(T):
        s = jax.tree.map(lambda x: x[t], traj.policy_state)
        after, _, _ = net.apply(p, s.carry, traj.obs[t][None], s.start[None])
        v_final = net.apply(p, after, traj.final_obs[t][None], jnp.zeros((1, N), bool))[2][0]
        v_next = (net.apply(p, ps.carry, last_obs[None], ps.start[None])[2][0] if t == T - 1
                  else traj.value[t + 1])
        nxt[t] = np.where(traj.truncated[t], v_final, v_next)
    adv_ref, ret_ref = gae(traj.reward, traj.value, jnp.asarray(nxt), traj.terminated, traj.done, cfg.gamma,
                           cfg.gae_lambda)
    np.testing.assert_allclose(adv, adv_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ret, ret_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell, bptt_len", [pytest.param("gru", 0, marks=pytest.mark.slow), ("gru", 4),
                                            pytest.param("lstm", 8, marks=pytest.mark.slow)])
def test_update_over_sequences_equals_a_step_by_step_reference(cell, bptt_len):
    """Minibatches of whole env sequences (chunks of bptt_len starting from the stored carries), permuted as
    sequences, the core re-run step by step: same parameters after two epochs."""
    cfg = ppo.Config(**{**TINY, "network": cell, "bptt_len": bptt_len})
    agent, hp, state, (traj, last_obs, ps), _, _ = _rollout(cfg, max_steps_in_episode=6)
    adv, ret = agent.targets(state.params, hp, traj, traj.reward, last_obs, ps)
    key = jax.random.PRNGKey(9)
    new, metrics = jax.jit(agent.update)(state, hp, traj, adv, ret, key)

    T, N = traj.reward.shape
    L = bptt_len or T
    S, M = N * T // L, N * T // L // cfg.num_minibatches
    net, tx = agent.network, agent.optimizer(hp)
    flat, unravel = ravel_pytree(state.params)
    opt_state = state.opt_state

    @jax.jit
    def grad(flat, seqs):  # one compile: the sequence indices are traced, the steps unrolled one by one
        return jax.grad(lambda f: loss(unravel(f), seqs))(flat)

    def loss(params, seqs):
        cols = {k: [] for k in ("logits", "value", "action", "logp", "old_v", "adv", "ret")}
        for j in range(M):
            k, b = seqs[j] // N, seqs[j] % N
            c = jax.tree.map(lambda x: x[k * L, b][None], traj.policy_state.carry)
            for t in k * L + jnp.arange(L):
                c, pi, v = net.apply(params, c, traj.obs[t, b][None, None], traj.policy_state.start[t, b][None, None])
                for name, val in (("logits", pi[0, 0]), ("value", v[0, 0]), ("action", traj.action[t, b]),
                                  ("logp", traj.log_prob[t, b]), ("old_v", traj.value[t, b]), ("adv", adv[t, b]),
                                  ("ret", ret[t, b])):
                    cols[name].append(val)
        c = {name: jnp.stack(v) for name, v in cols.items()}
        dist = distribution(c["logits"], True)
        return ppo_loss(dist.log_prob(c["action"]), c["logp"], c["adv"], dist.entropy(), c["value"], c["old_v"],
                        c["ret"], clip_eps=cfg.clip_eps, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef)[0]

    for ek in jax.random.split(key, cfg.update_epochs):
        perm = np.asarray(ppo.shuffle_indices(ek, S))
        for m in range(cfg.num_minibatches):
            g = grad(flat, perm[m * M:(m + 1) * M])
            updates, opt_state = tx.update(g, opt_state, flat)
            flat = flat + updates
    assert not np.allclose(flat, ravel_pytree(state.params)[0])
    np.testing.assert_allclose(ravel_pytree(new.params)[0], flat, rtol=2e-4, atol=2e-6)
    assert np.isfinite(np.asarray(metrics["loss/value"]))


# -- training: vmap, resume, host loop, config ------------------------------------------------------------------

def test_vmap_over_seeds_equals_separate_runs():
    cfg = ppo.Config(**{**TINY, "network": "gru", "bptt_len": 8})
    keys = jax.random.split(jax.random.PRNGKey(5), 2)
    train = ppo.make_train(cfg)
    batched = jax.jit(jax.vmap(train))(keys)
    for i in range(2):
        one = jax.jit(train)(keys[i])
        for a, b in zip(jax.tree.leaves(one.train_state.params), jax.tree.leaves(batched.train_state.params)):
            np.testing.assert_allclose(a, b[i], rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(one.metrics["loss/value"], batched.metrics["loss/value"][i], rtol=2e-5)
        for a, b in zip(jax.tree.leaves(one.runner_state.policy_state), jax.tree.leaves(
                batched.runner_state.policy_state)):
            np.testing.assert_allclose(a, b[i], rtol=2e-5, atol=1e-5)
    assert not np.allclose(batched.metrics["loss/value"][0], batched.metrics["loss/value"][1])


def test_mlp_runner_state_has_no_policy_state():
    out = jax.jit(ppo.make_train(ppo.Config(**{**TINY, "network": "mlp"})))(jax.random.PRNGKey(0))
    assert out.runner_state.policy_state == ()


@pytest.mark.slow  # longer than the default suite affords; CI's slow pass or nightly: tests/conftest.py
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_resume_of_a_recurrent_run_is_bitwise_exact(cell, tmp_path):
    """Killed after the first chunk's checkpoint, resumed: parameters, policy state (carry), keys and metrics equal
    the uninterrupted run's bit for bit."""
    from jaxrl_pref.runner import run_experiment
    cfg = ppo.Config(**{**TINY, "network": cell, "total_timesteps": 4 * 16 * 5})
    run = dict(num_seeds=2, seed=3, log_every=1, checkpoint_every=2, progress=False, agent="ppo")
    full = run_experiment(ppo.make_trainer, cfg, run_dir=tmp_path / "full", **run)

    def crash_at_3(c, log_fn=None, log_every=1, **kw):
        def log(step, metrics):
            if int(step) == 3:
                raise RuntimeError("simulated crash")
            if log_fn is not None:
                log_fn(step, metrics)
        return ppo.make_trainer(c, log_fn=log, log_every=log_every, **kw)

    with pytest.raises(Exception, match="simulated crash"):
        run_experiment(crash_at_3, cfg, run_dir=tmp_path / "cut", **run)
    resumed = run_experiment(ppo.make_trainer, cfg, run_dir=tmp_path / "cut", resume=True, **run)
    assert resumed.resumed_from == 2 and resumed.finished
    assert np.asarray(jax.tree.leaves(full.state.policy_state.carry)[0]).any()  # a real, non-zero carry
    assert jax.tree.structure(resumed.state) == jax.tree.structure(full.state)
    assert bits(resumed.state) == bits(full.state)
    assert bits(resumed.metrics) == bits(full.metrics)


class DictMLP(nn.Module):
    @nn.compact
    def __call__(self, obs):
        return MLP((16,), "relu")(obs["obs"])


def test_host_loop_carries_the_policy_state():
    cfg = ppo.Config(**{**TINY, "network": "lstm", "num_envs": 4})
    env = JaxHostEnv("CartPole-v1", cfg.num_envs, seed=1, max_steps_in_episode=6)
    tr = ppo.make_trainer(cfg, env=env, network=EncoderActorCritic(2, DictMLP()))
    assert isinstance(tr.agent.network, RecurrentActorCritic) and tr.agent.network.cell == "lstm"
    state = tr.init(jax.random.PRNGKey(0))
    traj, last = tr.collect(state.train_state.params, jax.random.PRNGKey(1))
    T, N = cfg.num_steps, cfg.num_envs
    chex.assert_shape(jax.tree.leaves(traj.policy_state.carry), (T, N, cfg.rnn_hidden))
    assert traj.policy_state.start[0].all()  # the env was just reset
    np.testing.assert_array_equal(traj.policy_state.start[1:], traj.done[:-1])
    net, p = tr.agent.network, state.train_state.params
    for t in range(T):  # stored carry t+1 = the core's carry after step t
        s = jax.tree.map(lambda x: jnp.asarray(x[t]), traj.policy_state)
        after, _, v = net.apply(p, s.carry, jax.tree.map(lambda x: x[t][None], traj.obs), s.start[None])
        nxt = tr.policy_state.carry if t == T - 1 else jax.tree.map(lambda x: x[t + 1], traj.policy_state.carry)
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(nxt)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v[0], traj.value[t], rtol=1e-5, atol=1e-6)
    before = tr.policy_state
    traj2, _ = tr.collect(state.train_state.params, jax.random.PRNGKey(2))
    assert bits(jax.tree.map(lambda x: x[0], traj2.policy_state)) == bits(before)  # carried across rollouts
    state, metrics = tr.run(state, None, 3)
    assert int(state.update_step) == 3 and np.isfinite(metrics["loss/value"]).all()


@pytest.mark.parametrize("bad, field", [
    (dict(network="transformer"), "network"),
    (dict(network="gru", rnn_hidden=0), "rnn_hidden"),
    (dict(network="gru", bptt_len=5), "bptt_len"),
    (dict(network="gru", num_envs=2, num_minibatches=4), "num_minibatches"),
    (dict(network="lstm", num_envs=4, bptt_len=16, num_minibatches=8), "num_minibatches"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ConfigError) as e:
        ppo.Config(**{**TINY, **bad})
    assert e.value.field == field and "Fix:" in str(e.value)
    # the same split is fine for the MLP (minibatches of steps) and with shorter chunks
    ppo.Config(**{**TINY, "num_envs": 2, "num_minibatches": 4})
    ppo.Config(**{**TINY, "network": "gru", "num_envs": 2, "num_minibatches": 4, "bptt_len": 8})


# -- learning -------------------------------------------------------------------------------------------------------

MEMORY_ARGS = ["--env", "MemoryChain-10", "--num-envs", "16", "--num-steps", "64", "--total-timesteps", "102400",
               "--hidden", "64", "--rnn-hidden", "64", "--update-epochs", "4", "--num-minibatches", "4",
               "--learning-rate", "1e-3", "--ent-coef", "0.01", "--num-seeds", "4", "--checkpoint-every", "100",
               "--progress", "False"]


def _cli_success(tmp_path, network: str) -> np.ndarray:
    from jaxrl_pref.logging import read_metrics
    run = tmp_path / network
    p = subprocess.run([sys.executable, "-m", "experiments.ppo", *MEMORY_ARGS, "--network", network, "--run-dir",
                        str(run)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "CI": "true"})
    assert p.returncode == 0, p.stderr[-3000:]
    return np.nanmean(read_metrics(run / "metrics.csv")["episode_success"][:, -10:], axis=1)


@pytest.mark.slow  # longer than the default suite affords; CI's slow pass or nightly: tests/conftest.py
@pytest.mark.parametrize("network", ["gru", "lstm"])
def test_memory_task_needs_a_recurrent_policy(network, tmp_path):
    """MemoryChain-10 from the CLI: the cue (+-1) is shown at the first step only and the answer is asked 10 steps
    later, so a feed-forward policy is right half the time whatever it learns; a recurrent one remembers. 100 updates
    of 16 envs x 64 steps, 4 seeds, success over the last 10 updates. Bounds from the seed spread (``python -m
    benchmarks.learning_spread --task memory_chain_{mlp,gru,lstm} --set-size 8``, 2026-12-03, 2-core CPU): GRU
    0.989-1.000 over 24 seeds, LSTM 0.996-1.000 over 16, MLP 0.464-0.544 over 24 (mean 0.500, std 0.018). The
    recurrent bound (>= 0.9 for 3 of 4 seeds) is 0.09 below the worst seed seen; the MLP bound (< 0.7) is 9 std
    above its mean."""
    rec = _cli_success(tmp_path, network)
    mlp = _cli_success(tmp_path, "mlp")
    print(f"MemoryChain-10 success: {network} {np.round(rec, 3)}, mlp {np.round(mlp, 3)}")
    assert (rec >= 0.9).sum() >= 3, rec
    assert mlp.max() < 0.7, mlp


@pytest.mark.slow
def test_gru_cartpole_reaches_475():
    """The anchor bench's GRU config (4 envs x 128 steps, 500k steps, Dense(128) -> GRU(128) -> heads), 3 seeds: at
    least 2 reach a mean return >= 475 over 10 consecutive updates. Measured (``python -m benchmarks.learning_spread
    --task cartpole_gru --set-size 2 --sets 4 --first-set 0``, ``--first-set 4``, and ``--set-size 3 --sets 1
    --first-set 0``: these seeds; 2026-12-04): the best 10-update mean is 500.0 on all 19 seeds (at a per-seed miss
    rate of 1/21 the check fails w.p. 0.7%). The mean of the *last* 10 updates is 500.0 on 16 of them but 380.3,
    451.4 and 427.9 on three (PPO-GRU on CartPole oscillates): a bound on the end of the run fails on some seeds, and
    fixed seeds do not fix which across machines (float order); the earlier form of this test (3 of 4 seeds >= 475
    at the end) would fail w.p. about 13% at that rate. 3 seeds, not 4: the test took 128-163 s of a CI run."""
    from benchmarks.learning_spread import best_window_mean  # (what the spread above was measured with)
    from benchmarks.ppo_rnn_throughput import BENCH
    out = jax.jit(jax.vmap(ppo.make_train(ppo.Config(**BENCH, network="gru"))))(
        jax.random.split(jax.random.PRNGKey(0), 3))
    ret = np.asarray(out.metrics["episode_return"])
    peak, final = best_window_mean(ret, 10), np.nanmean(ret[:, -10:], axis=1)
    print("CartPole GRU best / final 10-update mean returns", np.round(peak, 1), np.round(final, 1))
    assert (peak >= 475).sum() >= 2, (peak, final)


@pytest.mark.slow
def test_lstm_policy_learns_minihack_room():
    """The NetHack pool with the ONI/Motif-style model (encoders -> LSTM -> heads): MiniHack-Room-5x5, 20 updates of
    16 envs x 32 steps (two env groups), as the MLP test in test_nethack.py; final return > random + 0.4
    (``python -m benchmarks.learning_spread --task minihack_room_lstm --set-size 1 --sets 8 --first-set 0``,
    2026-12-03: final 0.988-0.996 over 8 seeds, margin over random 0.54-0.65; the bound is 0.14 below the worst)."""
    from agents import launch
    from envs.nethack import PoolConfig
    room = "MiniHack-Room-5x5-v0"
    from envs.nethack import random_policy_return
    random_return = random_policy_return(room)
    cfg = ppo.host_config(env_name=room, num_envs=16, num_steps=32, total_timesteps=16 * 32 * 20,
                          learning_rate=1e-3, update_epochs=4, network="lstm")
    pool_cfg = PoolConfig(env_groups=2)
    pool = pool_cfg.make_pool(room, 16, seed=0)
    try:
        tr = launch.host_trainer(cfg, pool, pool_cfg)
        assert isinstance(tr.agent.network, RecurrentActorCritic) and tr.agent.network.cell == "lstm"
        _, m = tr.run(tr.init(jax.random.PRNGKey(0)), None, cfg.num_updates)
    finally:
        pool.close()
    final = float(np.nanmean(m["episode_return"][-5:]))
    print(f"MiniHack-Room-5x5 LSTM: random {random_return:.3f}, PPO-LSTM (last 5 of 20 updates) {final:.3f}")
    assert final > random_return + 0.4, (final, random_return)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["oni", "heron"])
def test_oni_and_heron_run_with_an_lstm_on_minihack(experiment, tmp_path):
    """`python -m experiments.{oni,heron} --env MiniHack-... --network lstm` trains end to end (the recurrent policy
    in the host loop, with ONI's annotator / HERON's reward model) and records the network in config.json."""
    import json
    env = "MiniHack-KeyRoom-Fixed-S5-v0" if experiment == "oni" else "MiniHack-Room-5x5-v0"
    args = ["--env", env, "--network", "lstm", "--rnn-hidden", "64", "--num-envs", "8", "--num-steps", "16",
            "--total-timesteps", str(8 * 16 * 3), "--run-dir", str(tmp_path / "run"), "--progress", "False"]
    p = subprocess.run([sys.executable, "-m", f"experiments.{experiment}", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "CI": "true"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "finished 3 updates" in p.stdout, p.stdout[-2000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["network"] == "lstm"
    # values, not only names: a row per update, finite losses, a policy that changed in every update (approx_kl > 0)
    # and is still stochastic after 3 updates, and the agent's own reward model's numbers
    from jaxrl_pref.logging import read_metrics
    m = read_metrics(tmp_path / "run" / "metrics.csv")
    get = lambda k: np.asarray(m[k], np.float64).reshape(-1)  # noqa: E731
    np.testing.assert_array_equal(get("update"), [1, 2, 3])
    for k in ("loss/policy", "loss/value", "loss/entropy", "loss/approx_kl"):
        assert np.isfinite(get(k)).all(), (k, get(k))
    assert (get("loss/approx_kl") > 0).all() and (get("loss/entropy") > 0.1).all(), m
    if experiment == "oni":
        assert np.isfinite(get("intrinsic/reward")).all() and (get("messages/distinct_seen") >= 1).all()
    else:
        assert np.isfinite(get("reward/heron_loss")[-1])
