"""Guards against overoptimising a learned reward: reward-model ensembles (jaxrl_pref/rewards/ensemble.py), RPO's
penalty (jaxrl_pref/losses.py rpo_penalty, in the online reward models' updates), their options on ONI and Motif."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import oni
from envs.messages import encode_messages
from jaxrl_pref.config import ConfigError
from jaxrl_pref.losses import rpo_penalty
from jaxrl_pref.rewards.classification import Classification, MessageNet
from jaxrl_pref.rewards.ensemble import Ensemble, aggregate, bootstrap_masks
from jaxrl_pref.rewards.motif import FrozenRanking
from jaxrl_pref.rewards.ranking import Ranking

MSGS = ["You pick up the key.", "The door opens.", "It's a wall.", "You pull the lever."]


def test_aggregations_equal_their_formulas():
    s = jnp.array([[0.1, 2.0, -1.0], [0.5, 1.0, -3.0], [0.3, 0.0, -2.0]])  # 3 members x 3 messages
    np.testing.assert_allclose(aggregate(s, "mean"), [0.3, 1.0, -2.0], rtol=1e-6)
    np.testing.assert_allclose(aggregate(s, "min"), [0.1, 0.0, -3.0])
    std = np.sqrt(((np.asarray(s) - np.asarray(s).mean(0)) ** 2).mean(0))
    np.testing.assert_allclose(aggregate(s, "lcb", lam=2.0), np.asarray(s).mean(0) - 2.0 * std, rtol=1e-5)
    np.testing.assert_allclose(aggregate(s, "lcb", lam=0.0), aggregate(s, "mean"))
    with pytest.raises(ValueError, match="unknown aggregation 'max'"):
        aggregate(s, "max")


def test_bootstrap_masks_keep_about_the_fraction_and_differ_by_member():
    m = np.asarray(bootstrap_masks(5, 4000, 0.8))
    assert m.shape == (5, 4000) and m.dtype == bool
    assert np.allclose(m.mean(1), 0.8, atol=0.03)
    assert len({r.tobytes() for r in m}) == 5
    assert np.asarray(bootstrap_masks(3, 10, 1.0)).all()


def _labelled(model, texts, labels):
    return {**jax.jit(model.init)(jax.random.PRNGKey(0)), "data": model.buffer_from(encode_messages(texts), labels)}


def test_classification_ensemble_members_differ_train_in_one_vmap_and_score_as_aggregated():
    member = Classification(capacity=8, steps=5, batch_size=8)
    ens = Ensemble(member, 4, "min", keep=0.75)
    state = jax.jit(ens.init)(jax.random.PRNGKey(0))
    chex.assert_shape(state["data"]["bytes"], (8, member.message_len))  # one buffer, not one per member
    emb = state["params"]["params"]["Embed_0"]["embedding"]
    chex.assert_shape(emb, (4, *member.net.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 256), jnp.uint8))["params"]["Embed_0"]["embedding"].shape))
    assert not np.allclose(emb[0], emb[1])  # differently initialised
    state = {**state, "data": member.buffer_from(encode_messages(MSGS), np.array([1, 1, 0, 1], np.float32))}
    state, metrics = jax.jit(ens.update)(state, jax.random.PRNGKey(1))
    assert set(metrics) >= {"reward_model/loss", "reward_model/train_acc"}
    msgs = jnp.asarray(encode_messages(MSGS))
    per = jax.jit(ens.member_scores)(state, msgs, None)
    chex.assert_shape(per, (4, len(MSGS)))
    assert float(jnp.abs(per[0] - per[1]).max()) > 1e-4  # members differ after training
    np.testing.assert_allclose(jax.jit(ens.score)(state, msgs, None), per.min(0), rtol=1e-6)
    caps = jax.jit(ens.caption_scores)(state, msgs, None)
    np.testing.assert_allclose(caps, jax.jit(ens.member_caption_scores)(state, msgs, None).min(0), rtol=1e-6)
    # each member is the model it wraps: member i's slice scores as a lone Classification with those parameters
    one = {k: (v if k == "data" else jax.tree.map(lambda x: x[2], v)) for k, v in state.items()}
    np.testing.assert_allclose(member.score(one, msgs, None), per[2], rtol=1e-5)


def test_frozen_ensemble_scores_each_member_with_its_own_normalisation():
    net = MessageNet()
    params = [net.init(jax.random.PRNGKey(i), jnp.zeros((1, 256), jnp.uint8)) for i in range(3)]
    mean, std = jnp.array([0.1, -0.2, 0.3]), jnp.array([1.0, 2.0, 0.5])
    stacked = {"params": jax.tree.map(lambda *x: jnp.stack(x), *params), "mean": mean, "std": std}
    ens = Ensemble(FrozenRanking(params[0], 0.1, 1.0), 3, "lcb", lam=0.5, states=stacked)
    state = ens.init(jax.random.PRNGKey(0))
    msgs = jnp.asarray(encode_messages(MSGS))
    z = np.stack([(np.asarray(net.apply(p, msgs)) - m) / s for p, m, s in zip(params, np.asarray(mean), np.asarray(std))])
    np.testing.assert_allclose(ens.score(state, msgs, None), z.mean(0) - 0.5 * z.std(0), rtol=1e-5, atol=1e-6)
    same, _ = jax.jit(ens.update)(state, jax.random.PRNGKey(1))
    chex.assert_trees_all_equal(same, state)  # frozen


def test_rpo_penalty_and_its_gradient():
    rp, wp = jnp.array([1.0, 3.0]), jnp.array([1.0, 3.0])
    rr, wr = jnp.array([2.0, 0.0, 4.0]), jnp.array([1.0, 1.0, 0.0])
    assert float(rpo_penalty(rp, wp, rr, wr)) == pytest.approx((1 + 9) / 4 - 1.0)
    g_p, g_r = jax.grad(rpo_penalty, argnums=(0, 2))(rp, wp, rr, wr)
    np.testing.assert_allclose(g_p, wp / wp.sum())  # up the policy's rewards by their weights
    np.testing.assert_allclose(g_r, -wr / wr.sum())  # down the reference's
    # through a model: the penalty's parameter gradient is E_policy[grad r] - E_ref[grad r]
    net = MessageNet()
    params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 256), jnp.uint8))
    pol, ref = jnp.asarray(encode_messages(MSGS[3:])), jnp.asarray(encode_messages(MSGS[:3]))
    g = jax.grad(lambda p: rpo_penalty(net.apply(p, pol), jnp.ones(1), net.apply(p, ref), jnp.ones(3)))(params)
    want = jax.tree.map(lambda a, b: a - b, jax.grad(lambda p: net.apply(p, pol).mean())(params),
                        jax.grad(lambda p: net.apply(p, ref).mean())(params))
    chex.assert_trees_all_close(g, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["classification", "ranking"])
def test_rpo_lowers_the_reward_of_what_the_policy_farms(kind):
    """Every labelled message alike (all helpful / all tied against the empty message... preferred over it); the
    policy produces only the lever's caption: with the penalty its score ends below the others', without it not."""
    texts = MSGS
    policy = {"msgs": jnp.asarray(encode_messages([MSGS[3]] * 8)), "weight": jnp.ones(8)}

    def train(coef):
        if kind == "classification":
            m = Classification(capacity=4, steps=200, batch_size=4, rpo_coef=coef)
            state = _labelled(m, texts, np.ones(4, np.float32))
        else:
            m = Ranking(capacity=4, steps=200, batch_size=4, rpo_coef=coef)
            a = encode_messages(texts)
            state = {**jax.jit(m.init)(jax.random.PRNGKey(0)),
                     "data": m.buffer_from(a, encode_messages([""] * 4), np.ones(4, np.float32))}
        state, metrics = jax.jit(lambda s, k: m.update(s, k, policy=policy))(state, jax.random.PRNGKey(1))
        assert ("reward_model/rpo_penalty" in metrics) == (coef > 0)
        return np.asarray(m.score(state, jnp.asarray(encode_messages(texts)), None))

    plain, guarded = train(0.0), train(1.0)
    assert plain[3] > 0.5 * plain[:3].min()  # fitted like the others without the penalty
    assert guarded[3] < guarded[:3].min()  # the farmed message pushed below every other labelled one


def test_oni_options_check_the_guards():
    with pytest.raises(ConfigError, match="rm_ensemble.*retrieval"):
        oni.ONIOptions(reward_model="retrieval", rm_ensemble=3)
    with pytest.raises(ConfigError, match="rpo_coef.*Motif freezes"):
        oni.ONIOptions(method="motif", reward_model="ranking", rpo_coef=0.1)
    with pytest.raises(ConfigError, match="rm_aggregation"):
        oni.ONIOptions(rm_aggregation="max")
    with pytest.raises(ConfigError, match="rm_bootstrap"):
        oni.ONIOptions(rm_bootstrap=0.0)
    assert isinstance(oni.make_model(oni.ONIOptions(rm_ensemble=3, rm_aggregation="lcb")), Ensemble)
    assert isinstance(oni.make_model(oni.ONIOptions()), Classification)


@pytest.mark.slow  # two short runs and a resume
def test_captioned_oni_with_an_ensemble_and_rpo_resumes_bitwise_exactly(tmp_path):
    from tests.test_oni_captioned import _run
    from tests.test_runner import assert_same_run
    kw = dict(rm_ensemble=3, rm_aggregation="min", rm_bootstrap=0.8, rpo_coef=0.5)
    full, _ = _run(tmp_path / "full", "classification", {}, oni_kw=kw)
    emb = full.state.reward_state["model"]["model"]["params"]["params"]["Embed_0"]["embedding"]
    assert emb.shape[:2] == (2, 3)  # seeds x members
    assert "reward_model/rpo_penalty" in full.metrics
    store = {}
    part, _ = _run(tmp_path / "resumed", "classification", store, stop_after=4, oni_kw=kw)
    rest, _ = _run(tmp_path / "resumed", "classification", store, resume=True, oni_kw=kw)
    assert rest.resumed_from == 4
    assert_same_run(full, rest)


# -- HERON: the trajectory reward model's ensemble and penalty ---------------------------------------------------------
def test_heron_ensemble_trains_members_apart_and_pays_their_aggregate():
    from agents import heron
    from jaxrl_pref.rollout import Transition
    from tests.test_heron import TINY
    cfg = heron.Config(env_name="MountainCarContinuous-v0", factors=("goal", "energy"), margins=(0.0, 1.0),
                       rm_ensemble=3, rm_aggregation="lcb", rm_lcb_coef=0.5, rpo_coef=0.1, **TINY)
    out = jax.jit(heron.make_train(cfg))(jax.random.PRNGKey(0))
    rs, m = out.runner_state.reward_state, jax.tree.map(np.asarray, out.metrics)
    leaf = jax.tree.leaves(rs.params)[0]
    assert leaf.shape[0] == 3 and not np.allclose(leaf[0], leaf[1])
    chex.assert_shape([rs.mean, rs.var], (3,))
    assert np.isfinite(m["reward/heron_loss"]).all() and "reward/heron_rpo_penalty" in m
    model = heron.reward_model(cfg)
    obs, z = jnp.zeros((2, 3, 2)), jnp.zeros((2, 3))
    traj = Transition(obs, z[..., None], z, z, z, z.astype(bool), z.astype(bool), obs, {"factors": jnp.ones((2, 3, 3))})
    r, metrics = model(rs, traj)
    raw = np.stack([np.asarray(model.apply(jax.tree.map(lambda x: x[i], rs.params), obs, jnp.ones((2, 3, 3))))
                    for i in range(3)])
    z_k = (raw - np.asarray(rs.mean)[:, None, None]) / np.sqrt(np.asarray(rs.var)[:, None, None] + 1e-8)
    np.testing.assert_allclose(np.asarray(r), z_k.mean(0) - 0.5 * z_k.std(0), rtol=1e-4, atol=1e-5)
    assert float(metrics["reward/heron_ensemble_std"]) > 0


def test_heron_options_check_the_guards():
    from jaxrl_pref.rewards.preference import PreferenceConfig
    with pytest.raises(ConfigError, match="rm_aggregation"):
        PreferenceConfig(rm_aggregation="median")
    with pytest.raises(ConfigError, match="rm_ensemble"):
        PreferenceConfig(rm_ensemble=0)
    with pytest.raises(ConfigError, match="rpo_coef"):
        PreferenceConfig(rpo_coef=-1.0)


# -- Motif: an ensemble of frozen models fitted offline -----------------------------------------------------------------
def test_motif_ensemble_members_fit_on_bootstrap_resamples_reused_and_thresholded_on_the_aggregate(tmp_path):
    import dataclasses

    from agents import motif
    from jaxrl_pref.rewards import motif as rm
    from tests.test_motif import OPTS, ScriptedClient, TEXTS, _dataset
    import contextlib
    opts = dataclasses.replace(OPTS, motif_pairs=80, motif_epochs=25)
    client = ScriptedClient(per_poll=50)
    p = motif.prepare(opts, "FakeEnv", tmp_path, collect=_dataset, connect=lambda: contextlib.nullcontext(client),
                      say=lambda s: None)
    said = []
    e = motif.prepare_ensemble(p, opts, 3, "min", 1.0, seed=0, say=said.append)
    assert isinstance(e.model, Ensemble) and e.model.size == 3
    state = e.model.init(None)
    chex.assert_shape([state["mean"], state["std"]], (3,))
    assert [(tmp_path / "ensemble" / str(i) / rm.MODEL_FILE).exists() for i in (1, 2)] == [True, True]
    texts = [t for t in TEXTS if t]
    msgs = jnp.asarray(encode_messages(texts))
    per = np.asarray(e.model.member_scores(state, msgs, None))
    assert not np.allclose(per[0], per[1])  # another resample, another initialisation
    np.testing.assert_allclose(per[0], np.asarray(p.model.score(p.model.init(None), msgs, None)), rtol=1e-5, atol=1e-5)
    z = per.min(0)
    w = _dataset().counts[:len(texts)]
    assert w[z <= e.threshold + 1e-6].sum() >= opts.motif_quantile * w.sum()  # the aggregate's quantile
    assert e.sha != p.sha and any("Motif ensemble of 3 (min)" in s for s in said)
    again = motif.prepare_ensemble(p, opts, 3, "min", 1.0, seed=0, say=said.append)  # members reused, not refitted
    assert again.sha == e.sha and sum("reusing the ensemble member" in s for s in said) == 2


def test_host_loop_oni_trains_an_ensemble_with_the_penalty_on_sampled_rollout_messages():
    """The NetHack-path form (:class:`~jaxrl_pref.rewards.shaping.ShapedIntrinsic`): the penalty's policy messages
    are a sample of the rollout's steps; labels arrive through the host hook into the ensemble's one buffer."""
    from agents.testing import oni_bandit_run
    from jaxrl_pref.testing import InstantClient
    client = InstantClient(labels={"You find a hidden passage.": 1.0})
    _, metrics, tr = oni_bandit_run("classification", client, updates=6, rm_ensemble=3, rm_aggregation="lcb",
                                    rpo_coef=0.5)
    assert np.isfinite(metrics["reward_model/rpo_penalty"]).all()
    assert metrics["labels/labeled"][-1] == 4
    assert isinstance(tr.oni_loop.model, Ensemble) and tr.oni_loop.model.size == 3


def test_hack_study_arms_and_table():
    """experiments.hack_study: every arm at one reward scale on the same seed keys, each guard compared with its own
    method's no-guard arm (Fisher's exact test, Holm-adjusted over the table)."""
    from experiments import hack_study as hs
    from jaxrl_pref import stats
    cfg = hs.HackStudyConfig(num_seeds=10)
    for arm, (family, base, _) in hs.ARMS.items():
        argv = hs.run_of(cfg, arm).argv
        assert argv[argv.index("--seed") + 1] == "4000" and argv[argv.index("--num-seeds") + 1] == "10"
        if family != "ppo":
            assert argv[argv.index("--ext-coef") + 1] == "1" and argv[argv.index("--int-coef") + 1] == "0.04"
        assert base == "" or hs.ARMS[base][0] == family
    rpo = hs.run_of(cfg, "oni-rpo").argv
    assert rpo[rpo.index("--rpo-coef") + 1] == "0.5" and rpo[rpo.index("--count-beta") + 1] == "0"
    with pytest.raises(ConfigError, match="arms"):
        hs.HackStudyConfig(arms=("motif-magic",))

    def res(hacks, solved, n=10):
        return {"hacks": [i < hacks for i in range(n)], "solved": [i < solved for i in range(n)],
                "late_hack": [0.5] * n, "late_success": [0.0] * n}
    lines = hs.table({"oni-noguard": res(10, 0), "oni-decay": res(4, 3), "oni-rpo": res(10, 0)})
    assert lines[2].startswith("| oni-noguard | 10/10 [0.69, 1.00]")
    p = stats.fisher_exact(4, 10, 10, 10)
    adj = stats.holm([p, stats.fisher_exact(3, 10, 0, 10), 1.0, 1.0])
    assert f"{p:.3g} ({adj[0]:.3g})" in lines[3] and "| 1 (1) | 1 (1) |" in lines[4]
