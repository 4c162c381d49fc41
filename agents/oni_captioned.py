"""ONI on captioned JAX envs inside one ``jit``: ``python -m experiments.oni --env MiniGrid-DoorKey-8x8``.

On a captioned task (:mod:`envs.captions`: ``KeyDoor-*``, ``MiniGrid-*``, ``Craftax-*``) every step's message is an id
into a static caption table, so ONI needs no host loop: PPO's jitted chunked loop (:class:`agents.ppo.Trainer`, seeds
vmapped) runs with

* the reward transform ``ScaledSum(CaptionedIntrinsic(model))`` (:func:`make_reward`;
  :mod:`jaxrl_pref.rewards.captioned`): the same three reward models and shaping as ONI on NetHack, with per-id
  labels (NaN: none yet), per-id counts (per seed: they live in each seed's reward state) and, for ranking, the
  answered pairs by id -- all in the device state, checkpointed with it;
* the runner's chunk hook (:class:`CaptionLoop`, every ``--label-sync-every`` updates, between compiled chunks): it
  reads the counts (summed over the seeds), sends the captions seen for the first time by any seed to the annotator
  (their texts from the caption table; ranking: new pairs of seen captions, the empty message included, sampled as
  :class:`agents.oni.ONILoop` samples them), takes the answers that have arrived (the client never waits) and
  writes them into every seed's reward state. One annotator service, one label store, one set of labels for all
  seeds.

Resume: the checkpoint holds the labels, counts and pairs, and the counts at the hook's last exchange; the hook
takes them back from the restored state (the captions seen by then count as asked), and the new client's answers,
which the store delivers again, change nothing (labels by id; a pair already held is skipped). Nothing is asked
twice.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from agents import oni
from envs.captions import CaptionTable
from jaxrl_pref.config import require
from jaxrl_pref.rewards import ScaledSum
from jaxrl_pref.rewards.captioned import CaptionedIntrinsic


@dataclasses.dataclass(frozen=True)
class CaptionedOptions:
    """ONI on captioned JAX envs (KeyDoor-*, MiniGrid-*, Craftax-*: the jitted loop)."""
    label_sync_every: int = 10
    """Updates between two exchanges with the annotator on a captioned JAX env (new captions out, labels in), done
    between compiled chunks (NetHack/MiniHack exchange after every rollout)."""

    def __post_init__(self):
        require(self.label_sync_every > 0, "label_sync_every", f"must be > 0, got {self.label_sync_every}",
                "pass e.g. --label-sync-every 10")


def pair_capacity(cfg: oni.ONIOptions, table: CaptionTable) -> int:
    """Answered pairs the ranking model keeps: ``rm_capacity``, or all pairs of distinct captions if fewer."""
    K = len(table)
    return min(cfg.rm_capacity, K * (K - 1) // 2)


def make_reward(cfg: oni.ONIOptions, table: CaptionTable) -> ScaledSum:
    """``ext_coef * r_ext + int_coef * normalise(CaptionedIntrinsic(model))`` over the caption table ``table``."""
    ranking = cfg.reward_model == "ranking"
    C = pair_capacity(cfg, table) if ranking else 0
    model = oni.make_model(dataclasses.replace(cfg, rm_capacity=C if ranking else len(table)))
    shaped = CaptionedIntrinsic(model, table.bytes, threshold=cfg.effective_threshold, beta=cfg.count_beta,
                                pair_capacity=C)
    return ScaledSum(shaped, ext_coef=cfg.ext_coef, int_coef=cfg.int_coef, normalize=cfg.normalize_intrinsic)


def _put(host: np.ndarray, like) -> jax.Array:
    """``host`` (one seed's) broadcast to ``like``'s shape (the seed axis), placed as ``like`` is: on its devices if
    it is committed to them, else uncommitted (``jit`` keys its cache on that too: a mismatch recompiles the chunk)."""
    x = np.ascontiguousarray(np.broadcast_to(host, like.shape))
    return jax.device_put(x, like.sharding) if like.committed else jax.device_put(x)


class CaptionLoop:
    """The chunk hook (see the module doc): ``hook(state, update, seed_axis=...) -> state``, every ``every`` updates.

    ``client``: anything with ``submit(messages, pairs)`` and ``poll() -> (labels, pairs)`` (an
    :class:`~jaxrl_pref.annotation.client.AnnotatorClient`, or an in-process stand-in). ``state_key``: where the
    reward's state sits in the runner's reward state (``"base"`` under an exploration bonus), None: it is the
    reward state. Ranking: ``pairs_per_update * every`` new pairs per call at most, drawn with a generator seeded by
    ``(seed, update)`` (so a resumed run draws what an uninterrupted one does)."""

    def __init__(self, cfg: oni.ONIOptions, table: CaptionTable, client, seed: int = 0,
                 state_key: Optional[str] = None, every: int = 10):
        self.cfg, self.table, self.client, self.seed, self.state_key = cfg, table, client, seed, state_key
        self.every = every
        K = len(table)
        self.ranking = cfg.reward_model == "ranking"
        self.ids = {t: i for i, t in enumerate(table.texts)}
        self.labels = np.full(K, np.nan, np.float32)
        self.asked = np.zeros(K, bool)
        self.asked[0] = True  # the empty message is never asked about alone
        self.counts = np.zeros(K, np.float32)  # summed over the seeds, at the last call
        self.asked_pairs: set = set()
        C = pair_capacity(cfg, table) if self.ranking else 0
        self.pairs = {"a": np.zeros(C, np.int32), "b": np.zeros(C, np.int32), "pref": np.zeros(C, np.float32),
                      "valid": np.zeros(C, bool)}
        self.held: dict = {}  # answered pair (texts) -> its slot in the ring of the newest C
        self.written = 0
        self.replay = 0  # answers the client will deliver again that the restored ring holds (see __call__)
        self.unlabeled = 0
        self.submitted = 0
        self._restored = False

    # -- the reward state inside the runner's state -----------------------------------------------------------------
    def _get(self, state):
        rs = state.reward_state
        return (rs if self.state_key is None else rs[self.state_key])["model"]

    def _set(self, state, shaped):
        rs = state.reward_state
        inner = rs if self.state_key is None else rs[self.state_key]
        inner = {**inner, "model": shaped}
        return state.replace(reward_state=inner if self.state_key is None else {**rs, self.state_key: inner})

    def _restore(self, shaped) -> None:
        """The host's view from the (possibly restored) state: labels, the counts at the last exchange (what had
        been seen then was asked), pairs."""
        self._restored = True
        K = len(self.table)
        self.labels = np.asarray(shaped["labels"]).reshape(-1, K)[0].copy()
        self.counts = np.asarray(shaped["synced"]).reshape(-1, K)[0].copy()
        self.asked |= self.counts > 0
        if self.ranking:
            C = len(self.pairs["a"])
            self.pairs = {k: np.asarray(v).reshape(-1, C)[0].copy() for k, v in shaped["pairs"].items()
                          if k != "written"}
            for s in np.flatnonzero(self.pairs["valid"]):
                p = (self.table.texts[self.pairs["a"][s]], self.table.texts[self.pairs["b"][s]])
                self.held[p] = int(s)
                self.asked_pairs.add(p)
            self.written = int(np.asarray(shaped["pairs"]["written"]).reshape(-1)[0])  # where the ring goes on
            self.replay = self.written

    def metrics(self) -> dict:
        """Host numbers for the runner to log at the update of the last call: the annotator client's and service's
        (``annotator/*``: connected, labels/s, pending, restarts..., as ONI on NetHack logs them every update)."""
        return getattr(self.client, "metrics", dict)()

    # -- one call between chunks -----------------------------------------------------------------------------------
    def __call__(self, state, update: int, seed_axis: bool = False):
        shaped = self._get(state)
        if not self._restored:
            self._restore(shaped)
        K, texts = len(self.table), self.table.texts
        counts = np.asarray(jax.device_get(shaped["counts"])).reshape(-1, K).sum(0)
        seen = counts > 0
        if self.ranking:
            recent = [texts[i] for i in np.flatnonzero(counts > self.counts)]  # seen since the last call
            pool = [""] + [texts[i] for i in np.flatnonzero(seen) if i]
            n = self.cfg.pairs_per_update * max(self.every, 1)
            new_pairs = oni.sample_pairs(np.random.default_rng([self.seed, update]), recent, pool,
                                         self.asked_pairs, n)
            if new_pairs:
                self.client.submit((), new_pairs)
                self.submitted += len(new_pairs)
        else:
            new = np.flatnonzero(seen & ~self.asked)
            if len(new):
                self.client.submit([texts[i] for i in new])
                self.asked[new] = True
                self.submitted += len(new)
        self.counts = counts

        labels, pairs = self.client.poll()
        changed = False
        if not self.ranking:
            for t, v in labels.items():
                i = self.ids.get(t)
                if v is None:
                    self.unlabeled += 1
                elif i is not None and i > 0 and not self.labels[i] == v:
                    self.labels[i], changed = v, True
        else:
            C = len(self.pairs["a"])
            for a, b, p in pairs:
                ia, ib = self.ids.get(a), self.ids.get(b)
                if p is None or ia is None or ib is None:
                    continue
                if self.replay:  # a resumed run's client delivers the store's answers again, oldest first:
                    self.replay -= 1  # the first `written` of them are in the restored ring already
                    continue
                if (a, b) in self.held:
                    continue
                s = self.written % C
                if self.pairs["valid"][s]:  # the ring is full: the oldest answer makes room (and may be drawn
                    old = (texts[self.pairs["a"][s]], texts[self.pairs["b"][s]])  # again: a resumed run, which
                    self.held.pop(old, None)  # knows only the pairs held, then draws as this one does)
                    self.asked_pairs.discard(old)
                self.pairs["a"][s], self.pairs["b"][s], self.pairs["pref"][s], self.pairs["valid"][s] = ia, ib, p, True
                self.held[(a, b)] = s
                self.written += 1
                changed = True
        shaped = {**shaped, "synced": _put(counts.astype(np.float32), shaped["synced"])}
        if self.ranking and changed:
            pairs = {**self.pairs, "written": np.int32(self.written)}
            shaped = {**shaped, "pairs": {k: _put(v, shaped["pairs"][k]) for k, v in pairs.items()}}
        elif changed:
            shaped = {**shaped, "labels": _put(self.labels, shaped["labels"])}
        return self._set(state, shaped)
