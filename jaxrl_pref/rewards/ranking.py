"""ONI-Ranking: a scalar reward r(message) from pairwise LLM preferences with the Bradley-Terry model.

Each annotated pair ``(a, b, p)`` says ``a`` is preferred with probability ``p`` (1, 0, or 0.5 for a tie). The
model is trained with ``-[p log s(r(a) - r(b)) + (1 - p) log s(r(b) - r(a))]`` (s = sigmoid), Motif-style, on a
fixed-size buffer of pairs in the reward state, refreshed by the host (ONI's hook keeps the newest ``capacity``
answered pairs in it; :meth:`Ranking.buffer_from` builds one from arrays).

The score is ``r(message) - r(empty message)``: BT rewards are defined up to a constant, so "nothing was said"
is the zero point and the shaping threshold means "better than silence by this much". Include the empty message
in the pairs the learner asks about (the ONI agent does) so that anchor is learned.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_pref.losses import bradley_terry_loss, rpo_penalty
from jaxrl_pref.rewards.classification import MessageNet, score_unique


def bt_loss(ra, rb, pref, weights):
    """Bradley-Terry negative log-likelihood of soft preferences ``pref`` = P(a preferred over b), ``weights``-weighted
    (:func:`~jaxrl_pref.losses.bradley_terry_loss` of ``r(a) - r(b)``)."""
    return bradley_terry_loss(ra - rb, pref, weights)


class Ranking:
    name = "ranking"

    def __init__(self, capacity: int = 8192, message_len: int = 256, steps: int = 2, batch_size: int = 128,
                 learning_rate: float = 3e-3, net: MessageNet | None = None, rpo_coef: float = 0.0):
        self.capacity, self.message_len, self.steps, self.batch_size = capacity, message_len, steps, batch_size
        self.net = net if net is not None else MessageNet()
        self.tx = optax.adam(learning_rate)
        self.rpo_coef = rpo_coef

    def empty_data(self) -> dict:
        z = jnp.zeros((self.capacity, self.message_len), jnp.uint8)
        return {"a": z, "b": z, "pref": jnp.zeros((self.capacity,), jnp.float32),
                "valid": jnp.zeros((self.capacity,), bool)}

    def buffer_from(self, a: np.ndarray, b: np.ndarray, pref: np.ndarray) -> dict:
        a, b, pref = np.asarray(a)[-self.capacity:], np.asarray(b)[-self.capacity:], np.asarray(pref)[-self.capacity:]
        n = len(pref)
        out = {}
        for k, v in (("a", a), ("b", b)):
            buf = np.zeros((self.capacity, self.message_len), np.uint8)
            buf[:n, :v.shape[1]] = v[:, :self.message_len]
            out[k] = jnp.asarray(buf)
        p = np.zeros(self.capacity, np.float32)
        p[:n] = pref
        out["pref"], out["valid"] = jnp.asarray(p), jnp.asarray(np.arange(self.capacity) < n)
        return out

    def init(self, key):
        params = self.net.init(key, jnp.zeros((1, self.message_len), jnp.uint8))
        return {"params": params, "opt": self.tx.init(params), "data": self.empty_data()}

    def reward(self, params, msgs):
        return self.net.apply(params, msgs)

    def loss(self, params, data, idx):
        ra = self.reward(params, data["a"][idx])
        rb = self.reward(params, data["b"][idx])
        return bt_loss(ra, rb, data["pref"][idx], data["valid"][idx].astype(jnp.float32)), (ra, rb)

    def update(self, state, key, policy=None):
        """``steps`` Adam steps of the Bradley-Terry loss on minibatches of pairs. ``policy`` (``{"msgs":
        uint8[M, L], "weight": f32[M]}``, the messages the current policy produced) with ``rpo_coef`` > 0 adds RPO's
        penalty: ``rpo_coef * (policy's weighted mean reward - the mean reward of the minibatch's messages)``
        (:func:`~jaxrl_pref.losses.rpo_penalty`; BT rewards are defined up to a constant, the difference is not)."""
        data = state["data"]
        n = data["valid"].sum()
        p = data["valid"].astype(jnp.float32) / jnp.maximum(n, 1)
        rpo = policy is not None and self.rpo_coef > 0

        def objective(params, idx):
            l, (ra, rb) = self.loss(params, data, idx)
            if not rpo:
                return l, (l, ra, rb, 0.0)
            w = data["valid"][idx].astype(jnp.float32)
            pen = rpo_penalty(self.reward(params, policy["msgs"]), policy["weight"], jnp.concatenate([ra, rb]),
                              jnp.concatenate([w, w]))
            return l + self.rpo_coef * pen, (l, ra, rb, pen)

        def step(carry, k):
            params, opt = carry
            idx = jax.random.choice(k, self.capacity, (self.batch_size,), p=jnp.where(n > 0, p, 1.0 / self.capacity))
            (_, (l, ra, rb, pen)), g = jax.value_and_grad(objective, has_aux=True)(params, idx)
            upd, opt = self.tx.update(g, opt, params)
            pref = data["pref"][idx]
            decided = (pref != 0.5).astype(jnp.float32)
            acc = (((ra > rb) == (pref > 0.5)) * decided).sum() / jnp.maximum(decided.sum(), 1.0)
            return (optax.apply_updates(params, upd), opt), (l, acc, pen)

        (params, opt), (l, acc, pen) = jax.lax.scan(step, (state["params"], state["opt"]),
                                                    jax.random.split(key, self.steps))
        params = jax.tree.map(lambda a, b: jnp.where(n > 0, a, b), params, state["params"])
        metrics = {"reward_model/loss": l.mean(), "reward_model/train_acc": acc.mean(),
                   "reward_model/examples": n.astype(jnp.float32)}
        if rpo:
            metrics["reward_model/rpo_penalty"] = jnp.mean(pen)
        return {**state, "params": params, "opt": opt}, metrics

    def score(self, state, msgs, table):
        empty = jnp.zeros((1, msgs.shape[-1]), msgs.dtype)
        r = score_unique(lambda m: self.reward(state["params"], m), msgs) - self.reward(state["params"], empty)[0]
        return jnp.where(state["data"]["valid"].any(), r, 0.0)  # 0 until the first preference arrives

    def caption_scores(self, state, captions, labels):
        """:meth:`score` of each message of a static caption table (``uint8[K, L]``, row 0 the empty message), the
        net run once per caption (:class:`~jaxrl_pref.rewards.captioned.CaptionedIntrinsic`)."""
        empty = jnp.zeros((1, captions.shape[-1]), captions.dtype)
        r = self.reward(state["params"], captions) - self.reward(state["params"], empty)[0]
        return jnp.where(state["data"]["valid"].any(), r, 0.0)
