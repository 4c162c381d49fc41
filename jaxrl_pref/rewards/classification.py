"""ONI-Classification: message bytes -> P(helpful), trained online with BCE on the annotator's labels.

The model (:class:`MessageNet`) embeds a message as a bag of hashed byte n-grams (bigrams and trigrams: the mean
of learned embeddings over the message's n-grams) followed by an MLP. It is cheap enough to score every step of
a rollout inside ``jit`` and generalises to messages never annotated that share words with annotated ones
("You kill the jackal!" after "You kill the newt!" was labelled).

Training data is a fixed-size buffer of labelled messages held in the reward state (``bytes``, ``label``,
``valid``), filled by the host as labels arrive (ONI's hook keeps the newest ``capacity`` in it, writing new rows in
place; :meth:`Classification.buffer_from` builds one from arrays); ``update`` runs ``steps`` Adam steps on random
minibatches of it, inside ``jit``, between PPO updates. Its size is fixed whatever the number of labels.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_pref.losses import rpo_penalty

NGRAM_BUCKETS = 1 << 13


def ngram_ids(msgs, buckets: int = NGRAM_BUCKETS):
    """Hashed byte bigram and trigram ids ``int32[..., 2L]`` and their mask (n-grams inside the message)."""
    m = msgs.astype(jnp.uint32)
    nonpad = msgs != 0
    b0, b1 = m, jnp.roll(m, -1, -1)
    b2 = jnp.roll(m, -2, -1)
    bi = (b0 * jnp.uint32(0x9E3779B1) ^ b1 * jnp.uint32(0x85EBCA6B)) % jnp.uint32(buckets)
    tri = (b0 * jnp.uint32(0x27D4EB2F) ^ b1 * jnp.uint32(0x165667B1) ^ b2 * jnp.uint32(0xC2B2AE3D)) % jnp.uint32(buckets)
    L = msgs.shape[-1]
    pos = jnp.arange(L)
    m_bi = nonpad & jnp.roll(nonpad, -1, -1) & (pos < L - 1)
    m_tri = m_bi & jnp.roll(nonpad, -2, -1) & (pos < L - 2)
    ids = jnp.concatenate([bi, tri], -1).astype(jnp.int32)
    return ids, jnp.concatenate([m_bi | (nonpad & (pos == 0)), m_tri], -1)


class MessageNet(nn.Module):
    """``uint8[..., L]`` messages -> one logit / score per message."""
    dim: int = 16
    hidden: int = 64
    max_len: int = 96  # NetHack messages rarely exceed this; later bytes are ignored

    @nn.compact
    def __call__(self, msgs):
        msgs = msgs[..., :self.max_len]
        ids, mask = ngram_ids(msgs)
        e = nn.Embed(NGRAM_BUCKETS, self.dim, embedding_init=nn.initializers.normal(0.1))(ids)
        w = mask.astype(jnp.float32)[..., None]
        x = (e * w).sum(-2) / jnp.maximum(w.sum(-2), 1.0)
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)[..., 0]


def score_unique(fn, msgs, max_unique: int = 128):
    """``fn`` applied to each distinct message of ``msgs`` (``uint8[..., L]``) once, broadcast back to ``[...]``.

    A rollout repeats a handful of messages thousands of times: messages are grouped by their 32-bit hash
    (``jnp.unique`` with a static ``size``), the model runs on at most ``max_unique`` of them, and the results are
    gathered back. Rollouts with more distinct messages fall back to scoring every step (``lax.cond``). Two
    different messages in one rollout sharing a 32-bit hash (odds ~ n^2 / 2^33) would share a score.
    """
    from jaxrl_pref.rewards.retrieval import message_hash
    flat = msgs.reshape((-1, msgs.shape[-1]))
    if flat.shape[0] <= max_unique:
        return fn(flat).reshape(msgs.shape[:-1])
    h, _ = message_hash(flat)
    _, first, inv = jnp.unique(h, size=max_unique, fill_value=h[0], return_index=True, return_inverse=True)
    srt = jnp.sort(h)
    n = 1 + (srt[1:] != srt[:-1]).sum()
    out = jax.lax.cond(n <= max_unique, lambda: fn(flat[first])[inv.reshape(-1)], lambda: fn(flat))
    return out.reshape(msgs.shape[:-1])


def bce_loss(logits, labels, weights):
    l = optax.sigmoid_binary_cross_entropy(logits, labels)
    return (l * weights).sum() / jnp.maximum(weights.sum(), 1.0)


class Classification:
    """P(helpful | message); ``state = {"params", "opt", "data": {"bytes", "label", "valid"}}``."""
    name = "classification"

    def __init__(self, capacity: int = 4096, message_len: int = 256, steps: int = 2, batch_size: int = 128,
                 learning_rate: float = 3e-3, net: MessageNet | None = None, rpo_coef: float = 0.0):
        self.capacity, self.message_len, self.steps, self.batch_size = capacity, message_len, steps, batch_size
        self.net = net if net is not None else MessageNet()
        self.tx = optax.adam(learning_rate)
        self.rpo_coef = rpo_coef

    def empty_data(self) -> dict:
        return {"bytes": jnp.zeros((self.capacity, self.message_len), jnp.uint8),
                "label": jnp.zeros((self.capacity,), jnp.float32), "valid": jnp.zeros((self.capacity,), bool)}

    def buffer_from(self, msgs: np.ndarray, labels: np.ndarray) -> dict:
        """Device buffer holding the newest ``capacity`` labelled messages (host arrays in, padded)."""
        msgs, labels = np.asarray(msgs)[-self.capacity:], np.asarray(labels, np.float32)[-self.capacity:]
        n = len(labels)
        b = np.zeros((self.capacity, self.message_len), np.uint8)
        b[:n, :msgs.shape[1]] = msgs[:, :self.message_len]
        lab = np.zeros(self.capacity, np.float32)
        lab[:n] = labels
        return {"bytes": jnp.asarray(b), "label": jnp.asarray(lab), "valid": jnp.asarray(np.arange(self.capacity) < n)}

    def init(self, key):
        params = self.net.init(key, jnp.zeros((1, self.message_len), jnp.uint8))
        return {"params": params, "opt": self.tx.init(params), "data": self.empty_data()}

    def loss(self, params, data, idx):
        logits = self.net.apply(params, data["bytes"][idx])
        return bce_loss(logits, data["label"][idx], data["valid"][idx].astype(jnp.float32)), logits

    def update(self, state, key, policy=None):
        """``steps`` Adam steps of BCE on minibatches of the buffer. ``policy`` (``{"msgs": uint8[M, L], "weight":
        f32[M]}``, the messages the current policy produced) with ``rpo_coef`` > 0 adds RPO's penalty on the
        logits: ``rpo_coef * (policy's weighted mean logit - the minibatch's mean logit)``
        (:func:`~jaxrl_pref.losses.rpo_penalty`)."""
        data = state["data"]
        n = data["valid"].sum()
        p = data["valid"].astype(jnp.float32) / jnp.maximum(n, 1)
        rpo = policy is not None and self.rpo_coef > 0

        def objective(params, idx):
            l, logits = self.loss(params, data, idx)
            if not rpo:
                return l, (l, logits, 0.0)
            pen = rpo_penalty(self.net.apply(params, policy["msgs"]), policy["weight"], logits,
                              data["valid"][idx].astype(jnp.float32))
            return l + self.rpo_coef * pen, (l, logits, pen)

        def step(carry, k):
            params, opt = carry
            idx = jax.random.choice(k, self.capacity, (self.batch_size,), p=jnp.where(n > 0, p, 1.0 / self.capacity))
            (_, (l, logits, pen)), g = jax.value_and_grad(objective, has_aux=True)(params, idx)
            upd, opt = self.tx.update(g, opt, params)
            acc = ((logits > 0) == (data["label"][idx] > 0.5)).mean()
            return (optax.apply_updates(params, upd), opt), (l, acc, pen)

        (params, opt), (l, acc, pen) = jax.lax.scan(step, (state["params"], state["opt"]),
                                                    jax.random.split(key, self.steps))
        # no data yet: keep the initial parameters (an all-masked loss has zero gradient anyway, Adam's state not)
        params = jax.tree.map(lambda a, b: jnp.where(n > 0, a, b), params, state["params"])
        metrics = {"reward_model/loss": l.mean(), "reward_model/train_acc": acc.mean(),
                   "reward_model/examples": n.astype(jnp.float32)}
        if rpo:
            metrics["reward_model/rpo_penalty"] = jnp.mean(pen)
        return {**state, "params": params, "opt": opt}, metrics

    def prob(self, state, msgs):
        return jax.nn.sigmoid(score_unique(lambda m: self.net.apply(state["params"], m), msgs))

    def score(self, state, msgs, table):
        """P(helpful); 0 until the first label arrives (an untrained classifier's ~0.5 is not a label)."""
        return jnp.where(state["data"]["valid"].any(), self.prob(state, msgs), 0.0)

    def caption_scores(self, state, captions, labels):
        """:meth:`score` of each message of a static caption table (``uint8[K, L]``), the net run once per caption
        (:class:`~jaxrl_pref.rewards.captioned.CaptionedIntrinsic`)."""
        p = jax.nn.sigmoid(self.net.apply(state["params"], captions))
        return jnp.where(state["data"]["valid"].any(), p, 0.0)
