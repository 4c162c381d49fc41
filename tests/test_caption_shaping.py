"""Hand-written caption shaping (``experiments.ppo --shaping-captions``, jaxrl_pref/rewards/caption_shaping.py): the
sparse study's ``shaping`` arm, the upper bound of its LLM-feedback arms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs.captions import KEYDOOR_TEXTS
from jaxrl_pref.config import ConfigError
from jaxrl_pref.rewards import IdentityReward
from jaxrl_pref.rewards.caption_shaping import CaptionShaping, CaptionShapingConfig, make_caption_shaping
from jaxrl_pref.rewards.transform import update_and_reward
from jaxrl_pref.rollout import Transition

KEY, DOOR, WALL, GOAL = (KEYDOOR_TEXTS.index(t) for t in ("You pick up the key.", "The door opens.", "It's a wall.",
                                                            "You reach the goal."))


def traj_of(ids, done, reward=None):
    """A rollout of ``[T, N]`` caption ids and done flags (env reward ``reward``, else 0)."""
    ids = jnp.asarray(ids, jnp.int32)
    z = jnp.zeros(ids.shape, jnp.float32)
    d = jnp.asarray(done, bool)
    r = z if reward is None else jnp.asarray(reward, jnp.float32)
    return Transition(z, ids, z, z, r, d, jnp.zeros_like(d), z, {"message_id": ids})


# Two envs over two rollouts of 4 steps. Env 0: key, wall, door, door | door, goal (episode ends), key, door.
# Env 1: door (no key yet does not matter: a caption is a caption), key, key, 0 (episode ends) | key, 0, 0, 0.
IDS = [np.array([[KEY, DOOR], [WALL, KEY], [DOOR, KEY], [DOOR, 0]]),
       np.array([[DOOR, KEY], [GOAL, 0], [KEY, 0], [DOOR, 0]])]
DONE = [np.array([[0, 0], [0, 0], [0, 0], [0, 1]]), np.array([[0, 0], [1, 0], [0, 0], [0, 0]])]
# once per episode: each of key and door pays +1 at its first step in an episode; an episode's paid set carries
# across rollouts (env 0's door is paid at step 2 only, again after its episode ends at step 1 of rollout 2)
ONCE = [np.array([[1, 1], [0, 1], [1, 0], [0, 0]]), np.array([[0, 1], [0, 0], [1, 0], [1, 0]])]
EVERY = [np.array([[1, 1], [0, 1], [1, 1], [1, 0]]), np.array([[1, 1], [0, 0], [1, 0], [1, 0]])]


@pytest.mark.parametrize("once", [True, False])
def test_caption_shaping_pays_exactly_the_stated_rewards(once):
    """+reward on the key and door captions, once per episode each (or at every occurrence), on top of the env
    reward; nothing for other captions or the empty message; fused and unfused calls agree."""
    t = CaptionShaping(IdentityReward(), [KEY, DOOR], num_envs=2, reward=2.5, once=once)
    state = t.init(jax.random.PRNGKey(0), None)
    state2 = state
    env_r = np.array([[0, 0], [0, 0], [0, 0], [0, 0.25]])
    for i, (ids, done) in enumerate(zip(IDS, DONE)):
        traj = traj_of(ids, done, env_r)
        want = env_r + 2.5 * (ONCE if once else EVERY)[i]
        state, reward, m = update_and_reward(t, state, traj, jax.random.PRNGKey(1))
        np.testing.assert_allclose(np.asarray(reward), want, err_msg=f"rollout {i}")
        np.testing.assert_allclose(float(m["reward/shaping"]), (want - env_r).mean(), rtol=1e-6)
        state2, _ = t.update(state2, traj, jax.random.PRNGKey(1))  # the seam's fallback: update then call
        reward2, _ = t(state2, traj)
        np.testing.assert_allclose(np.asarray(reward2), want)
    # after rollout 2, in the episodes under way: env 0 paid key and door (steps 2, 3), env 1 the key (step 0)
    np.testing.assert_array_equal(np.asarray(state["paid"]), [[True, True], [True, False]])
    np.testing.assert_array_equal(np.asarray(state["paid"]), np.asarray(state2["paid"]))


def test_caption_shaping_is_vmapped_and_jitted_over_seeds():
    t = CaptionShaping(IdentityReward(), [KEY, DOOR], num_envs=2)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    state = jax.vmap(lambda k: t.init(k, None))(keys)
    step = jax.jit(jax.vmap(lambda s, tr, k: update_and_reward(t, s, tr, k)[:2], in_axes=(0, None, 0)))
    for ids, done, want in zip(IDS, DONE, ONCE):
        state, reward = step(state, traj_of(ids, done), keys)
        np.testing.assert_allclose(np.asarray(reward), np.broadcast_to(want, (3, 4, 2)))


def test_caption_shaping_options_name_the_tasks_captions():
    cfg = CaptionShapingConfig(shaping_captions=("You pick up the key.", "The door opens."))
    cfg.check("KeyDoor-9", host=False)
    t = make_caption_shaping(cfg, "KeyDoor-9", num_envs=4)
    assert isinstance(t, CaptionShaping) and t.ids == (KEY, DOOR) and t.once and t.reward == 1.0
    assert make_caption_shaping(CaptionShapingConfig(), "KeyDoor-9", 4) is None  # no captions: no shaping
    CaptionShapingConfig(shaping_captions=("You pick up a yellow key.", "You unlock the yellow door.")).check(
        "MiniGrid-DoorKey-16x16", host=False)
    with pytest.raises(ConfigError, match="is not a caption of KeyDoor-9.*You pick up the key"):
        CaptionShapingConfig(shaping_captions=("You pick up a key.",)).check("KeyDoor-9", host=False)
    with pytest.raises(ConfigError, match="needs a captioned JAX task"):
        cfg.check("DeepSea-10", host=False)
    with pytest.raises(ConfigError, match="NetHack/MiniHack pool env"):
        cfg.check("MiniHack-KeyRoom-Fixed-S5-v0", host=True)
    for bad in (("The door opens.", "The door opens."), ("",)):
        with pytest.raises(ConfigError):
            CaptionShapingConfig(shaping_captions=bad)
    with pytest.raises(ValueError, match="caption ids >= 1"):
        CaptionShaping(IdentityReward(), [0, KEY], num_envs=2)


def test_experiments_ppo_takes_shaping_captions_and_saves_them_only_when_set(tmp_path):
    """``--shaping-captions`` parses on a captioned task and is refused elsewhere (exit 2 naming the fix); a run
    without it saves none of the section's fields (runs saved before it existed resume as they were)."""
    from experiments import ppo
    argv = ["--env", "KeyDoor-9", "--run-dir", str(tmp_path / "a")]
    opts = ppo.parse([*argv, "--shaping-captions", "You pick up the key.", "The door opens."])
    assert opts.shaping.shaping_captions == ("You pick up the key.", "The door opens.") and opts.shaping.shaping_once
    assert opts.config.shaping_captions == ("You pick up the key.", "The door opens.")
    plain = ppo.parse(argv)
    assert not any(f.startswith("shaping_") for f in plain.config.__dataclass_fields__)
    with pytest.raises(SystemExit) as e:
        ppo.parse(["--env", "DeepSea-10", "--run-dir", str(tmp_path / "b"), "--shaping-captions", "It's a wall."])
    assert e.value.code == 2
