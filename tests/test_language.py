"""Language in the policy (``--language minilm``, ``--alignment-coef``; jaxrl_pref/language.py, docs/language.md):
the fused input's shapes, each distinct message embedded once, the alignment reward's formula, bad options refused
at start, and a short vmapped run that trains, checkpoints and resumes exactly."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import ppo
from envs import captions
from envs.messages import encode_messages
from jaxrl_pref import language
from jaxrl_pref.config import ConfigError
from jaxrl_pref.networks import EncoderActorCritic, NetHackEncoder
from jaxrl_pref.rewards import IdentityReward
from jaxrl_pref.rewards.transform import update_and_reward
from jaxrl_pref.rollout import Transition

KD = captions.caption_table("KeyDoor-5")


def fake_embedder(dim=8):
    """A counting stand-in for MiniLM: a text's embedding is a fixed unit vector drawn from its hash."""
    def encode(texts):
        rows = [np.random.default_rng(abs(hash(t)) % 2**32).normal(size=dim) for t in texts]
        return np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32)
    return language.TextEmbedder(encode, dim)


def test_fusion_input_shapes():
    """Captioned task: the observation gains one entry (the message id, 0 after a reset) and the torso reads the obs
    next to a language_dim projection of the id's row; host: the encoder's features next to the projection."""
    cfg = ppo.Config(env_name="KeyDoor-5", num_envs=4, num_steps=8, total_timesteps=64, language="minilm",
                     language_dim=12, hidden=(16,))
    env, params = ppo.make_env(cfg)
    n = env._env.observation_space(params).shape[0]  # the wrapped env's (plain) observation

    @jax.jit
    def reset_step(key):
        obs, state = env.reset(key, params)
        return obs, env.step(key, state, jnp.zeros(4, jnp.int32), params)

    obs, (obs2, _, _, _, _, info) = reset_step(jax.random.PRNGKey(0))  # one compile for both
    chex.assert_shape(obs, (4, n + 1))
    assert (np.asarray(obs)[:, -1] == 0).all()
    np.testing.assert_array_equal(obs2[:, -1], info["message_id"])  # no episode ended on the first step
    chex.assert_shape(info["final_obs"], (4, n + 1))

    def init_apply(net, x):
        return jax.jit(lambda k: (lambda p: (p, net.apply(p, x)))(net.init(k, x)))(jax.random.PRNGKey(0))

    table = language._Const(np.eye(len(KD), 6, dtype=np.float32))
    p, (pi, v) = init_apply(language.LanguageActorCritic(4, table, hidden=(16,), language_dim=12), obs2)
    chex.assert_shape(p["params"]["language_proj"]["kernel"], (6, 12))
    chex.assert_shape(p["params"]["ac"]["actor_torso"]["Dense_0"]["kernel"], (n + 12, 16))
    chex.assert_shape((pi, v), ((4, 4), (4,)))
    # host: NetHack encoder features (64) + projection (12); the encoder ignores the language key
    enc = language.LanguageEncoder(NetHackEncoder(features=64, keys=("blstats",)), 12)
    o = {"blstats": jnp.zeros((3, 27)), "message": jnp.zeros((3, 256), jnp.uint8), "language": jnp.ones((3, 6))}
    hp, (pi, v) = init_apply(EncoderActorCritic(5, enc), o)
    chex.assert_shape((pi, v), ((3, 5), (3,)))
    chex.assert_shape(hp["params"]["encoder"]["language_proj"]["kernel"], (6, 12))
    chex.assert_shape(hp["params"]["Dense_0"]["kernel"], (64 + 12, 5))  # the actor head reads both


def test_embeddings_computed_once_per_distinct_message(monkeypatch):
    """Caption tables: embedded once per process (a second trainer reuses the table); host: one embedding per
    distinct message, the empty one never embedded (zeros)."""
    emb = fake_embedder()
    monkeypatch.setattr(language, "default_embedder", lambda: emb)
    language._caption_embeddings.cache_clear()
    try:
        t1 = language.caption_embeddings("KeyDoor-5")
        t2 = language.caption_embeddings("KeyDoor-9")  # the same texts: the same table
        assert t1 is t2 and emb.calls == 1 and emb.texts == len(KD) - 1
        chex.assert_shape(t1, (len(KD), 8))
        assert (t1[0] == 0).all()
        np.testing.assert_allclose(np.linalg.norm(t1[1:], axis=1), 1, rtol=1e-5)
    finally:
        language._caption_embeddings.cache_clear()
    cache = language.MessageEmbeddingCache(fake_embedder())
    msgs = encode_messages(["It's a wall.", "", "You see a key.", "It's a wall."])
    out = cache(msgs)
    chex.assert_shape(out, (4, 8))
    assert cache.embedder.texts == 2 and (out[1] == 0).all()
    np.testing.assert_array_equal(out[0], out[3])
    out2 = cache(np.stack([msgs, msgs[::-1]]))  # [2, 4, 256]: nothing new
    chex.assert_shape(out2, (2, 4, 8))
    assert cache.embedder.texts == 2 and cache.embedder.calls == 1
    np.testing.assert_array_equal(out2[0], out)


def test_alignment_reward_is_the_cosine_with_the_goal():
    """r + coef * cos(e(message), e(goal)) per step; 0 for the empty message; the same on the host path (from the
    final observation's embedding)."""
    emb = fake_embedder()
    E = emb.embed(KD.texts)
    goal = emb.embed(["Reach the goal."])[0]
    ids = jnp.array([[0, 4], [2, 6], [5, 0]], jnp.int32)
    r = jnp.array([[0, 0], [0, 1], [0, 0]], jnp.float32)
    z = jnp.zeros(ids.shape)
    traj = Transition(z, ids, z, z, r, z.astype(bool), z.astype(bool), {"language": jnp.asarray(E)[ids]},
                      {"message_id": ids})
    want = np.asarray(r) + 0.1 * np.array([[0 if i == 0 else E[i] @ goal / (np.linalg.norm(E[i]) *
                                                                           np.linalg.norm(goal)) for i in row]
                                           for row in np.asarray(ids)])
    for table in (E @ goal, None):  # captioned task, host
        t = language.LanguageAlignment(IdentityReward(), 0.1, goal, table)
        s = t.init(jax.random.PRNGKey(0), None)
        _, got, m = update_and_reward(t, s, traj, jax.random.PRNGKey(1))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert got[0, 0] == 0 and got[2, 1] == 0
        np.testing.assert_allclose(t(s, traj)[0], want, rtol=1e-5, atol=1e-6)
        assert "reward/alignment" in m


def test_bad_language_options_fail_fast(tmp_path, capsys):
    """An unknown value, an env without messages, a recurrent core on a JAX task, the alignment stream on an env
    without messages: refused at start (ConfigError / exit 2) naming the option and the fix."""
    from experiments import ppo as exp
    with pytest.raises(ConfigError, match="language.*use one of none, minilm"):
        ppo.Config(env_name="KeyDoor-5", language="clip")
    with pytest.raises(ConfigError, match="language.*not a captioned task.*drop --language"):
        ppo.check_env(ppo.Config(env_name="CartPole-v1", language="minilm"))
    with pytest.raises(ConfigError, match="network.*--network mlp"):
        ppo.check_env(ppo.Config(env_name="KeyDoor-5", language="minilm", network="gru"))
    for argv in (["--env", "DeepSea-10", "--language", "minilm"], ["--env", "CartPole-v1", "--alignment-coef", "0.1"],
                 ["--env", "KeyDoor-5", "--alignment-goal", "Reach the goal."]):
        with pytest.raises(SystemExit) as e:
            exp.parse([*argv, "--run-dir", str(tmp_path / "x")])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--language" in err and "alignment_coef" in err and "alignment_goal" in err
    plain = exp.parse(["--env", "KeyDoor-5", "--run-dir", str(tmp_path / "y")])
    assert not any(f.startswith("alignment_") for f in plain.config.__dataclass_fields__)  # saved only when set


SMALL = ppo.Config(env_name="KeyDoor-5", num_envs=4, num_steps=16, total_timesteps=4 * 64, hidden=(16,),
                   update_epochs=1, num_minibatches=2, language="minilm", language_dim=8)


def _run(run_dir, **kw):
    from jaxrl_pref.runner import run_experiment
    reward = language.make_alignment(language.AlignmentConfig(0.05), "KeyDoor-5", host=False)
    make = lambda c, log_fn=None, log_every=1: ppo.make_trainer(c, reward, log_fn, log_every)  # noqa: E731
    return run_experiment(make, SMALL, run_dir=run_dir, num_seeds=2, seed=0, log_every=1, checkpoint_every=2,
                          progress=False, tensorboard=False, plot=False, **kw)


def test_short_run_with_language_trains_end_to_end(tmp_path):
    """2 vmapped seeds of PPO with the fused MiniLM embedding and the alignment stream on KeyDoor-5, 2 updates: the
    losses are finite, the alignment reward is logged per seed, and the projection learns."""
    res = _run(tmp_path / "run", num_updates=2)
    assert np.isfinite(res.metrics["loss/value"]).all()
    a = np.asarray(res.metrics["reward/alignment"])
    chex.assert_shape(a, (2, 2))
    assert (a > 0).all()  # KeyDoor's captions all point somewhat towards its goal statement
    w = res.state.train_state.params["params"]["language_proj"]["kernel"]
    chex.assert_shape(w, (2, language.EMBED_DIM, 8))  # per seed
    assert not np.allclose(w[0], w[1])


@pytest.mark.slow  # three compiles of the trainer: CI's slow pass or nightly (tests/conftest.py)
def test_language_run_resumes_exactly(tmp_path):
    """A run stopped after 2 updates and resumed ends bitwise equal to an uninterrupted one (nothing of the option
    lives outside the checkpoint: the tables are constants, the host cache a function of the message)."""
    from tests.test_runner import assert_same_run
    full = _run(tmp_path / "full")
    half = _run(tmp_path / "cut", stop_after=2)
    assert_same_run(full, _run(tmp_path / "cut", resume=True))
    w = full.state.train_state.params["params"]["language_proj"]["kernel"]
    assert not np.allclose(w, half.state.train_state.params["params"]["language_proj"]["kernel"])  # it learns
