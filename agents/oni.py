"""ONI: PPO with an intrinsic reward learned online from LLM (or embedded) feedback on the agent's messages.

Not a copy of PPO: it is PPO's host-loop trainer (:class:`agents.ppo_host.HostTrainer`) with

* a reward transform (the seam of :mod:`jaxrl_pref.rewards.transform`)::

      r = ext_coef * r_ext + int_coef * normalise(ShapedIntrinsic(model))

  where ``model`` is one of the three ONI variants -- ``retrieval`` (labels looked up by message hash in jit),
  ``classification`` (a message classifier trained online with BCE) or ``ranking`` (Bradley-Terry on pairwise
  preferences) -- and :class:`~jaxrl_pref.rewards.shaping.ShapedIntrinsic` applies threshold and count decay;
* a host hook (:class:`ONILoop`) run after every rollout, before its update: it counts the rollout's messages into
  the message table (which grows as needed; ``max_messages`` bounds it), sends messages (or pairs, for ranking)
  never seen before to the annotator through the non-blocking :class:`~jaxrl_pref.annotation.client.AnnotatorClient`,
  takes whatever labels arrived since the last update and loads them into the reward state (table / training
  buffer). The jitted update then takes a few
  reward-model steps, computes the intrinsic reward and runs PPO.

The loop never waits for the annotator: with the service down the intrinsic reward stays as it is and the labels
catch up when it returns. ``python -m experiments.oni`` runs it on NetHack/MiniHack.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import jax.numpy as jnp
import numpy as np

from agents import ppo_host
from envs.messages import decode_messages, encode_messages
from jaxrl_pref.annotation.throttle import Throttle
from jaxrl_pref.config import require
from jaxrl_pref.rewards import ScaledSum
from jaxrl_pref.rewards.classification import Classification
from jaxrl_pref.rewards.ensemble import AGGREGATIONS, Ensemble
from jaxrl_pref.rewards.ranking import Ranking
from jaxrl_pref.rewards.retrieval import MessageTable, Retrieval, message_hash_np, message_key, update_rows
from jaxrl_pref.rewards.shaping import ShapedIntrinsic

REWARD_MODELS = ("retrieval", "classification", "ranking")
METHODS = ("oni", "ellm", "motif")


@dataclasses.dataclass(frozen=True)
class ONIOptions:
    """ONI's intrinsic reward: the reward model, its coefficients and shaping, and its training."""
    method: str = "oni"
    """oni: the annotator labels messages and --reward-model learns from the labels; ellm: ELLM-BoW (the ONI paper's
    cosine-bow baseline): the retrieval model over labels that are each message's bag-of-words cosine similarity to
    the task's goal statement (the bow annotator), zeroed below --threshold (docs/oni.md); motif: Motif, the
    ONI paper's offline baseline: a ranking model trained once on annotated pairs of a random policy's messages,
    then frozen (the --motif-* options; agents/motif.py)."""
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
    """Labelled messages (or pairs, for ranking) the reward model trains on: the newest this many (older labels
    stay in the message table and the label store)."""
    pairs_per_update: int = 32
    """Ranking: new message pairs sent for comparison after each rollout."""
    table_capacity: int = 1 << 16
    """Initial message table slots (a power of two >= 64); the table doubles whenever it is half full (logged;
    the update step recompiles once per doubling), so a run never stops for capacity."""
    max_messages: int = 1 << 22
    """Most distinct messages kept in the message table (34-68 bytes each, on host and on device). Beyond it the
    rarest (lowest count) unlabelled messages are evicted, with a warning; labelled messages never are (the table
    grows past the bound rather than drop a label). 0: no bound."""

    rm_ensemble: int = 1
    """Reward-model ensemble size K (classification, ranking, motif): K members that differ in their initialisation
    and minibatches (and, with --rm-bootstrap < 1, their data), trained vmapped in one jit; the reward is their
    --rm-aggregation (jaxrl_pref/rewards/ensemble.py, docs/guards.md). 1: one model."""
    rm_aggregation: str = "mean"
    """How the ensemble's K scores make one: mean, min (worst case) or lcb (mean - --rm-lcb-coef * std)."""
    rm_lcb_coef: float = 1.0
    """lam of --rm-aggregation lcb: mean - lam * std over the members."""
    rm_bootstrap: float = 1.0
    """Fraction of the training rows (labelled messages, pairs) each ensemble member trains on, drawn per member
    (1: all, the members differ by their seeds only)."""
    rpo_coef: float = 0.0
    """RPO's reward penalty (docs/guards.md): the online reward model (classification, ranking) also minimises
    rpo_coef * (its mean reward on the current policy's messages - its mean on the labelled data), lowering what the
    policy does more often than the labels cover. 0: off."""

    def __post_init__(self):
        self.validate_oni()

    def validate_oni(self) -> None:
        require(self.method in METHODS, "method", f"unknown method {self.method!r}", f"use one of {', '.join(METHODS)}")
        require(self.reward_model in REWARD_MODELS, "reward_model", f"unknown model {self.reward_model!r}",
                f"use one of {', '.join(REWARD_MODELS)}")
        for f in ("int_coef", "ext_coef", "count_beta"):
            require(getattr(self, f) >= 0, f, f"must be >= 0, got {getattr(self, f)}", f"pass --{f.replace('_', '-')} 0 or more")
        for f in ("rm_steps", "rm_batch_size", "rm_learning_rate", "rm_capacity", "pairs_per_update"):
            require(getattr(self, f) > 0, f, f"must be > 0, got {getattr(self, f)}", f"pass a positive --{f.replace('_', '-')}")
        require(self.rm_ensemble >= 1, "rm_ensemble", f"must be >= 1, got {self.rm_ensemble}",
                "pass --rm-ensemble 1 (one model) or e.g. 5")
        require(self.rm_aggregation in AGGREGATIONS, "rm_aggregation", f"unknown aggregation {self.rm_aggregation!r}",
                f"use one of {', '.join(AGGREGATIONS)}")
        require(self.rm_lcb_coef >= 0, "rm_lcb_coef", f"must be >= 0, got {self.rm_lcb_coef}", "pass e.g. --rm-lcb-coef 1")
        require(0 < self.rm_bootstrap <= 1, "rm_bootstrap", f"must be in (0, 1], got {self.rm_bootstrap}",
                "pass e.g. --rm-bootstrap 0.8 (or 1: every member sees every row)")
        require(self.rpo_coef >= 0, "rpo_coef", f"must be >= 0, got {self.rpo_coef}", "pass --rpo-coef 0 (off) or more")
        learned = self.method == "motif" or (self.method == "oni" and self.reward_model != "retrieval")
        require(self.rm_ensemble == 1 or learned, "rm_ensemble",
                f"an ensemble needs a learned reward model; --method {self.method} --reward-model {self.reward_model} "
                "looks labels up (retrieval: every member would hold the same table)",
                "pass --reward-model classification or ranking (or --method motif), or --rm-ensemble 1")
        require(self.rpo_coef == 0 or (self.method == "oni" and self.reward_model != "retrieval"), "rpo_coef",
                f"RPO's penalty trains an online reward model; --method {self.method} --reward-model "
                f"{self.reward_model} has none ({'Motif freezes its model' if self.method == 'motif' else 'retrieval looks labels up'})",
                "pass --method oni --reward-model classification or ranking, or --rpo-coef 0")
        require(self.max_messages >= 0, "max_messages", f"must be >= 0, got {self.max_messages}",
                "pass --max-messages 0 (no bound) or more")
        c = self.table_capacity
        require(c >= 64 and c & (c - 1) == 0, "table_capacity", f"must be a power of two >= 64, got {c}",
                "pass e.g. --table-capacity 65536")

    @property
    def effective_threshold(self) -> float:
        if self.threshold != -1.0:
            return self.threshold
        return 0.0 if self.reward_model == "ranking" else 0.5


def make_model(cfg: ONIOptions):
    """The reward model of ``--reward-model``, in an :class:`~jaxrl_pref.rewards.ensemble.Ensemble` of
    ``--rm-ensemble`` members when more than one."""
    if cfg.reward_model == "retrieval":
        return Retrieval()
    kw = dict(capacity=cfg.rm_capacity, steps=cfg.rm_steps, batch_size=cfg.rm_batch_size,
              learning_rate=cfg.rm_learning_rate, rpo_coef=cfg.rpo_coef)
    model = Classification(**kw) if cfg.reward_model == "classification" else Ranking(**kw)
    if cfg.rm_ensemble == 1:
        return model
    return Ensemble(model, cfg.rm_ensemble, cfg.rm_aggregation, cfg.rm_lcb_coef, cfg.rm_bootstrap)


def make_reward(cfg: ONIOptions) -> ScaledSum:
    """The reward transform: ``ext_coef * r_ext + int_coef * normalise(shaped intrinsic)``."""
    shaped = ShapedIntrinsic(make_model(cfg), threshold=cfg.effective_threshold, beta=cfg.count_beta,
                             table_capacity=cfg.table_capacity)
    return ScaledSum(shaped, ext_coef=cfg.ext_coef, int_coef=cfg.int_coef, normalize=cfg.normalize_intrinsic)


class _Ring:
    """The newest ``capacity`` rows of a reward model's training sample (columns as the model's ``data`` buffer), on
    the host and, by :meth:`device`, in the model's device buffer (plus ``valid``), updated in place (only the rows
    written since the last call are sent)."""

    def __init__(self, capacity: int):
        self.capacity, self.written, self.cols = capacity, 0, None
        self._dev, self._changed = None, []

    def extend(self, **cols) -> None:
        n = len(next(iter(cols.values())))
        if self.cols is None:
            self.cols = {k: np.zeros((self.capacity, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in cols.items()}
        idx = (self.written + np.arange(n)) % self.capacity
        for k, v in cols.items():
            self.cols[k][idx[-self.capacity:]] = np.asarray(v)[-self.capacity:]
        self._changed.append(idx[-self.capacity:])
        self.written += n

    def device(self) -> dict:
        host = {**self.cols, "valid": np.arange(self.capacity) < self.written}
        if self._dev is None:
            self._dev = {k: jnp.asarray(v) for k, v in host.items()}
        elif self._changed:
            self._dev = update_rows(self._dev, np.unique(np.concatenate(self._changed)),
                                    lambda src: {k: v[src] for k, v in host.items()})
        self._changed = []
        return self._dev


class ONILoop:
    """The host hook: messages out to the annotator, labels in to the reward state (see the module doc).

    ``client`` is anything with ``submit(messages, pairs)``, ``poll() -> (labels, pairs)`` and ``metrics()``
    (an :class:`~jaxrl_pref.annotation.client.AnnotatorClient`, or an in-process stand-in in tests).

    Per rollout its work is O(rollout), whatever the number of distinct messages so far: the rollout's messages are
    hashed and counted into the :class:`~jaxrl_pref.rewards.retrieval.MessageTable` (vectorised), new ones are the
    ones the table did not hold, only they are decoded and submitted; the device table is updated in place for the
    slots that changed. Memory per distinct message is the table's slot (no per-message Python objects here).

    * **Growth**: the table doubles when half full (said on stderr; the update step recompiles once per doubling);
      a run never stops for capacity. Resuming takes the checkpointed table back at the capacity it had grown to.
    * **Bound** (``max_messages``): beyond it the rarest unlabelled messages are evicted (warned on stderr);
      labelled ones never are (the table exceeds the bound instead, warned). An evicted message seen again is
      new again (the client and the label store ignore a message they already have).
    * **Training sample**: the classifier's labelled messages and the ranking model's pairs are rings of the newest
      ``rm_capacity`` (older labels stay in the table and the label store). Ranking pairs each message of the
      rollout with one from a uniform sample (``PAIR_POOL``, reservoir-sampled) of the messages seen, or the empty
      message.
    """
    PAIR_POOL = 4096
    WARN_EVERY = 60.0

    def __init__(self, cfg: ONIOptions, reward: ScaledSum, client, seed: int = 0, state_key: Optional[str] = None):
        """``state_key``: where ``reward``'s state sits in the runner's reward state (``"base"`` when an exploration
        bonus wraps it, :class:`~jaxrl_pref.rewards.bonus.WithBonus`); ``None``: it is the reward state."""
        self.cfg, self.reward, self.client, self.state_key = cfg, reward, client, state_key
        self.model = reward.intrinsic.model
        self.table = MessageTable(cfg.table_capacity, max_size=cfg.max_messages, on_grow=self._grew)
        self.rng = np.random.default_rng(seed)
        self.pool: list[str] = [""]  # the empty message (the ranking model's zero point) + a sample of the others
        self._pool_seen = 0
        self.asked_pairs: set = set()
        self.examples = _Ring(cfg.rm_capacity)  # classification: labelled messages; ranking: answered pairs
        self.labeled = self.positive = self.unlabeled = self.pairs = 0
        self._data_dirty = False
        self._restored = False
        self._evicted_said = 0
        self._warn_evict, self._warn_over = Throttle(self.WARN_EVERY), Throttle(self.WARN_EVERY)

    def _grew(self, old: int, new: int, size: int) -> None:
        _say(f"message table grew from {old} to {new} slots ({size} distinct messages); the update step recompiles "
             "for the new shape")

    def _restore(self, shaped_state):
        """After a resume the host table is empty but the checkpointed one is not: take it back (counts, labels, the
        capacity it had grown to)."""
        self._restored = True
        t = shaped_state["table"]
        if self.table.size == 0 and MessageTable.device_size(t):
            self.table.load(t)
            lab = self.table.label[self.table.used]
            self.labeled, self.positive = int((~np.isnan(lab)).sum()), int((lab > 0.5).sum())

    def __call__(self, state, traj):
        outer = state.reward_state
        rs = outer if self.state_key is None else outer[self.state_key]
        shaped = rs["model"]
        if not self._restored:
            self._restore(shaped)
        msgs = np.asarray(traj.final_obs["message"])
        msgs = msgs.reshape(-1, msgs.shape[-1])
        h1, h2 = message_hash_np(msgs)
        _, first, counts = np.unique(message_key(h1, h2), return_index=True, return_counts=True)
        uniq = msgs[first]
        is_new = self.table.update(h1[first], h2[first], counts=counts.astype(np.float32))
        new = [t for t in decode_messages(uniq[is_new]) if t]
        self._sample(new)
        if self.cfg.reward_model == "ranking":
            new_pairs = self._pairs(decode_messages(uniq))
            if new_pairs:
                self.client.submit((), new_pairs)
        elif new:
            self.client.submit(new)

        # answers of the task: this learner's, and any other's on a shared store (a message model takes the labels, the
        # ranking model the pairs); a resumed run gets every answer again, at once: loaded in bounded chunks
        labels, pairs = self.client.poll()
        ranking = self.cfg.reward_model == "ranking"
        got = {} if ranking else {t: v for t, v in labels.items() if v is not None}
        self.unlabeled += 0 if ranking else sum(v is None for v in labels.values())
        texts, values = list(got), np.array(list(got.values()), np.float32)
        for i in range(0, len(texts), LOAD_CHUNK):
            self._load_labels(texts[i:i + LOAD_CHUNK], values[i:i + LOAD_CHUNK])
        answered = [(a, b, float(p)) for a, b, p in pairs if p is not None] if ranking else []
        for i in range(0, len(answered), LOAD_CHUNK):
            part = answered[i:i + LOAD_CHUNK]
            self.examples.extend(a=encode_messages([a for a, _, _ in part]),
                                 b=encode_messages([b for _, b, _ in part]),
                                 pref=np.array([p for _, _, p in part], np.float32))
            self.pairs += len(part)
            self._data_dirty = True
        self._warn()

        if self.table.dirty:
            shaped = {**shaped, "table": self.table.device()}
        if self._data_dirty:
            shaped = {**shaped, "model": {**shaped["model"], "data": self.examples.device()}}
            self._data_dirty = False
        rs = {**rs, "model": shaped}
        state = state.replace(reward_state=rs if self.state_key is None else {**outer, self.state_key: rs})
        has_empty = int(self.table.find(*message_hash_np(np.zeros((1, 1), np.uint8)))[0] >= 0)
        metrics = {"labels/labeled": self.labeled, "labels/positive": self.positive,
                   "labels/unlabeled": self.unlabeled, "labels/pairs": self.pairs,
                   "labels/new_this_update": len(got) + len(answered),
                   "messages/distinct_seen": self.table.size - has_empty + self.table.evicted,
                   "messages/new_this_update": len(new), "messages/evicted": self.table.evicted,
                   "messages/table_capacity": self.table.capacity}
        metrics.update(self.client.metrics())
        return state, metrics

    def _load_labels(self, texts: list, values: np.ndarray) -> None:
        enc = encode_messages(texts)
        prev = self.table.set_labels(*message_hash_np(enc), values)
        self.labeled += int(np.isnan(prev).sum())
        self.positive += int((values > 0.5).sum()) - int((prev > 0.5).sum())
        if self.cfg.reward_model == "classification":
            self.examples.extend(bytes=enc, label=values)
            self._data_dirty = True

    def _warn(self) -> None:
        t, bound = self.table, self.cfg.max_messages
        if t.evicted > self._evicted_said:
            n = self._warn_evict.hit(t.evicted - self._evicted_said)
            self._evicted_said = t.evicted
            if n:
                _say(f"WARNING: --max-messages {bound} reached: evicted the {n} rarest unlabelled message(s) since "
                     f"the last warning ({t.evicted} in all; their counts restart if they come back); labelled "
                     "messages are kept")
        if t.over_bound and self._warn_over.hit():
            _say(f"WARNING: the message table holds {t.size} messages, more than --max-messages {bound}: labelled "
                 "messages (and those of the current rollout) are never evicted, so it grows past the bound")

    def _sample(self, new: list) -> None:
        """Keeps ``pool[1:]`` a uniform sample of the (non-empty) messages seen (reservoir sampling)."""
        for t in new:
            self._pool_seen += 1
            if len(self.pool) <= self.PAIR_POOL:
                self.pool.append(t)
            else:
                j = int(self.rng.integers(self._pool_seen))
                if j < self.PAIR_POOL:
                    self.pool[1 + j] = t

    def _pairs(self, texts) -> list[tuple[str, str]]:
        """Up to ``pairs_per_update`` new pairs: each a message of this rollout against one of the pool (a sample
        of the messages seen, and the empty message)."""
        return sample_pairs(self.rng, texts, self.pool, self.asked_pairs, self.cfg.pairs_per_update)


def sample_pairs(rng, texts, pool, asked: set, n: int) -> list[tuple[str, str]]:
    """Up to ``n`` new pairs (``(a, b)`` with ``a < b``, not in ``asked``; added to it), each a random message of
    ``texts`` against a random one of ``pool``; ``4 n`` draws at most. ONI's ranking pairs (:class:`ONILoop`, and
    :class:`agents.oni_captioned.CaptionLoop`)."""
    out = []
    for _ in range(4 * n):
        if len(out) >= n or len(pool) < 2 or not len(texts):
            break
        a = texts[rng.integers(len(texts))]
        b = pool[rng.integers(len(pool))]
        if a == b:
            continue
        p = (a, b) if a < b else (b, a)
        if p not in asked:
            asked.add(p)
            out.append(p)
    return out



LOAD_CHUNK = 1 << 16


def _say(msg: str) -> None:
    print(f"oni: {msg}", file=sys.stderr, flush=True)


def build(cfg: ONIOptions, client, seed: int = 0, state_key: Optional[str] = None) -> tuple[ScaledSum, "ONILoop"]:
    """ONI on a host env, as both :func:`make_trainer` and ``python -m experiments.oni`` wire it: the reward
    transform (:func:`make_reward`) and the host hook that asks ``client`` and trains the reward model
    (:class:`ONILoop`; ``state_key`` as there). PPO's host trainer takes them as ``reward`` and ``host_hook``."""
    reward = make_reward(cfg)
    return reward, ONILoop(cfg, reward, client, seed, state_key=state_key)


def make_trainer(cfg, env, client, log_fn=None, log_every: int = 1, network=None, overlap: bool = False,
                 seed: int = 0):
    """PPO's host trainer (:func:`agents.ppo_host.make_trainer`) running ONI on host env ``env`` (whose
    observations include ``message``). ``cfg`` has PPO's and :class:`ONIOptions`' fields. Usable as
    ``run_experiment``'s make_trainer."""
    if "message" not in env.observation_spec():
        raise ValueError("ONI needs message observations: the env's observation_spec() has no 'message' key "
                         "(for NetHack pools include 'message' in obs_keys)")
    reward, loop = build(cfg, client, seed)
    trainer = ppo_host.make_trainer(cfg, env, reward, log_fn, log_every, network=network, overlap=overlap,
                                    host_hook=loop)
    trainer.oni_loop = loop
    return trainer
