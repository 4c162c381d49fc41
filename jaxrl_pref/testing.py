"""What the tests and the benchmarks share: small envs, data and stand-ins with a known answer, and the anchor bench's
recurrent PPO config. ``benchmarks.learning_spread`` measures the statistic each learning test asserts over many seeds
with the same helpers the test uses. The library itself uses none of this; helpers that train an agent on these are
in :mod:`agents.testing`.
"""
from __future__ import annotations

from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

import envs
from envs.messages import encode_messages
from jaxrl_pref.networks import MLP
from jaxrl_pref.rewards.e3b import E3B
from jaxrl_pref.rollout import Transition

# The config ``../shared/anchors/bench_ppo_rnn.py`` times against purejaxrl's ``ppo_rnn.py`` (``agents.ppo.Config``
# fields): 4 envs x 128 steps, 500k env steps, 4 epochs x 4 minibatches, Dense(128)+relu -> GRU/LSTM(128) -> heads.
RNN_BENCH = dict(env_name="CartPole-v1", num_envs=4, num_steps=128, total_timesteps=500_000, learning_rate=2.5e-4,
                 update_epochs=4, num_minibatches=4, gamma=0.99, gae_lambda=0.95, clip_eps=0.2, ent_coef=0.01,
                 vf_coef=0.5, max_grad_norm=0.5, anneal_lr=True, hidden=(128,), activation="relu", rnn_hidden=128)


# -- exploration bonuses (RND, E3B) -----------------------------------------------------------------------------------

def obs_spec(shape) -> envs.EnvSpec:
    """A discrete-action (2 actions) env spec of observations ``shape`` (a shape, or a dict of shapes)."""
    return envs.EnvSpec(shape, True, 2)


def obs_batch(x):
    """A rollout whose next observations are ``x`` (``[T, N, ...]``, or a dict of such), rewards 0: what a bonus
    reads."""
    return SimpleNamespace(final_obs=x, reward=jnp.zeros(x.shape[:2] if not isinstance(x, dict) else
                                                         next(iter(x.values())).shape[:2]))


def e3b_rollout(key, T, N, dim, num_actions, done):
    """Random ``[T, N, dim]`` observations and actions whose next observation shows the action taken."""
    k1, k2, k3 = jax.random.split(key, 3)
    obs = jax.random.normal(k1, (T, N, dim))
    action = jax.random.randint(k2, (T, N), 0, num_actions)
    final = obs + jax.nn.one_hot(action, dim) * 3.0  # the next state shows the action taken
    return SimpleNamespace(obs=obs, final_obs=final, action=action, done=jnp.asarray(done), reward=jnp.zeros((T, N)))


def as_transition(tr) -> Transition:
    """:func:`e3b_rollout`'s rollout as a :class:`~jaxrl_pref.rollout.Transition` (log-probs, values, rewards 0)."""
    z = jnp.zeros(tr.action.shape)
    return Transition(tr.obs, tr.action, z, z, z, tr.done, jnp.zeros_like(tr.done), tr.final_obs, {})


def e3b_inverse_accuracies(keys, updates: int = 40):
    """E3B's inverse model's accuracy after each of ``updates`` updates on random rollouts, per key (one vmapped
    program): ``[len(keys), updates]``."""
    N = 16
    e3b = E3B(num_envs=N, hidden=(32,), features=16, learning_rate=3e-3, steps=4)

    def run(key):
        k_init, k_data, k_upd = jax.random.split(key, 3)
        state = e3b.init(k_init, envs.EnvSpec((6,), True, 4))

        def step(state, i):
            tr = e3b_rollout(jax.random.fold_in(k_data, i), 8, N, 6, 4, np.zeros((8, N), bool))
            state, m = e3b.update(state, as_transition(tr), jax.random.fold_in(k_upd, i))
            return state, m["e3b/inverse_accuracy"]
        return jax.lax.scan(step, state, jnp.arange(updates))[1]
    return np.asarray(jax.jit(jax.vmap(run))(keys))


# -- ONI: messages, a message env, a stand-in annotator ----------------------------------------------------------------

MONSTERS = ["newt", "jackal", "grid bug", "kobold", "lichen", "fox", "sewer rat", "gnome lord", "hill orc",
            "giant bat", "acid blob", "coyote", "floating eye", "gecko", "yellow mold", "homunculus"]
ITEMS = ["a dagger", "3 gold pieces", "a scroll labeled FOOBIE BLETCH", "an amulet", "a wand", "2 food rations",
         "a ring", "a potion", "a lamp", "a key"]


def classification_messages(monsters, items) -> tuple[list[str], np.ndarray]:
    """NetHack-like messages of ``monsters`` and ``items`` and their labels: kills, items seen or picked up 1; misses,
    bites, noises 0."""
    pos = [f"You kill the {m}!" for m in monsters] + [f"You see here {i}." for i in items] + \
          [f"You pick up {i}." for i in items]
    neg = [f"You miss the {m}." for m in monsters] + [f"The {m} bites!" for m in monsters] + \
          [f"You hear {i} fall." for i in items]
    return pos + neg, np.array([1.0] * len(pos) + [0.0] * len(neg), np.float32)


MESSAGES = ["It's a wall.", "You hear some noises.", "You find a hidden passage.", "Nothing happens."]


class MessageBandit:
    """Host env: action a prints MESSAGES[a]; no extrinsic reward; episodes of 8 steps (truncated)."""
    num_actions = len(MESSAGES)

    def __init__(self, num_envs, horizon=8):
        self.num_envs, self.horizon = num_envs, horizon
        self.t = np.zeros(num_envs, np.int32)
        self.ret = np.zeros(num_envs, np.float32)
        self.bytes = encode_messages(MESSAGES)

    def observation_spec(self):
        return {"obs": ((2,), np.float32), "message": ((256,), np.uint8)}

    def _obs(self, msg_ids=None):
        m = np.zeros((self.num_envs, 256), np.uint8) if msg_ids is None else self.bytes[msg_ids]
        return {"obs": np.ones((self.num_envs, 2), np.float32), "message": m}

    def reset(self):
        self.t[:] = 0
        return self._obs()

    def step(self, actions):
        actions = np.asarray(actions)
        obs = self._obs(actions)
        self.t += 1
        done = self.t >= self.horizon
        info = {"final_obs": {k: v.copy() for k, v in obs.items()}, "episode_done": done,
                "episode_return": np.zeros(self.num_envs, np.float32),
                "episode_length": self.t.astype(np.float32)}
        self.t[done] = 0
        obs["message"][done] = 0
        return obs, np.zeros(self.num_envs, np.float32), np.zeros(self.num_envs, bool), done, info

    def close(self):
        pass


class InstantClient:
    """In-process stand-in for the annotator client: answers from a dict / a score table at once."""

    def __init__(self, labels=None, scores=None):
        self.labels, self.scores = labels or {}, scores or {}
        self.out_l, self.out_p, self.asked = {}, [], []

    def submit(self, messages=(), pairs=()):
        self.asked += list(messages)
        for m in messages:
            self.out_l[m] = self.labels.get(m, 0.0)
        for a, b in pairs:
            sa, sb = self.scores.get(a, 0.0), self.scores.get(b, 0.0)
            self.out_p.append((a, b, 0.5 if sa == sb else float(sa > sb)))

    def poll(self):
        l, p = self.out_l, self.out_p
        self.out_l, self.out_p = {}, []
        return l, p

    def metrics(self):
        return {"annotator/connected": 1.0}


class DictMLP(nn.Module):
    """An encoder of dict observations: an MLP (32) of ``obs["obs"]``."""

    @nn.compact
    def __call__(self, obs):
        return MLP((32,))(obs["obs"])


# a prompt file for the embedded annotator on MessageBandit's messages (``prompts/toy.v1.txt``)
TOY_PROMPT = """## description
Find hidden things.
## system
Judge.
## label
{description} "{message}" helpful? \\boxed{{1}} or \\boxed{{0}}.
## compare
{description} "{message_1}" vs "{message_2}"? \\boxed{{1}}, \\boxed{{2}} or \\boxed{{0}}.
## progress
You find a hidden passage.
## neutral
It's a wall.
You hear some noises.
Nothing happens.
"""


# -- SQIRL: a tiny deterministic MDP with a known solution --------------------------------------------------------
# states 0 (start), 1, 2, 3 (terminal sink); actions 0/1; rows = (next state, reward, terminal) per (s, a)
#   s0: a0 -> r 0.5, end            a1 -> r 0, s1
#   s1: a0 -> r 0,   end            a1 -> r 0, s2
#   s2: a0 -> r 0,   end            a1 -> r 1, end
# With gamma = 0.9: Q^rand(s0) = (0.5, 0.2025) so k = 1 takes the immediate 0.5; one backup gives (0.5, 0.405),
# still a0; two backups give (0.5, 0.81) = Q*(s0): k = 3 is needed (the effective horizon of this MDP is 3).
CHAIN_NEXT = np.array([[3, 1], [3, 2], [3, 3]])
CHAIN_REWARD = np.array([[0.5, 0.0], [0.0, 0.0], [0.0, 1.0]], np.float32)
CHAIN_TERMINAL = CHAIN_NEXT == 3
CHAIN = "TestChain-v0"


@struct.dataclass
class ChainState(environment.EnvState):
    s: jax.Array
    time: int


class Chain(environment.Environment):
    """The chain MDP above as a gymnax env (one-hot observations of the 4 states)."""

    @property
    def default_params(self):
        return environment.EnvParams(max_steps_in_episode=3)

    def action_space(self, params=None):
        return spaces.Discrete(2)

    def observation_space(self, params):
        return spaces.Box(0.0, 1.0, (4,), jnp.float32)

    def reset_env(self, key, params):
        st = ChainState(jnp.int32(0), 0)
        return jax.nn.one_hot(st.s, 4), st

    def step_env(self, key, state, action, params):
        nxt, r, term = (jnp.asarray(x)[state.s, action] for x in (CHAIN_NEXT, CHAIN_REWARD, CHAIN_TERMINAL))
        st = ChainState(nxt.astype(jnp.int32), state.time + 1)
        return jax.nn.one_hot(st.s, 4), st, r, term, {}


def register_chain() -> str:
    """Registers :class:`Chain` as ``TestChain-v0`` (again: a no-op); returns the name."""
    envs.register(CHAIN, lambda **kw: (Chain(), Chain().default_params))
    return CHAIN
