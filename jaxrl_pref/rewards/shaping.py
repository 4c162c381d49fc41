"""Intrinsic reward from a message reward model, shaped as in the ONI / Motif line of work.

For each step, with ``m`` the message the step produced (``traj.final_obs["message"]``, the observation the
action led to) and ``s(m)`` the reward model's score (:class:`~jaxrl_pref.rewards.retrieval.Retrieval` label,
:class:`~jaxrl_pref.rewards.classification.Classification` probability or
:class:`~jaxrl_pref.rewards.ranking.Ranking` reward)::

    r_int = 1[s(m) > threshold] * s(m) / N(m) ** beta          (0 for the empty message)

``N(m)`` is how often the learner has seen ``m`` so far (counted on the host into the message table, so it
includes the current rollout); ``beta = 0`` turns the decay off. Normalisation (running std) and the intrinsic /
extrinsic coefficients are :class:`~jaxrl_pref.rewards.transform.ScaledSum`'s job; wrap this in it::

    ScaledSum(ShapedIntrinsic(Classification()), ext_coef=10.0, int_coef=0.4)

State: ``{"table": message table arrays, "model": the reward model's state}``. Both are refreshed from the host
between updates (the table's arrays grow with it: ``init``'s ``table_capacity`` is its initial size) (new labels -> table / training buffer); the model's own training (a few optimiser steps) runs
inside the jitted update. Logged terms: ``intrinsic/score`` (raw model output), ``intrinsic/thresholded``,
``intrinsic/decay`` (mean of 1/N^beta), ``intrinsic/reward`` (after shaping), ``intrinsic/active_frac``
(fraction of steps with a non-zero reward), ``intrinsic/known_frac`` (steps whose message has a label).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_pref.rewards.retrieval import MessageTable, lookup


def rpo_enabled(model) -> bool:
    """Whether ``model`` trains with RPO's penalty (:func:`~jaxrl_pref.losses.rpo_penalty`), so its ``update`` takes
    the policy's messages."""
    return getattr(model, "rpo_coef", 0.0) > 0


class ShapedIntrinsic:
    """A :class:`~jaxrl_pref.rewards.transform.RewardTransform` around a message reward model."""

    def __init__(self, model, threshold: float = 0.5, beta: float = 0.5, table_capacity: int = 1 << 16,
                 message_key: str = "message"):
        self.model, self.threshold, self.beta = model, threshold, beta
        self.table_capacity, self.message_key = table_capacity, message_key

    @staticmethod
    def resizable(path: str) -> bool:
        """The message table's arrays change size when it grows: a checkpoint restores them at their saved size."""
        return path.endswith("['table']['rows']")

    def init(self, key, spec):
        # jitted: model init run op by op costs a compile per op (seconds on a busy CPU)
        return {"table": MessageTable.empty_device(self.table_capacity), "model": jax.jit(self.model.init)(key)}

    def update(self, state, traj, key, axis_name=None):
        kw = {}
        if rpo_enabled(self.model):  # RPO's penalty needs the policy's messages: a uniform sample of the rollout's
            key, k = jax.random.split(key)
            msgs = traj.final_obs[self.message_key]
            flat = msgs.reshape((-1, msgs.shape[-1]))
            sel = flat[jax.random.randint(k, (self.model.batch_size,), 0, flat.shape[0])]
            kw["policy"] = {"msgs": sel, "weight": (sel != 0).any(-1).astype(jnp.float32)}  # empty: never paid
        model, metrics = self.model.update(state["model"], key, **kw)
        return {**state, "model": model}, metrics

    def shape(self, score, count, empty):
        kept = jnp.where(score > self.threshold, score, 0.0)
        decay = jnp.maximum(count, 1.0) ** (-self.beta)
        return jnp.where(empty, 0.0, kept * decay), kept, decay

    def __call__(self, state, traj):
        msgs = traj.final_obs[self.message_key]
        score = self.model.score(state["model"], msgs, state["table"])
        label, count, found = lookup(state["table"], msgs)
        return self.reward(score, label, count, found, (msgs == 0).all(-1))

    def reward(self, score, label, count, found, empty):
        """The shaped reward of steps whose messages have model scores ``score``, labels ``label`` (NaN: none),
        counts ``count``, ``found`` in the table, ``empty``; and the logged terms."""
        r, kept, decay = self.shape(score, count, empty)
        metrics = {"intrinsic/score": score.mean(), "intrinsic/thresholded": kept.mean(),
                   "intrinsic/decay": decay.mean(), "intrinsic/reward": r.mean(),
                   "intrinsic/active_frac": (r != 0).mean(), "intrinsic/known_frac": (~jnp.isnan(label) & found).mean()}
        return r, metrics
