"""ONI: PPO with an intrinsic reward learned online from LLM (or embedded) feedback on the agent's messages.

Not a copy of PPO: it is PPO's host-loop trainer (:class:`agents.ppo.HostTrainer`) with

* a reward transform (the seam of :mod:`jaxrl_pref.rewards.transform`)::

      r = ext_coef * r_ext + int_coef * normalise(ShapedIntrinsic(model))

  where ``model`` is one of the three ONI variants -- ``retrieval`` (labels looked up by message hash in jit),
  ``classification`` (a message classifier trained online with BCE) or ``ranking`` (Bradley-Terry on pairwise
  preferences) -- and :class:`~jaxrl_pref.rewards.shaping.ShapedIntrinsic` applies threshold and count decay;
* a host hook (:class:`ONILoop`) run after every rollout, before its update: it counts the rollout's messages into
  the message table, sends messages (or pairs, for ranking) never seen before to the annotator through the
  non-blocking :class:`~jaxrl_pref.annotation.client.AnnotatorClient`, takes whatever labels arrived since the
  last update and loads them into the reward state (table / training buffer). The jitted update then takes a few
  reward-model steps, computes the intrinsic reward and runs PPO.

The loop never waits for the annotator: with the service down the intrinsic reward stays as it is and the labels
catch up when it returns. ``python -m experiments.oni`` runs it on NetHack/MiniHack.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from agents import ppo
from jaxrl_pref.config import require
from jaxrl_pref.rewards import ScaledSum
from jaxrl_pref.rewards.classification import Classification
from jaxrl_pref.rewards.ranking import Ranking
from jaxrl_pref.rewards.retrieval import MessageTable, Retrieval, decode_messages, encode_messages, message_hash_np
from jaxrl_pref.rewards.shaping import ShapedIntrinsic

REWARD_MODELS = ("retrieval", "classification", "ranking")


@dataclasses.dataclass(frozen=True)
class ONIOptions:
    """ONI's intrinsic reward: the reward model, its coefficients and shaping, and its training."""
    reward_model: str = "classification"
    """Intrinsic reward model: retrieval (label lookup by message hash), classification (P(helpful) model),
    ranking (Bradley-Terry on pairwise preferences)."""
    int_coef: float = 0.4
    """Coefficient of the (normalised) intrinsic reward."""
    ext_coef: float = 10.0
    """Coefficient of the extrinsic reward (ONI: 0.1 on NetHackScore, 10 on the others; 0 = reward-free)."""
    threshold: float = -1.0
    """Score threshold below which the intrinsic reward is 0 (-1: 0.5 for retrieval/classification, 0 for ranking)."""
    count_beta: float = 0.5
    """Count-based decay exponent: r / N(message)^beta (0 turns it off)."""
    normalize_intrinsic: bool = True
    """Divide the intrinsic reward by a running std before the coefficient."""
    rm_steps: int = 2
    """Reward-model optimiser steps per PPO update (classification, ranking)."""
    rm_batch_size: int = 128
    rm_learning_rate: float = 3e-3
    rm_capacity: int = 4096
    """Labelled messages (or pairs, for ranking) kept for reward-model training (newest kept)."""
    pairs_per_update: int = 32
    """Ranking: new message pairs sent for comparison after each rollout."""
    table_capacity: int = 1 << 16
    """Message table slots (a power of two; holds at most half as many distinct messages)."""

    def __post_init__(self):
        self.validate_oni()

    def validate_oni(self) -> None:
        require(self.reward_model in REWARD_MODELS, "reward_model", f"unknown model {self.reward_model!r}",
                f"use one of {', '.join(REWARD_MODELS)}")
        for f in ("int_coef", "ext_coef", "count_beta"):
            require(getattr(self, f) >= 0, f, f"must be >= 0, got {getattr(self, f)}", f"pass --{f.replace('_', '-')} 0 or more")
        for f in ("rm_steps", "rm_batch_size", "rm_learning_rate", "rm_capacity", "pairs_per_update"):
            require(getattr(self, f) > 0, f, f"must be > 0, got {getattr(self, f)}", f"pass a positive --{f.replace('_', '-')}")
        c = self.table_capacity
        require(c >= 1024 and c & (c - 1) == 0, "table_capacity", f"must be a power of two >= 1024, got {c}",
                "pass e.g. --table-capacity 65536")

    @property
    def effective_threshold(self) -> float:
        if self.threshold != -1.0:
            return self.threshold
        return 0.0 if self.reward_model == "ranking" else 0.5


def make_model(cfg: ONIOptions):
    if cfg.reward_model == "retrieval":
        return Retrieval()
    kw = dict(capacity=cfg.rm_capacity, steps=cfg.rm_steps, batch_size=cfg.rm_batch_size,
              learning_rate=cfg.rm_learning_rate)
    return Classification(**kw) if cfg.reward_model == "classification" else Ranking(**kw)


def make_reward(cfg: ONIOptions) -> ScaledSum:
    """The reward transform: ``ext_coef * r_ext + int_coef * normalise(shaped intrinsic)``."""
    shaped = ShapedIntrinsic(make_model(cfg), threshold=cfg.effective_threshold, beta=cfg.count_beta,
                             table_capacity=cfg.table_capacity)
    return ScaledSum(shaped, ext_coef=cfg.ext_coef, int_coef=cfg.int_coef, normalize=cfg.normalize_intrinsic)


class ONILoop:
    """The host hook: messages out to the annotator, labels in to the reward state (see the module doc).

    ``client`` is anything with ``submit(messages, pairs)``, ``poll() -> (labels, pairs)`` and ``metrics()``
    (an :class:`~jaxrl_pref.annotation.client.AnnotatorClient`, or an in-process stand-in in tests).
    """

    def __init__(self, cfg: ONIOptions, reward: ScaledSum, client, seed: int = 0):
        self.cfg, self.reward, self.client = cfg, reward, client
        self.model = reward.intrinsic.model
        self.table = MessageTable(cfg.table_capacity)
        self.rng = np.random.default_rng(seed)
        self.seen: dict[str, None] = {"": None}  # distinct message texts (ordered), the empty one included
        self.asked_pairs: set = set()
        self.lab_texts: dict[str, float] = {}
        self.pairs: dict[tuple, float] = {}
        self.unlabeled = 0
        self._data_dirty = False
        self._restored = False

    def _restore(self, shaped_state):
        """After a resume the host table is empty but the checkpointed one is not: take counts/labels back."""
        self._restored = True
        t = {k: np.asarray(v) for k, v in shaped_state["table"].items()}
        if t["used"].any() and self.table.size == 0 and len(t["used"]) == self.table.capacity:
            self.table.k1[:], self.table.k2[:], self.table.used[:] = t["k1"], t["k2"], t["used"]
            self.table.label[:], self.table.count[:] = t["label"], t["count"]
            self.table.size = int(t["used"].sum())
            self.table.dirty = self.table._keys_dirty = True

    def __call__(self, state, traj):
        rs = state.reward_state
        shaped = rs["model"]
        if not self._restored:
            self._restore(shaped)
        msgs = np.asarray(traj.final_obs["message"])
        msgs = msgs.reshape(-1, msgs.shape[-1])
        h1, h2 = message_hash_np(msgs)
        _, first, counts = np.unique((h1.astype(np.uint64) << np.uint64(32)) | h2, return_index=True,
                                     return_counts=True)
        uniq = msgs[first]
        self.table.add(uniq, counts=counts.astype(np.float32))
        texts = decode_messages(uniq)
        new = [t for t in texts if t not in self.seen]
        self.seen.update(dict.fromkeys(new))
        new_pairs = self._pairs(texts) if self.cfg.reward_model == "ranking" else []
        if self.cfg.reward_model != "ranking" and new:
            self.client.submit([t for t in new if t])
        elif new_pairs:
            self.client.submit((), new_pairs)

        labels, pairs = self.client.poll()
        got = {t: v for t, v in labels.items() if v is not None}
        self.unlabeled += sum(v is None for v in labels.values())
        if got:
            self.table.add(encode_messages(got), labels=np.array(list(got.values()), np.float32))
            self.lab_texts.update(got)
            self._data_dirty |= self.cfg.reward_model == "classification"
        for a, b, p in pairs:
            if p is not None:
                self.pairs[(a, b)] = float(p)
                self._data_dirty |= self.cfg.reward_model == "ranking"

        if self.table.dirty:
            shaped = {**shaped, "table": self.table.device()}
        if self._data_dirty:
            shaped = {**shaped, "model": {**shaped["model"], "data": self._buffer()}}
            self._data_dirty = False
        state = state.replace(reward_state={**rs, "model": shaped})
        pos = sum(v > 0.5 for v in self.lab_texts.values())
        metrics = {"labels/labeled": len(self.lab_texts), "labels/positive": pos, "labels/unlabeled": self.unlabeled,
                   "labels/pairs": len(self.pairs), "labels/new_this_update": len(got) + len(pairs),
                   "messages/distinct_seen": len(self.seen) - 1, "messages/new_this_update": len(new)}
        metrics.update(self.client.metrics())
        return state, metrics

    def _pairs(self, texts) -> list[tuple[str, str]]:
        """Up to ``pairs_per_update`` new pairs: each a message of this rollout against a random seen one (the
        empty message included, the ranking model's zero point)."""
        pool = list(self.seen)
        out = []
        for _ in range(4 * self.cfg.pairs_per_update):
            if len(out) >= self.cfg.pairs_per_update or len(pool) < 2:
                break
            a = texts[self.rng.integers(len(texts))]
            b = pool[self.rng.integers(len(pool))]
            if a == b:
                continue
            p = (a, b) if a < b else (b, a)
            if p not in self.asked_pairs:
                self.asked_pairs.add(p)
                out.append(p)
        return out

    def _buffer(self):
        if self.cfg.reward_model == "classification":
            texts = list(self.lab_texts)
            return self.model.buffer_from(encode_messages(texts), np.array([self.lab_texts[t] for t in texts]))
        keys = list(self.pairs)
        return self.model.buffer_from(encode_messages([a for a, _ in keys]), encode_messages([b for _, b in keys]),
                                      np.array([self.pairs[k] for k in keys], np.float32))


def make_trainer(cfg, env, client, log_fn=None, log_every: int = 1, network=None, overlap: bool = False,
                 seed: int = 0):
    """PPO's host trainer (:func:`agents.ppo.make_trainer` with ``env``) running ONI on host env ``env`` (whose
    observations include ``message``). ``cfg`` has PPO's and :class:`ONIOptions`' fields. Usable as
    ``run_experiment``'s make_trainer."""
    if "message" not in env.observation_spec():
        raise ValueError("ONI needs message observations: the env's observation_spec() has no 'message' key "
                         "(for NetHack pools include 'message' in obs_keys)")
    reward = make_reward(cfg)
    loop = ONILoop(cfg, reward, client, seed)
    trainer = ppo.make_trainer(cfg, reward, log_fn, log_every, env=env, network=network, overlap=overlap,
                               host_hook=loop)
    trainer.oni_loop = loop
    return trainer
