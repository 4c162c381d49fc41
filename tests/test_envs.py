"""Env layer: gymnax 1.0 six-value step, terminated vs truncated, auto-reset, episode stats, flattening; the env
registry (what an env is and can do)."""
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from gymnax.environments import spaces

import envs


@struct.dataclass
class CountState:
    pos: jax.Array
    time: jax.Array


@struct.dataclass
class CountParams:
    goal: int = 3
    max_steps_in_episode: int = 5


class Counter:
    """obs = [pos, time]; action 1 moves +1 (reward 1), 0 stays (reward 0); terminates at pos == goal,
    truncates at time == max_steps_in_episode. Reset puts pos at 0 (deterministic)."""

    def reset_env(self, key, params):
        s = CountState(jnp.int32(0), jnp.int32(0))
        return self.obs(s), s

    def obs(self, s):
        return jnp.stack([s.pos, s.time]).astype(jnp.float32)

    def step_env(self, key, s, action, params):
        s = CountState(s.pos + action, s.time + 1)
        return self.obs(s), s, action.astype(jnp.float32), s.pos >= params.goal, {}

    def is_truncated(self, s, params):
        return s.time >= params.max_steps_in_episode

    def observation_space(self, params):
        return spaces.Box(0, 100, (2,), jnp.float32)

    def action_space(self, params):
        return spaces.Discrete(2)


envs.register("Counter-test", lambda **kw: (Counter(), CountParams(**kw)))


def run(env, params, actions, key=jax.random.PRNGKey(0)):
    obs, state = env.reset(key, params)
    out = []
    for a in actions:
        key, k = jax.random.split(key)
        o, state, r, te, tr, info = env.step(k, state, jnp.int32(a), params)
        out.append((obs, o, r, te, tr, info))
        obs = o
    return out


def test_termination_autoreset_and_stats():
    env, params = envs.make("Counter-test")
    steps = run(env, params, [1, 1, 1, 1])
    # step 3 reaches pos 3: terminated, not truncated; obs is the reset obs, final_obs the terminal one
    _, o, r, te, tr, info = steps[2]
    assert bool(te) and not bool(tr)
    np.testing.assert_array_equal(info["final_obs"], [3.0, 3.0])
    np.testing.assert_array_equal(o, [0.0, 0.0])
    assert bool(info["episode_done"]) and float(info["episode_return"]) == 3.0 and int(info["episode_length"]) == 3
    # the next episode starts from scratch
    _, o, r, te, tr, info = steps[3]
    np.testing.assert_array_equal(o, [1.0, 1.0])
    assert not bool(info["episode_done"]) and float(info["episode_return"]) == 0.0


def test_truncation_is_not_termination():
    env, params = envs.make("Counter-test", max_steps_in_episode=4)
    steps = run(env, params, [0, 0, 1, 0, 0])
    flags = [(bool(s[3]), bool(s[4])) for s in steps]
    assert flags == [(False, False)] * 3 + [(False, True), (False, False)]
    _, o, r, te, tr, info = steps[3]
    np.testing.assert_array_equal(info["final_obs"], [1.0, 4.0])  # true last obs, not the reset one
    np.testing.assert_array_equal(o, [0.0, 0.0])
    assert float(info["episode_return"]) == 1.0 and int(info["episode_length"]) == 4


def test_terminated_and_truncated_never_both():
    env, params = envs.make("Counter-test", goal=3, max_steps_in_episode=3)
    _, _, _, te, tr, _ = run(env, params, [1, 1, 1])[2]
    assert bool(te) and not bool(tr)


def test_batched_env_matches_single_envs():
    n = 3
    benv, params = envs.make("CartPole-v1", num_envs=n, max_steps_in_episode=20)
    senv, _ = envs.make("CartPole-v1", max_steps_in_episode=20)
    key = jax.random.PRNGKey(3)
    obs, state = benv.reset(key, params)
    chex.assert_shape(obs, (n, 4))
    chex.assert_type(obs, jnp.float32)
    step = jax.jit(benv.step)
    done_seen = 0
    for t in range(40):
        key, k = jax.random.split(key)
        o, state, r, te, tr, info = step(k, state, jnp.ones(n, jnp.int32), params)
        chex.assert_shape([r, te, tr, info["episode_done"]], (n,))
        chex.assert_shape(info["final_obs"], (n, 4))
        done = np.asarray(te | tr)
        done_seen += done.sum()
        assert not np.any(np.asarray(te & tr))
        # finished envs restart near the origin; others continue from their final obs
        np.testing.assert_array_equal(np.asarray(o)[~done], np.asarray(info["final_obs"])[~done])
        assert np.all(np.abs(np.asarray(o)[done]) <= 0.05)
    assert done_seen > 0
    # per-env semantics equal: vmapped single env over the same split keys gives the same reset
    so, _ = jax.vmap(senv.reset, in_axes=(0, None))(jax.random.split(jax.random.PRNGKey(3), n), params)
    np.testing.assert_allclose(so, benv.reset(jax.random.PRNGKey(3), params)[0])


def test_flatten_minatar():
    """Breakout-MinAtar's [10, 10, 4] boolean channels (paddle, ball, trail, bricks) arrive flattened to float32 in
    gymnax's own order, after the reset and after every step."""
    import gymnax
    env, params = envs.make("Breakout-MinAtar")
    raw, _ = gymnax.make("Breakout-MinAtar")
    obs, state = env.reset(jax.random.PRNGKey(0), params)
    chex.assert_shape(obs, (400,))
    chex.assert_type(obs, jnp.float32)
    assert envs.spec(env, params).obs_shape == (400,)
    np.testing.assert_array_equal(obs, np.asarray(raw.get_obs(state.env_state), np.float32).reshape(-1))
    # one paddle, ball and trail cell; three rows of ten bricks
    np.testing.assert_array_equal(np.asarray(obs).reshape(10, 10, 4).sum(axis=(0, 1)), [1, 1, 1, 30])
    step = jax.jit(env.step)
    for t in range(6):
        obs, state, *_ = step(jax.random.PRNGKey(t), state, jnp.int32(t % 3), params)
        np.testing.assert_array_equal(obs, np.asarray(raw.get_obs(state.env_state), np.float32).reshape(-1))


def test_continuous_spec_and_clip():
    env, params = envs.make("Pendulum-v1")
    spec = envs.spec(env, params)
    assert not spec.discrete and spec.num_actions == 1 and spec.action_low == (-2.0,)
    obs, s = env.reset(jax.random.PRNGKey(0), params)
    _, _, r_big, *_ = env.step(jax.random.PRNGKey(1), s, jnp.array([100.0]), params)
    _, _, r_max, *_ = env.step(jax.random.PRNGKey(1), s, jnp.array([2.0]), params)
    assert r_big.shape == () and float(r_big) == pytest.approx(float(r_max))  # action clipped to the bound


def test_normalizers_keep_true_episode_return():
    env, params = envs.make("CartPole-v1", num_envs=2, normalize_obs=True, normalize_reward=True)
    obs, state = env.reset(jax.random.PRNGKey(0), params)
    rets = []
    for t in range(60):
        obs, state, r, te, tr, info = env.step(jax.random.PRNGKey(t), state, jnp.zeros(2, jnp.int32), params)
        rets += list(np.asarray(info["episode_return"])[np.asarray(info["episode_done"])])
        assert float(jnp.abs(obs).max()) <= 10.0
    # always pushing left ends CartPole after ~10 steps; EpisodeStats sees the raw +1 rewards
    assert rets and all(float(x).is_integer() and 5 <= x <= 20 for x in rets)


def test_unknown_env_and_bad_kwargs():
    with pytest.raises(ValueError, match="Did you mean CartPole-v1"):
        envs.make("CartPol-v1")
    with pytest.raises(ValueError, match="not parameters of CartPole-v1"):
        envs.make("CartPole-v1", gravity_typo=3.0)


# -- the registry: what an env is and can do -------------------------------------------------------------------------
def test_every_registered_env_answers_consistently():
    """Each entry answers the questions the agents ask, and the old lookups give its answers: a host env is the
    NetHack/MiniHack pool with host defaults; a captioned env has a table, a prompt and is wrapped by envs.make; a
    factor env (or one that maps to it) has a FactorSet."""
    from envs import captions, factors, nethack
    from jaxrl_pref.annotation.backends import DEFAULT_TASK, Prompt, task_for_env
    all_entries = envs.registry.entries()
    assert {e.name for e in all_entries if not e.prefix} == set(envs.registry.names())
    assert set(envs.registry.names()) <= set(envs.registered())
    for e in all_entries:
        name = e.name + "Anything-v0" if e.prefix else e.name
        if e.prefix and e.requires is not None and _installed(e, name):
            # its package registered its ids one by one: a name matching only the prefix is unknown
            with pytest.raises(envs.ConfigError, match="unknown environment"):
                envs.entry(name)
            continue
        assert envs.entry(name) is e and (e.prefix or name in envs.registered()), name
        assert callable(e.factory), name
        if e.host:
            assert e.factory is nethack.make and e.defaults == "host" and e.captions is None, name
            assert isinstance(e.factors, factors.FactorSet) and e.factor_env is None, name
        else:
            assert e.defaults == "jax", name
        assert captions.is_captioned(name) == (e.captions is not None), name
        if e.captions is not None:
            assert isinstance(e.captions, captions.Captions) and e.task is not None, name
            if e.requires is None or (not e.prefix and _installed(e, name)):
                tab = captions.caption_table(name)
                assert tab is e.captions.table and tab.texts[0] == "" and len(set(tab.texts)) == len(tab), name
        else:
            with pytest.raises(ValueError, match="no captions"):
                captions.caption_table(name)
        assert task_for_env(name) == (e.task or DEFAULT_TASK), name
        if e.task is not None:
            assert Prompt.load(e.task).version, name
        assert factors.factor_set_for(name) is e.factors, name
        assert factors.factor_env_name(name) == (e.factor_env or name), name
        if e.factor_env is not None:  # the JAX env that reports them in info
            mapped = envs.entry(e.factor_env)
            assert mapped.factors is e.factors and mapped.factor_env == e.factor_env and not mapped.host, name
    # the families the agents rely on
    answers = {n: (envs.entry(n).host, captions.is_captioned(n), getattr(factors.factor_set_for(n), "name", None),
                   task_for_env(n))
               for n in ("CartPole-v1", "DeepSea-5", "Pendulum-v1", "PendulumFactors-v1", "KeyDoor-5",
                         "NetHackScore-v0", "NetHackGold-v0", "MiniHack-Room-5x5-v0", "Craftax-Classic-Pixels-v1")}
    assert answers == {
        "CartPole-v1": (False, False, None, DEFAULT_TASK), "DeepSea-5": (False, False, None, DEFAULT_TASK),
        "Pendulum-v1": (False, False, "Pendulum", DEFAULT_TASK),
        "PendulumFactors-v1": (False, False, "Pendulum", DEFAULT_TASK), "KeyDoor-5": (False, True, None, "keydoor"),
        "NetHackScore-v0": (True, False, "MiniHack", "nethack_score"),
        "NetHackGold-v0": (True, False, "MiniHack", "minihack"),
        "MiniHack-Room-5x5-v0": (True, False, "MiniHack", "minihack"),
        "Craftax-Classic-Pixels-v1": (False, True, None, "craftax")}
    assert factors.factor_envs() == ["MountainCarContinuousFactors-v0", "PendulumFactors-v1"]


def _installed(e, name) -> bool:
    try:
        e.requires(name)
    except ImportError:
        return False
    return True


def test_registry_lookups_import_no_optional_package():
    """Asking a NetHack, MiniHack or Craftax id what it is imports none of nle, minihack, craftax."""
    code = ("import sys, envs; from envs import captions, factors; "
            "assert [envs.entry(n).host for n in ('NetHackScore-v0', 'MiniHack-Room-5x5-v0', 'Craftax-Symbolic-v1')]"
            " == [True, True, False]; assert captions.is_captioned('Craftax-Symbolic-v1'); "
            "assert factors.factor_set_for('MiniHack-Room-5x5-v0') is factors.MINIHACK; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('nle', 'minihack', 'craftax')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_unknown_env_names_the_did_you_mean_fix():
    from envs import captions, factors
    from envs.errors import ConfigError
    from jaxrl_pref.annotation.backends import DEFAULT_TASK, task_for_env
    with pytest.raises(ConfigError) as e:
        envs.entry("CartPol-v1")
    assert e.value.field == "env_name" and str(e.value).startswith("env_name: unknown environment 'CartPol-v1'. Fix: ")
    assert "Did you mean CartPole-v1" in str(e.value) and "envs.registered()" in str(e.value)
    with pytest.raises(ConfigError, match="Did you mean CartPole-v1"):
        envs.check_name("CartPol-v1")
    # the lenient lookups: an unknown id has no captions, no factors and the generic prompt
    assert not captions.is_captioned("CartPol-v1") and factors.factor_set_for("CartPol-v1") is None
    assert factors.factor_env_name("CartPol-v1") == "CartPol-v1" and task_for_env("CartPol-v1") == DEFAULT_TASK


def test_a_captioned_env_is_one_registration(monkeypatch, tmp_path):
    """Registering a new captioned env with its caption function is all it takes: envs.make captions its steps,
    captions/annotator/ONI lookups find its table and prompt (nothing else is edited)."""
    from envs import captions
    from jaxrl_pref.annotation.backends import Prompt, task_for_env
    monkeypatch.setattr(envs.registry, "_ENTRIES", dict(envs.registry._ENTRIES))  # the registration is undone after

    def moved(env, key, state, action, new_state, params):
        return jnp.where(new_state.pos > state.pos, 1, 2).astype(jnp.int32)

    texts = ("", "You step forward.", "You stay put.")
    envs.register("Counter-captioned-test", lambda **kw: (Counter(), CountParams(**kw)),
                  captions=captions.Captions("counter", lambda: texts, moved), task="counter")
    name = "Counter-captioned-test"
    assert captions.is_captioned(name) and captions.caption_table(name).texts == texts
    env, params = envs.make(name)
    steps = run(env, params, [1, 0, 1])
    assert [int(s[-1]["message_id"]) for s in steps] == [1, 2, 1]
    assert task_for_env(name) == "counter"
    (tmp_path / "counter.v1.txt").write_text("## description\nCount to three.\n## system\nJudge.\n"
                                             "## label\n{message}\n## compare\n{message_1} {message_2}\n")
    assert Prompt.load(task_for_env(name), directory=tmp_path).sections["description"] == "Count to three."
    from experiments import oni  # ONI in the jitted loop accepts it and asks the annotator with its prompt
    opts = oni.parse(["--env", name])
    assert not opts.host and opts.annotator.task(name) == "counter"


def test_xminigrid_ids_without_xminigrid_are_a_prefix_entry(monkeypatch):
    """Without xminigrid, every MiniGrid-* id is known by its prefix: captioned, with its prompt, and checking or
    building one names the extra (as before the registry)."""
    from envs import captions, sparse
    from envs.errors import ConfigError
    from jaxrl_pref.annotation.backends import task_for_env
    monkeypatch.setattr(envs.registry, "_ENTRIES",
                        {k: v for k, v in envs.registry._ENTRIES.items() if not k.startswith("MiniGrid-")})
    monkeypatch.setattr(envs.registry, "_PREFIXES", dict(envs.registry._PREFIXES))
    monkeypatch.setattr(sparse, "xminigrid_tasks", lambda: [])
    monkeypatch.setitem(sys.modules, "xminigrid", None)  # `import xminigrid` now fails
    sparse.register_all(envs.register)
    for name, task in (("MiniGrid-DoorKey-8x8", "minigrid_doorkey"), ("MiniGrid-Empty-8x8", "minigrid")):
        e = envs.entry(name)
        assert e.prefix and e.captions is captions.MINIGRID and not e.host and task_for_env(name) == task
        with pytest.raises(ConfigError, match=r"xminigrid, which is not installed. Fix: pip install -e '\.\[grid\]'"):
            envs.check_name(name)
        with pytest.raises(ModuleNotFoundError, match="xminigrid"):
            envs.make(name)
    assert not captions.is_captioned("XLand-MiniGrid-R1-9x9")
