"""Language in the policy (BLIP-FusePPO's idea): a frozen sentence embedding of the step's message fused into the
policy's input, and the semantic-alignment reward stream. ``python -m experiments.ppo --env KeyDoor-9 --language
minilm [--alignment-coef 0.1]`` (docs/language.md).

The embedding is the packaged all-MiniLM-L6-v2 (:mod:`jaxrl_pref.annotation.encoder`, 384 dims, unit norm), run on
the host, once per distinct message, never inside the training program; the empty message (no message) is the zero
vector. What the policy reads is ``tanh(Dense(language_dim)(embedding))`` concatenated with its usual input.

* Captioned JAX tasks (KeyDoor-*, MiniGrid-*, Craftax-*; :mod:`envs.captions`): the caption table is embedded once,
  before ``jit`` (:func:`caption_embeddings`: ``float32[K, 384]``, row 0 zeros). :class:`MessageIdObservation`
  appends the message the last step produced (``info["message_id"]``; 0 after a reset) to the observation as one
  float32 entry, and :class:`LanguageActorCritic` gathers its row of the table (a constant of the program) inside
  ``jit``. Nothing is added to the runner state: resume is exact as without the option.
* NetHack/MiniHack pool (host loop): :class:`LanguageHostEnv` wraps the pool and adds ``obs["language"]``
  (``float32[384]``) from a :class:`MessageEmbeddingCache` keyed by the message's hash
  (:func:`jaxrl_pref.rewards.retrieval.message_hash_np`), filled on the host before the jitted ``act`` sees the
  observations; :class:`LanguageEncoder` puts the projection next to the NetHack encoder's features.

The alignment stream (:class:`LanguageAlignment`, ``--alignment-coef``): ``r + coef * cos(e(message), e(goal))``,
with ``e(goal)`` the task's goal statement (its annotator prompt's ``goal`` section, or ``--alignment-goal``), 0 for
the empty message. The message of step ``t`` is the one that step produced (captioned tasks: ``info["message_id"]``;
host: the message in the observation the step led to, ``final_obs["language"]``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from gymnax.environments import spaces

from jaxrl_pref.config import require

LANGUAGES = ("none", "minilm")
EMBED_DIM = 384  # all-MiniLM-L6-v2


# -- the frozen encoder (host side) --------------------------------------------------------------------------------

class TextEmbedder:
    """``embed(texts) -> float32[n, D]``, the empty text the zero vector; counts the texts it embedded
    (``calls``, ``texts``), so a test can see each distinct message is embedded once."""

    def __init__(self, encode: Optional[Callable[[list], np.ndarray]] = None, dim: int = EMBED_DIM):
        self._encode, self.dim = encode, dim
        self.calls, self.texts = 0, 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        idx = [i for i, t in enumerate(texts) if t.strip()]
        if idx:
            if self._encode is None:
                from jaxrl_pref.annotation.encoder import SentenceEncoder
                enc = SentenceEncoder.load()
                self._encode = lambda ts: enc.embed(ts, batch_size=16)
            out[idx] = np.asarray(self._encode([texts[i] for i in idx]), np.float32)
            self.calls += 1
            self.texts += len(idx)
        return out


@functools.lru_cache(maxsize=1)
def default_embedder() -> TextEmbedder:
    """The process's MiniLM embedder (loaded on first use, shared by every table and cache)."""
    return TextEmbedder()


@functools.lru_cache(maxsize=16)
def _caption_embeddings(texts: tuple) -> np.ndarray:
    out = default_embedder().embed(texts)
    out.setflags(write=False)
    return out


def caption_embeddings(env_name: str) -> np.ndarray:
    """``float32[K, D]``: the embeddings of ``env_name``'s caption table (row 0, the empty message: zeros), computed
    once per process per table."""
    from envs import captions
    return _caption_embeddings(captions.caption_table(env_name).texts)


def goal_statement(env_name: str, goal: str = "") -> str:
    """``goal``, else the task's goal statement: its annotator prompt's goal lines joined (docs/oni.md)."""
    if goal.strip():
        return goal.strip()
    import envs
    from jaxrl_pref.annotation.backends import Prompt
    task = envs.entry(env_name).task or ("minihack" if env_name.startswith("MiniHack") else "nethack_score")
    return " ".join(Prompt.load(task).goal)


# -- checks ---------------------------------------------------------------------------------------------------------

def check(language: str, env_name: str, host: bool, network: str = "mlp") -> None:
    """``--language`` against the env: a captioned JAX task or a NetHack/MiniHack pool (ConfigError otherwise)."""
    require(language in LANGUAGES, "language", f"unknown language {language!r}", f"use one of {', '.join(LANGUAGES)}")
    if language == "none":
        return
    from envs import captions
    require(host or captions.is_captioned(env_name), "language",
            f"--language {language} reads the step's message, and {env_name} has none (not a captioned task)",
            "pass a captioned task (KeyDoor-9, MiniGrid-DoorKey-8x8, Craftax-*) or a NetHack/MiniHack env, or drop "
            "--language")
    require(host or network == "mlp", "network", f"--language {language} on a JAX task fuses into the mlp policy",
            "pass --network mlp (recurrent cores take --language on NetHack/MiniHack)")


# -- captioned JAX tasks: the message id in the observation ---------------------------------------------------------

class MessageIdObservation:
    """Appends the message the last step produced (``info["message_id"]``, 0 after a reset) to the flat observation
    as one float32 entry (exact for ids below 2**24); ``final_obs`` gets the step's own message. Stateless."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):
        return getattr(self._env, name)

    def state_specs(self, split, replicated):
        return self._env.state_specs(split, replicated)

    def observation_space(self, params):
        s = self._env.observation_space(params)
        return spaces.Box(-jnp.inf, jnp.inf, (int(np.prod(s.shape)) + 1,), jnp.float32)

    @staticmethod
    def _with(obs, msg):
        obs = obs.reshape(obs.shape[:len(msg.shape)] + (-1,)).astype(jnp.float32)
        return jnp.concatenate([obs, msg.astype(jnp.float32)[..., None]], -1)

    def reset(self, key, params):
        obs, state = self._env.reset(key, params)
        lead = obs.shape[:len(getattr(self._env, "batch_shape", ()))]
        return self._with(obs, jnp.zeros(lead, jnp.int32)), state

    def step(self, key, state, action, params):
        obs, state, reward, terminated, truncated, info = self._env.step(key, state, action, params)
        msg = info["message_id"]
        done = terminated | truncated
        info = {**info, "final_obs": self._with(info["final_obs"], msg)}
        return self._with(obs, jnp.where(done, 0, msg)), state, reward, terminated, truncated, info


def wrap_env(env, cfg):
    """The env stack of ``cfg`` (an agents.ppo.Config) with ``cfg.language``: on a captioned JAX task the message id
    appended (:class:`MessageIdObservation`); ``env`` unchanged for none."""
    if cfg.language == "none":
        return env
    check(cfg.language, cfg.env_name, False, cfg.network)
    return MessageIdObservation(env)


class _Const:
    """A numpy table held by a module as a compile-time constant (hashed by identity)."""

    def __init__(self, value: np.ndarray):
        self.value = np.asarray(value, np.float32)

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


def project(emb, dim: int):
    """The trained part of the fusion: ``tanh(Dense(dim)(embedding))`` (the embedding itself stays frozen)."""
    return nn.tanh(nn.Dense(dim, kernel_init=nn.initializers.orthogonal(1.0), name="language_proj")(emb))


class LanguageActorCritic(nn.Module):
    """:class:`~jaxrl_pref.networks.ActorCritic` whose input is ``[obs, tanh(Dense(language_dim)(table[id]))]``: the
    observation's last entry is the message id (:class:`MessageIdObservation`), ``table`` the caption embeddings."""
    num_actions: int
    table: _Const
    discrete: bool = True
    hidden: Sequence[int] = (64, 64)
    activation: str = "tanh"
    language_dim: int = 32
    value_heads: int = 1

    @nn.compact
    def __call__(self, obs):
        from jaxrl_pref.networks import ActorCritic
        x, msg = split_message(obs)
        table = jnp.asarray(self.table.value)
        # the Dense applied to the K table rows, then picked by a one-hot matmul: the same values as projecting
        # each step's gathered embedding, without a [batch, 384] gather (nor a scatter in the gradient)
        proj = nn.Dense(self.language_dim, kernel_init=nn.initializers.orthogonal(1.0), name="language_proj")(table)
        z = nn.tanh(jax.nn.one_hot(msg, table.shape[0], dtype=proj.dtype) @ proj)
        x = jnp.concatenate([x, z], -1)
        return ActorCritic(self.num_actions, self.discrete, tuple(self.hidden), self.activation, self.value_heads,
                           name="ac")(x)


def split_message(obs):
    """``(observation float32[..., n], message id int32[...])`` of an observation :class:`MessageIdObservation`
    made."""
    obs = obs.astype(jnp.float32)
    return obs[..., :-1], obs[..., -1].astype(jnp.int32)


class LanguageEncoder(nn.Module):
    """``base`` (e.g. :class:`~jaxrl_pref.networks.NetHackEncoder`) features next to ``tanh(Dense(language_dim)(
    obs["language"]))``: the policy's encoder with the message embedding (host path)."""
    base: nn.Module
    language_dim: int = 32

    @nn.compact
    def __call__(self, obs: dict):
        return jnp.concatenate([self.base(obs), project(obs["language"].astype(jnp.float32), self.language_dim)], -1)


def network(cfg, spec, network=None):
    """The policy network PPO builds with ``cfg.language`` (``cfg``: an agents.ppo.Config): a JAX task's
    :class:`LanguageActorCritic` over its caption table, or ``network`` (an EncoderActorCritic, host path) with its
    encoder wrapped in a :class:`LanguageEncoder`."""
    from jaxrl_pref.networks import EncoderActorCritic, NetHackEncoder
    if isinstance(spec.obs_shape, dict):  # host env: obs["language"] comes from LanguageHostEnv
        require("language" in spec.obs_shape, "language", "the host env's observations carry no 'language' key",
                "wrap the env in jaxrl_pref.language.LanguageHostEnv (the host trainer does with --language)")
        if network is None:
            network = EncoderActorCritic(spec.num_actions, NetHackEncoder())
        require(isinstance(network, EncoderActorCritic), "language",
                f"fuses into an EncoderActorCritic's encoder, got {type(network).__name__}", "drop --language")
        return network.clone(encoder=LanguageEncoder(network.encoder, cfg.language_dim))
    require(network is None, "language", "a network was given and --language builds its own", "drop --language")
    return LanguageActorCritic(spec.num_actions, _Const(caption_embeddings(cfg.env_name)), spec.discrete,
                               tuple(cfg.hidden), cfg.activation, cfg.language_dim)


# -- NetHack/MiniHack: the host-side cache --------------------------------------------------------------------------

class MessageEmbeddingCache:
    """Host-side ``message bytes uint8[N, 256] -> float32[N, D]``, keyed by the message's hash
    (:func:`~jaxrl_pref.rewards.retrieval.message_hash_np`): a message is embedded the first time it is seen, in one
    batch with the other new ones of that call."""

    def __init__(self, embedder: Optional[TextEmbedder] = None):
        self.embedder = embedder if embedder is not None else default_embedder()
        self._rows: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __call__(self, msgs: np.ndarray) -> np.ndarray:
        from envs.messages import decode_messages
        from jaxrl_pref.rewards.retrieval import message_hash_np, message_key
        msgs = np.asarray(msgs, np.uint8)
        lead = msgs.shape[:-1]
        flat = msgs.reshape(-1, msgs.shape[-1])
        h1, h2 = message_hash_np(flat)
        keys = message_key(h1, h2)
        new = {}
        for i, k in enumerate(keys.tolist()):
            if k not in self._rows and k not in new:
                new[k] = i
        if new:
            rows = self.embedder.embed(decode_messages(flat[list(new.values())]))
            self._rows.update(zip(new.keys(), rows))
        out = np.stack([self._rows[k] for k in keys.tolist()]) if len(keys) else np.zeros((0, self.embedder.dim))
        return out.astype(np.float32).reshape(lead + (self.embedder.dim,))


class LanguageHostEnv:
    """A host env (:mod:`envs.host`) whose observations also carry ``language`` (``float32[D]``: the embedding of
    their ``message``, from a :class:`MessageEmbeddingCache`); ``info["final_obs"]`` too. Everything else is the
    wrapped env's (``num_groups``/``send``/``recv`` included)."""

    def __init__(self, env, cache: Optional[MessageEmbeddingCache] = None):
        require("message" in env.observation_spec(), "language",
                "--language reads the message, and the pool's observations have no 'message'",
                "add message to --obs-keys")
        self.env, self.cache = env, cache if cache is not None else MessageEmbeddingCache()
        if hasattr(env, "send"):
            self.send = env.send
            self.recv = lambda group: self._out(env.recv(group))

    def __getattr__(self, name):
        return getattr(self.env, name)

    def observation_spec(self):
        return {**self.env.observation_spec(), "language": ((self.cache.embedder.dim,), np.float32)}

    def _obs(self, obs):
        return {**obs, "language": self.cache(obs["message"])}

    def _out(self, out):
        obs, r, te, tr, info = out
        if "final_obs" in info:
            info = {**info, "final_obs": self._obs(info["final_obs"])}
        return self._obs(obs), r, te, tr, info

    def reset(self):
        return self._obs(self.env.reset())

    def step(self, actions):
        return self._out(self.env.step(actions))

    def close(self):
        self.env.close()


def wrap_host_env(env, language: str):
    """A host env with ``--language``: :class:`LanguageHostEnv` (``env`` unchanged for none)."""
    return env if language == "none" or isinstance(env, LanguageHostEnv) else LanguageHostEnv(env)


# -- the semantic-alignment reward stream ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AlignmentConfig:
    """BLIP-FusePPO's semantic-alignment term as a reward stream: + alignment_coef * cos(message, goal statement) per
    step (jaxrl_pref/language.py, docs/language.md)."""
    alignment_coef: float = 0.0
    """Weight of the alignment reward added to the env reward; 0: none."""
    alignment_goal: str = ""
    """The goal statement messages are compared with; empty: the task's (its annotator prompt's goal lines)."""

    def __post_init__(self):
        require(np.isfinite(self.alignment_coef), "alignment_coef", f"must be finite, got {self.alignment_coef}",
                "pass e.g. --alignment-coef 0.1")

    def check(self, env_name: str, host: bool, language: str) -> None:
        if self.alignment_coef == 0:
            require(not self.alignment_goal, "alignment_goal", "is set but --alignment-coef is 0",
                    "pass --alignment-coef, e.g. 0.1, or drop --alignment-goal")
            return
        from envs import captions
        require(host or captions.is_captioned(env_name), "alignment_coef",
                f"the alignment reward reads the step's message, and {env_name} has none (not a captioned task)",
                "pass a captioned task (KeyDoor-9, MiniGrid-*, Craftax-*) or a NetHack/MiniHack env, or drop "
                "--alignment-coef")
        require(not host or language != "none", "alignment_coef",
                "on NetHack/MiniHack the alignment reward reads the embeddings --language puts in the observations",
                "pass --language minilm too")


def make_alignment(cfg: AlignmentConfig, env_name: str, host: bool, base=None):
    """``base`` (a transform, None: the env reward) plus the alignment reward; ``base`` unchanged for coef 0."""
    if cfg.alignment_coef == 0:
        return base
    from jaxrl_pref.rewards import IdentityReward
    goal = default_embedder().embed([goal_statement(env_name, cfg.alignment_goal)])[0]
    table = None if host else caption_embeddings(env_name) @ goal  # [K]: cos of each caption (row 0: 0)
    return LanguageAlignment(base if base is not None else IdentityReward(), cfg.alignment_coef, goal, table)


class LanguageAlignment:
    """A reward transform: ``base``'s reward + ``coef * cos(e(message_t), e(goal))``. ``table`` (captioned tasks):
    ``float32[K]``, the cosine of each caption, looked up by ``traj.info["message_id"]``; None (host): the cosine
    of ``traj.final_obs["language"]`` with ``goal``. Embeddings are unit norm and the empty message's is zero, so
    the dot product is the cosine and the empty message pays 0. Stateless beyond ``base``'s."""

    def __init__(self, base, coef: float, goal: np.ndarray, table: Optional[np.ndarray] = None):
        from jaxrl_pref.rewards.transform import SINGLE, reward_streams
        if reward_streams(base) != SINGLE:
            raise ValueError(f"LanguageAlignment: the base reward {type(base).__name__} has several streams")
        self.base, self.coef = base, float(coef)
        self.goal = np.asarray(goal, np.float32)
        self.table = None if table is None else np.asarray(table, np.float32)

    def init(self, key, spec):
        return self.base.init(key, spec)

    def resizable(self, path: str) -> bool:
        return bool(getattr(self.base, "resizable", lambda p: False)(path))

    def alignment(self, traj):
        """``[T, N]`` cosine of each step's message with the goal."""
        if self.table is not None:
            return jnp.take(jnp.asarray(self.table), traj.info["message_id"].astype(jnp.int32), axis=0)
        return traj.final_obs["language"].astype(jnp.float32) @ jnp.asarray(self.goal)

    def update(self, state, traj, key, axis_name: Optional[str] = None):
        return self.base.update(state, traj, key, axis_name)

    def update_and_reward(self, state, traj, key, axis_name: Optional[str] = None):
        from jaxrl_pref.rewards.transform import update_and_reward
        state, reward, metrics = update_and_reward(self.base, state, traj, key, axis_name)
        return state, *self._add(reward, metrics, traj)

    def __call__(self, state, traj):
        return self._add(*self.base(state, traj), traj)

    def _add(self, reward, metrics, traj):
        a = self.alignment(traj)
        return reward + self.coef * a, {**metrics, "reward/alignment": a.mean()}
