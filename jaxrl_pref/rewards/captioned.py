"""ONI's shaped intrinsic reward on captioned JAX envs, all inside ``jit``: messages are ids into a static caption
table (:mod:`envs.captions`), so labels and counts are per-id arrays in the reward state.

:class:`CaptionedIntrinsic` is :class:`~jaxrl_pref.rewards.shaping.ShapedIntrinsic` (the same shaping, threshold,
count decay and logged terms: ``ShapedIntrinsic.reward``) with the message table replaced by arrays indexed by
``traj.info["message_id"]`` (``0`` = no message)::

    r_int[t] = 1[s(m_t) > threshold] * s(m_t) / N(m_t) ** beta          (0 for the empty message, id 0)

``s`` is the model's score of each caption (``model.caption_scores``, computed once per caption per update and
gathered by id: the same numbers ``model.score`` gives for those messages' bytes), ``N`` the per-id count, counted in
``update`` from the rollout's ids (so it includes the current rollout, as the host hook's table does).

State (a pytree, vmapped with the seeds and checkpointed with them)::

    {"labels": f32[K]   (NaN: no label yet; written by the host between chunks),
     "counts": f32[K]   (how often this seed has seen each message; summed over devices when data-parallel),
     "synced": f32[K]   (the host's: the counts, summed over seeds, at its last exchange with the annotator),
     "model":  the reward model's state without its training buffer,
     "pairs":  {"a", "b": i32[C], "pref": f32[C], "valid": bool[C],   (ranking only: answered pairs, by id, in a
                "written": i32}                                       ring of C; ``written``: answers put in so far)}

The models' training buffers are views of these: classification trains on every labelled caption (``bytes`` = the
caption table, ``valid`` = labelled), ranking on the answered pairs (the captions' bytes gathered by id).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_pref.rewards.shaping import ShapedIntrinsic, rpo_enabled


class CaptionedIntrinsic(ShapedIntrinsic):
    """``captions``: ``uint8[K, L]`` bytes of the caption table (row 0 the empty message); ``pair_capacity``: answered
    pairs kept for the ranking model (0 for the others; a Ranking model's ``capacity`` must equal it, a
    Classification model's must equal ``K``)."""

    def __init__(self, model, captions: np.ndarray, threshold: float = 0.5, beta: float = 0.5,
                 pair_capacity: int = 0, message_key: str = "message_id"):
        super().__init__(model, threshold, beta, message_key=message_key)
        self.captions = np.asarray(captions, np.uint8)
        self.num_captions, self.pair_capacity = len(self.captions), pair_capacity
        cap = getattr(model, "capacity", None)
        want = pair_capacity if pair_capacity else self.num_captions
        if cap is not None and cap != want:
            raise ValueError(f"CaptionedIntrinsic: the {model.name} model's capacity is {cap}, its buffer here has "
                             f"{want} rows")

    @staticmethod
    def resizable(path: str) -> bool:
        return False

    def init(self, key, spec):
        model = jax.jit(self.model.init)(key)
        if isinstance(model, dict):
            model = {k: v for k, v in model.items() if k != "data"}  # a view of labels / pairs (see _model_state)
        K = self.num_captions
        state = {"labels": jnp.full((K,), jnp.nan, jnp.float32), "counts": jnp.zeros((K,), jnp.float32),
                 "synced": jnp.zeros((K,), jnp.float32), "model": model}
        if self.pair_capacity:
            C = self.pair_capacity
            state["pairs"] = {"a": jnp.zeros((C,), jnp.int32), "b": jnp.zeros((C,), jnp.int32),
                              "pref": jnp.zeros((C,), jnp.float32), "valid": jnp.zeros((C,), bool),
                              "written": jnp.zeros((), jnp.int32)}
        return state

    def _model_state(self, state):
        """The model's state with its training buffer (a view of the labels, or of the answered pairs)."""
        m = state["model"]
        if not isinstance(m, dict):
            return m  # retrieval: no parameters
        caps = jnp.asarray(self.captions)
        if "pairs" in state:
            p = state["pairs"]
            data = {"a": caps[p["a"]], "b": caps[p["b"]], "pref": p["pref"], "valid": p["valid"]}
        else:
            lab = state["labels"]
            data = {"bytes": caps, "label": jnp.nan_to_num(lab, nan=0.0), "valid": ~jnp.isnan(lab)}
        return {**m, "data": data}

    def count(self, counts, ids, axis_name=None):
        """``counts`` plus how often each id occurs in ``ids`` (over all devices with ``axis_name``)."""
        seen = jnp.zeros((self.num_captions,), jnp.float32).at[ids.reshape(-1)].add(1.0)
        if axis_name is not None:
            seen = jax.lax.psum(seen, axis_name)
        return counts + seen

    def update(self, state, traj, key, axis_name=None):
        counts = self.count(state["counts"], traj.info[self.message_key], axis_name)
        kw = {}
        if rpo_enabled(self.model):  # the policy's captions: this rollout's count of each (the empty one left out)
            kw["policy"] = {"msgs": jnp.asarray(self.captions), "weight": (counts - state["counts"]).at[0].set(0.0)}
        model, metrics = self.model.update(self._model_state(state), key, **kw)
        if isinstance(model, dict):
            model = {k: v for k, v in model.items() if k != "data"}
        return {**state, "counts": counts, "model": model}, metrics

    def scores(self, state):
        """``f32[K]``: the model's score of each caption."""
        return self.model.caption_scores(self._model_state(state), jnp.asarray(self.captions), state["labels"])

    def __call__(self, state, traj):
        ids = traj.info[self.message_key]
        labels, counts = state["labels"], state["counts"]
        count = counts[ids]
        r, metrics = self.reward(self.scores(state)[ids], labels[ids], count, count > 0, ids == 0)
        metrics.update({"labels/labeled": (~jnp.isnan(labels)).sum().astype(jnp.float32),
                        "labels/positive": (labels > 0.5).sum().astype(jnp.float32),
                        "messages/distinct_seen": (counts[1:] > 0).sum().astype(jnp.float32)})
        if "pairs" in state:
            metrics["labels/pairs"] = state["pairs"]["valid"].sum().astype(jnp.float32)
        return r, metrics
