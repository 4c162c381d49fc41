"""Hand-written reward shaping on a captioned JAX task's captions: ``--shaping-captions`` of ``experiments.ppo``.

The upper bound of the sparse study's LLM-feedback arms (docs/sparse_study.md): no annotator, no reward model, a
person names the captions that mark progress (KeyDoor: ``You pick up the key.`` and ``The door opens.``) and each
is paid ``shaping_reward`` on top of the env reward::

    r[t] = r_env[t] + shaping_reward * 1[caption(t) in captions and (not once or caption(t) not yet paid this episode)]

``caption(t)`` is the step's ``info["message_id"]`` (:mod:`envs.captions`: the message the step produced, computed
before the auto-reset, so an episode's last step carries its own). With ``shaping_once`` (the default) each caption
is paid at its first occurrence in an episode only: a caption that can repeat (KeyDoor's ``The door opens.`` fires
every time the agent steps into the open door) is not a reward the agent can farm by walking to and fro, so the
shaping adds at most ``shaping_reward * len(captions)`` to an episode's return. Which captions an env has paid in its
current episode is a ``bool[num_envs, K]`` in the transform's state, carried across rollouts (an episode spans them),
reset after the step that ends an episode, checkpointed and vmapped over seeds like the rest of the runner state.

The shaping reward is not normalised (the study compares it, at the task's reward scale, with the other arms).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_pref.config import ConfigError, require
from jaxrl_pref.rewards.transform import IdentityReward, SINGLE, reward_streams, update_and_reward


@dataclasses.dataclass(frozen=True)
class CaptionShapingConfig:
    """Hand-written shaping on the captions of a captioned JAX task (KeyDoor-*, MiniGrid-*, Craftax-*): each caption
    named pays a fixed reward on top of the env reward (jaxrl_pref/rewards/caption_shaping.py)."""
    shaping_captions: tuple[str, ...] = ()
    """Captions that pay --shaping-reward, each the exact text of a caption of the env (envs/captions.py), e.g.
    --shaping-captions "You pick up the key." "The door opens." on KeyDoor; none: no shaping."""
    shaping_reward: float = 1.0
    """Reward added at a step whose caption is one of --shaping-captions (not normalised)."""
    shaping_once: bool = True
    """Pay each caption at its first occurrence in an episode only (False: at every occurrence, which a caption that
    repeats, e.g. "The door opens.", lets the agent farm)."""

    def __post_init__(self):
        require(len(set(self.shaping_captions)) == len(self.shaping_captions), "shaping_captions",
                f"a caption is named twice in {list(self.shaping_captions)}", "name each caption once")
        require(all(c.strip() for c in self.shaping_captions), "shaping_captions",
                "the empty message is no caption (a step without a message)", "name the captions' texts")
        require(np.isfinite(self.shaping_reward), "shaping_reward", f"must be finite, got {self.shaping_reward}",
                "pass e.g. --shaping-reward 1")

    def check(self, env_name: str, host: bool) -> None:
        """The captions are captions of ``env_name``, a captioned JAX task (ConfigError naming the fix otherwise)."""
        if not self.shaping_captions:
            return
        from envs import captions
        require(not host and captions.is_captioned(env_name), "shaping_captions",
                f"caption shaping needs a captioned JAX task, and {env_name} is "
                + ("a NetHack/MiniHack pool env" if host else "not captioned"),
                "pass a captioned task (KeyDoor-9, MiniGrid-DoorKey-8x8, ...), or drop --shaping-captions")
        texts = captions.caption_table(env_name).texts
        unknown = [c for c in self.shaping_captions if c not in texts]
        if unknown:
            what = "is not a caption" if len(unknown) == 1 else "are not captions"
            raise ConfigError("shaping_captions", f"{unknown} {what} of {env_name}", "use its captions' exact texts: "
                              + "; ".join(repr(t) for t in texts[1:13]) + ("; ..." if len(texts) > 13 else ""))


def make_caption_shaping(cfg: CaptionShapingConfig, env_name: str, num_envs: int, base=None):
    """``base`` (a reward transform, or None for the env reward) plus ``cfg``'s shaping on ``env_name``'s captions
    (``num_envs``: the envs one call of the transform sees, per device under data parallelism); ``base`` unchanged
    when ``cfg`` names no caption."""
    if not cfg.shaping_captions:
        return base
    from envs import captions
    table = captions.caption_table(env_name)
    return CaptionShaping(base if base is not None else IdentityReward(), [table.id(c) for c in cfg.shaping_captions],
                          num_envs, reward=cfg.shaping_reward, once=cfg.shaping_once)


class CaptionShaping:
    """A reward transform: ``base``'s reward plus ``reward`` at each step whose ``traj.info[message_key]`` is one of
    ``ids`` (with ``once``: only the first time in an episode that env produces that id). State ``{"base", "paid",
    "paid_start"}``: ``paid`` is ``bool[num_envs, len(ids)]`` after the last rollout, ``paid_start`` before it (what
    ``__call__`` pays from, after ``update`` advanced ``paid``)."""

    def __init__(self, base, ids: Sequence[int], num_envs: int, reward: float = 1.0, once: bool = True,
                 message_key: str = "message_id"):
        if reward_streams(base) != SINGLE:
            raise ValueError(f"CaptionShaping: the base reward {type(base).__name__} has several streams")
        ids = [int(i) for i in ids]
        if not ids or min(ids) < 1 or len(set(ids)) != len(ids):
            raise ValueError(f"CaptionShaping: ids must be distinct caption ids >= 1 (0 is no message), got {ids}")
        self.base, self.ids, self.num_envs = base, tuple(ids), num_envs
        self.reward, self.once, self.message_key = float(reward), bool(once), message_key

    def init(self, key, spec):
        paid = jnp.zeros((self.num_envs, len(self.ids)), bool)
        return {"base": self.base.init(key, spec), "paid": paid, "paid_start": paid}

    def resizable(self, path: str) -> bool:
        return bool(getattr(self.base, "resizable", lambda p: False)(path))

    def shaping(self, paid, traj):
        """``(bonus [T, N], paid after the rollout, hits [T, N, K])`` for the rollout ``traj`` from ``paid``."""
        msg = traj.info[self.message_key]  # [T, N]
        if msg.shape[1] != self.num_envs:
            raise ValueError(f"CaptionShaping(num_envs={self.num_envs}) got a rollout of {msg.shape[1]} envs: pass "
                             "the env count it sees (per device under data parallelism)")
        hits = msg[..., None] == jnp.asarray(self.ids, msg.dtype)  # [T, N, K]

        def step(paid, inp):
            hit, done = inp
            pay = hit & ~paid if self.once else hit
            paid = (paid | hit) & ~done[:, None]  # an episode that ended here starts the next with nothing paid
            return paid, pay

        paid, pay = jax.lax.scan(step, paid, (hits, traj.done))
        return self.reward * pay.sum(-1).astype(jnp.float32), paid, hits

    def update(self, state, traj, key, axis_name: Optional[str] = None):
        base, metrics = self.base.update(state["base"], traj, key, axis_name)
        _, paid, _ = self.shaping(state["paid"], traj)
        return {"base": base, "paid": paid, "paid_start": state["paid"]}, metrics

    def update_and_reward(self, state, traj, key, axis_name: Optional[str] = None):
        base, reward, metrics = update_and_reward(self.base, state["base"], traj, key, axis_name)
        bonus, paid, hits = self.shaping(state["paid"], traj)
        state = {"base": base, "paid": paid, "paid_start": state["paid"]}
        return state, reward + bonus, {**metrics, **self._metrics(bonus, hits)}

    def __call__(self, state, traj):
        reward, metrics = self.base(state["base"], traj)
        bonus, _, hits = self.shaping(state["paid_start"], traj)
        return reward + bonus, {**metrics, **self._metrics(bonus, hits)}

    @staticmethod
    def _metrics(bonus, hits):
        return {"reward/shaping": bonus.mean(), "shaping/caption_frac": hits.any(-1).mean()}
