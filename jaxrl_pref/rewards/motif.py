"""Motif's reward model: a Bradley-Terry message reward trained offline on annotated pairs, then frozen.

Motif (Klissarov et al., 2023) learns ``r(message)`` once, from an annotator's preferences over pairs of messages
of a fixed dataset, normalises it with the dataset's statistics and pays, during RL::

    r_int = 1[z(m) > eps] * z(m) / N(m) ** beta,     z(m) = (r(m) - mean) / std

(the threshold and the count decay are :class:`~jaxrl_pref.rewards.shaping.ShapedIntrinsic`'s). Here:

* :func:`fit` trains :class:`~jaxrl_pref.rewards.ranking.Ranking`'s network on the pairs with its jitted update,
  one epoch (``ceil(n / batch_size)`` Adam steps) per call, until the train loss stops improving or ``epochs``;
  it reports train and held-out pair accuracy;
* :func:`normalisation` computes ``mean``, ``std`` and ``eps`` over the dataset: count-weighted, i.e. over its
  *steps*, leaving out the empty message (never paid: ShapedIntrinsic zeroes it); ``eps`` is the ``quantile`` of
  ``z`` over those steps;
* :class:`FrozenRanking` is the reward model PPO uses: its state is the frozen parameters and ``mean`` / ``std``;
  ``update`` changes nothing and reports them;
* :func:`save` / :func:`load`: ``model.msgpack`` (the parameters, ``flax.serialization``) and ``model.json``
  (statistics, threshold, accuracies, what it was trained on).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_pref.rewards.classification import MessageNet, score_unique
from jaxrl_pref.rewards.ranking import Ranking
from envs.messages import MESSAGE_LEN, encode_messages

MODEL_FILE, STATS_FILE = "model.msgpack", "model.json"


def file_sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_atomic(path, data: bytes) -> None:
    """Writes ``path`` whole or not at all (a crash leaves the old file or none, never half of one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def net_config(net: MessageNet) -> dict:
    return {"dim": net.dim, "hidden": net.hidden, "max_len": net.max_len}


@dataclasses.dataclass
class FitResult:
    params: dict
    epochs: int
    train_loss: float
    train_acc: float
    heldout_acc: float       # NaN when no decided held-out pair
    n_train: int
    n_heldout: int
    history: list            # per epoch: (train loss, train acc, held-out acc)


def split_pairs(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, heldout)`` of ``n`` pairs: a random ``holdout`` fraction held out (at least one pair is
    kept for training)."""
    perm = np.random.default_rng(seed).permutation(n)
    k = min(int(round(holdout * n)), n - 1) if n else 0
    return np.sort(perm[k:]), np.sort(perm[:k])


def pair_accuracy(r_a: np.ndarray, r_b: np.ndarray, pref: np.ndarray) -> float:
    """Fraction of decided pairs (pref != 0.5) the rewards order as ``pref`` says (NaN if none is decided)."""
    decided = pref != 0.5
    if not decided.any():
        return float("nan")
    return float(((r_a > r_b) == (pref > 0.5))[decided].mean())


def fit(a: Sequence[str], b: Sequence[str], pref: np.ndarray, *, seed: int = 0, holdout: float = 0.2,
        epochs: int = 300, patience: int = 20, tol: float = 1e-4, batch_size: int = 128,
        learning_rate: float = 3e-3, net: Optional[MessageNet] = None, log=None) -> FitResult:
    """Bradley-Terry on pairs ``(a[i], b[i], pref[i])`` (pref = P(a preferred)): a random ``holdout`` fraction is
    held out, the rest trained on, one epoch per jitted call, until the full train loss has not improved by
    ``tol`` for ``patience`` epochs (or ``epochs``). ``log(epoch, loss, train_acc, heldout_acc)`` is called each
    epoch."""
    pref = np.asarray(pref, np.float32)
    n = len(pref)
    if n == 0:
        raise ValueError("no answered pairs to train the Motif reward model on")
    tr, ho = split_pairs(n, holdout, seed)
    ea, eb = encode_messages(a), encode_messages(b)
    steps = max(1, math.ceil(len(tr) / batch_size))
    model = Ranking(capacity=len(tr), steps=steps, batch_size=batch_size, learning_rate=learning_rate, net=net)
    key_init, key = jax.random.split(jax.random.PRNGKey(seed))
    state = {**jax.jit(model.init)(key_init), "data": model.buffer_from(ea[tr], eb[tr], pref[tr])}
    update = jax.jit(model.update)
    all_idx = jnp.arange(len(tr))

    @jax.jit
    def evaluate(params, data, ha, hb):
        loss, (ra, rb) = model.loss(params, data, all_idx)
        return loss, ra, rb, model.reward(params, ha), model.reward(params, hb)

    ha, hb = jnp.asarray(ea[ho]), jnp.asarray(eb[ho])
    best, since, history, params = np.inf, 0, [], state["params"]
    for epoch in range(1, epochs + 1):
        key, k = jax.random.split(key)
        state, _ = update(state, k)
        loss, ra, rb, rha, rhb = jax.device_get(evaluate(state["params"], state["data"], ha, hb))
        acc, hacc = pair_accuracy(ra, rb, pref[tr]), pair_accuracy(rha, rhb, pref[ho])
        history.append((float(loss), acc, hacc))
        if log is not None:
            log(epoch, float(loss), acc, hacc)
        if loss < best - tol:
            best, since = float(loss), 0
        else:
            since += 1
            if since >= patience:
                break
    loss, acc, hacc = history[-1]
    return FitResult(jax.device_get(state["params"]), len(history), loss, acc, hacc, len(tr), len(ho), history)


@functools.partial(jax.jit, static_argnums=0)
def _apply(net: MessageNet, params, msgs):
    return net.apply(params, msgs)


def rewards(params, texts: Sequence[str], net: Optional[MessageNet] = None, chunk: int = 4096) -> np.ndarray:
    """The model's raw reward ``r(m)`` of each text (host arrays in, out)."""
    net = net if net is not None else MessageNet()
    enc = encode_messages(texts, MESSAGE_LEN)
    out = [np.asarray(_apply(net, params, jnp.asarray(enc[i:i + chunk]))) for i in range(0, len(enc), chunk)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def weighted_quantile(x: np.ndarray, w: np.ndarray, q: float) -> float:
    """The smallest ``x`` at which the cumulative weight (sorted by ``x``) reaches the fraction ``q``."""
    order = np.argsort(x, kind="stable")
    cum = np.cumsum(np.asarray(w, np.float64)[order])
    i = int(np.searchsorted(cum, q * cum[-1], side="left"))
    return float(x[order][min(i, len(x) - 1)])


def normalisation(params, texts: Sequence[str], counts: np.ndarray, quantile: float = 0.5,
                  net: Optional[MessageNet] = None) -> dict:
    """Motif's statistics of the reward over the dataset: count-weighted (over its steps) ``mean`` and ``std`` of
    ``r`` over the non-empty messages, and ``threshold``, the ``quantile`` of ``z = (r - mean) / std`` over those
    steps (messages scoring strictly above it are paid)."""
    keep = np.array([bool(t) for t in texts])
    texts = [t for t, k in zip(texts, keep) if k]
    w = np.asarray(counts, np.float64)[keep]
    if not texts:
        raise ValueError("the Motif dataset has no non-empty message: collect more steps (--motif-steps)")
    r = rewards(params, texts, net).astype(np.float64)
    mean = float(np.average(r, weights=w))
    std = float(np.sqrt(np.average((r - mean) ** 2, weights=w)))
    std = std if std > 1e-6 else 1.0  # one message (or all scored alike): z = r - mean
    z = (r - mean) / std
    thr = weighted_quantile(z, w, quantile)
    paid = z > thr
    return {"mean": mean, "std": std, "threshold": thr, "quantile": quantile,
            "paid_messages": int(paid.sum()), "paid_step_frac": float(w[paid].sum() / w.sum()),
            "messages": len(texts)}


def save(directory, params, info: dict, net: Optional[MessageNet] = None) -> dict:
    """Writes ``model.msgpack`` (parameters) and ``model.json`` (``info`` + the network's config + the msgpack's
    sha256); returns the json's content."""
    directory = Path(directory)
    data = flax.serialization.to_bytes(params)
    write_atomic(directory / MODEL_FILE, data)
    info = {**info, "net": net_config(net if net is not None else MessageNet()),
            "model_sha256": hashlib.sha256(data).hexdigest()}
    write_atomic(directory / STATS_FILE, json.dumps(info, indent=2, sort_keys=True).encode())
    return info


def load(directory, net: Optional[MessageNet] = None):
    """``(params, info)`` saved by :func:`save`; ``ValueError`` if the files do not match (a changed msgpack, another
    network shape)."""
    directory = Path(directory)
    info = json.loads((directory / STATS_FILE).read_text())
    data = (directory / MODEL_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != info.get("model_sha256"):
        raise ValueError(f"{directory / MODEL_FILE} does not match {directory / STATS_FILE} (its sha256 differs)")
    net = net if net is not None else MessageNet(**info["net"])
    if net_config(net) != info["net"]:
        raise ValueError(f"{directory / STATS_FILE} was saved for the network {info['net']}, not {net_config(net)}")
    template = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, MESSAGE_LEN), jnp.uint8))
    params = flax.serialization.from_bytes(template, data)
    if jax.tree.structure(params) != jax.tree.structure(template) or any(
            np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(template))):
        raise ValueError(f"{directory / MODEL_FILE} does not hold the parameters of the network {info['net']}")
    return params, info


class FrozenRanking:
    """The frozen Motif reward model for :class:`~jaxrl_pref.rewards.shaping.ShapedIntrinsic`: ``score`` is the
    normalised reward ``(r(m) - mean) / std``. State: ``{"params", "mean", "std"}``, never changed by ``update``
    (which reports the statistics, so the logs show they stay put)."""
    name = "motif"

    def __init__(self, params, mean: float, std: float, net: Optional[MessageNet] = None):
        self.params, self.mean, self.std = params, float(mean), float(std)
        self.net = net if net is not None else MessageNet()

    def init(self, key):
        return {"params": jax.tree.map(jnp.asarray, self.params), "mean": jnp.float32(self.mean),
                "std": jnp.float32(self.std)}

    def update(self, state, key):
        return state, {"reward_model/frozen_mean": state["mean"], "reward_model/frozen_std": state["std"]}

    def reward(self, params, msgs):
        return self.net.apply(params, msgs)

    def score(self, state, msgs, table):
        r = score_unique(lambda m: self.reward(state["params"], m), msgs)
        return (r - state["mean"]) / state["std"]

    def caption_scores(self, state, captions, labels):
        """:meth:`score` of each message of a static caption table (``uint8[K, L]``), the net run once per caption
        (:class:`~jaxrl_pref.rewards.captioned.CaptionedIntrinsic`; ``labels`` unused: Motif asks nothing during
        RL)."""
        return (self.reward(state["params"], captions) - state["mean"]) / state["std"]


__all__ = ["FitResult", "FrozenRanking", "fit", "normalisation", "rewards", "save", "load", "split_pairs",
           "pair_accuracy", "weighted_quantile", "file_sha", "write_atomic"]
