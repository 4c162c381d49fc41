"""Reward-model ensembles with conservative aggregation: a guard against optimising a learned reward's errors.

A learned reward is wrong somewhere; a policy trained on it seeks out where it is wrong in its favour
("overoptimization", reward hacking). An ensemble of ``K`` reward models that differ in their initialisation, in
the order of their minibatches and (``keep < 1``) in the data they see, disagrees most where the data says least;
paying a conservative aggregate of their scores pays less there (Coste et al., 2023: worst-case and
uncertainty-weighted optimisation):

* ``mean``: the members' mean (an ensemble for variance reduction only);
* ``min``: the worst case, the smallest score of any member (WCO);
* ``lcb``: ``mean - lam * std`` over members, a lower confidence bound (UWO; ``lam`` is ``--rm-lcb-coef``).

:class:`Ensemble` wraps any message reward model of this package (``init`` / ``update`` / ``score`` /
``caption_scores``: :class:`~jaxrl_pref.rewards.classification.Classification`,
:class:`~jaxrl_pref.rewards.ranking.Ranking`, :class:`~jaxrl_pref.rewards.motif.FrozenRanking`) and is one itself,
so :class:`~jaxrl_pref.rewards.shaping.ShapedIntrinsic` and
:class:`~jaxrl_pref.rewards.captioned.CaptionedIntrinsic` take it unchanged. Its state is the members' states stacked
on a leading axis of size ``K`` (``vmap``-ed in one ``jit``: one program, not ``K``) and, unstacked, the training
buffer ``data`` that the host fills as for a single model. Members train on the same buffer; with ``keep < 1``
each sees a fixed random subset of its rows (a Bernoulli(``keep``) mask per member and row, the bootstrap of
Osband et al.'s bootstrapped DQN). The caveat of the ensemble literature holds here too: members that share an
error (the annotator's own wrong label, which every member fits) agree on it, and no aggregation removes it.

HERON's trajectory reward model has its own ensemble (:class:`~jaxrl_pref.rewards.preference.PreferenceReward`'s
``ensemble`` option) built on :func:`aggregate`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("mean", "min", "lcb")


def aggregate(scores: jax.Array, how: str, lam: float = 1.0, axis: int = 0) -> jax.Array:
    """The ensemble's score from its members' ``scores`` (members along ``axis``): ``mean``, ``min`` or ``lcb``
    (``mean - lam * std``, the population std over members)."""
    if how == "mean":
        return scores.mean(axis)
    if how == "min":
        return scores.min(axis)
    if how == "lcb":
        return scores.mean(axis) - lam * scores.std(axis)
    raise ValueError(f"unknown aggregation {how!r}: use one of {', '.join(AGGREGATIONS)}")


def bootstrap_masks(size: int, rows: int, keep: float, seed: int = 0) -> jax.Array:
    """``bool[size, rows]``: which rows of the training buffer each member trains on (all with ``keep`` = 1; else
    each row kept with probability ``keep``, independently per member, fixed for the run)."""
    if keep >= 1.0:
        return jnp.ones((size, rows), bool)
    keys = jax.random.split(jax.random.PRNGKey(seed), size)
    return jax.vmap(lambda k: jax.random.bernoulli(k, keep, (rows,)))(keys)


class Ensemble:
    """``size`` copies of the message reward model ``member``, trained and scored together (see the module doc).

    ``states``: the members' initial states stacked on a leading axis (a frozen ensemble: Motif's ``K`` models
    fitted offline); None: ``member.init`` with ``size`` different keys."""

    def __init__(self, member, size: int, aggregation: str = "mean", lam: float = 1.0, keep: float = 1.0,
                 states=None, seed: int = 0):
        if size < 2:
            raise ValueError(f"an ensemble needs 2 or more members, got {size}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        self.member, self.size, self.aggregation, self.lam, self.keep = member, size, aggregation, lam, keep
        self.states, self.seed = states, seed
        self.name = member.name

    def __getattr__(self, attr):
        # the member's buffer layout and helpers (capacity, message_len, empty_data, buffer_from, net, ...)
        if attr in ("member", "__setstate__"):
            raise AttributeError(attr)
        return getattr(self.member, attr)

    def _split(self, state):
        members = {k: v for k, v in state.items() if k != "data"}
        return members, state.get("data")

    def init(self, key):
        if self.states is not None:
            return jax.tree.map(jnp.asarray, self.states)
        states = jax.vmap(self.member.init)(jax.random.split(key, self.size))
        members, data = self._split(states)
        if data is not None:
            members["data"] = jax.tree.map(lambda x: x[0], data)  # one buffer for all members
        return members

    def update(self, state, key, policy=None):
        members, data = self._split(state)
        keys = jax.random.split(key, self.size)

        def one(m, mask, k):
            s = dict(m)
            if data is not None:
                s["data"] = {**data, "valid": data["valid"] & mask}
            kw = {} if policy is None else {"policy": policy}
            s, metrics = self.member.update(s, k, **kw)
            return {n: v for n, v in s.items() if n != "data"}, metrics

        if data is not None:
            masks = bootstrap_masks(self.size, data["valid"].shape[0], self.keep, self.seed)
        else:
            masks = jnp.ones((self.size, 1), bool)
        members, metrics = jax.vmap(one)(members, masks, keys)
        out = dict(members)
        if data is not None:
            out["data"] = data
        metrics = {k: v.mean() for k, v in metrics.items()}
        return out, metrics

    def _per_member(self, state, fn) -> jax.Array:
        """``fn(member state)`` for every member (vmapped; each member's state with the shared buffer)."""
        members, data = self._split(state)
        return jax.vmap(lambda m: fn(m if data is None else {**m, "data": data}))(members)

    def member_scores(self, state, msgs, table) -> jax.Array:
        """``[K, ...]``: each member's score of ``msgs`` (the message hashing is done once, not per member)."""
        return self._per_member(state, lambda s: self.member.score(s, msgs, table))

    def score(self, state, msgs, table):
        return aggregate(self.member_scores(state, msgs, table), self.aggregation, self.lam)

    def member_caption_scores(self, state, captions, labels) -> jax.Array:
        """``[K, C]``: each member's score of each caption of a static table."""
        return self._per_member(state, lambda s: self.member.caption_scores(s, captions, labels))

    def caption_scores(self, state, captions, labels):
        return aggregate(self.member_caption_scores(state, captions, labels), self.aggregation, self.lam)
