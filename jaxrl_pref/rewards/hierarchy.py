"""Hierarchical comparison of trajectories by ranked reward factors (HERON's decision tree), in pure JAX.

Two trajectories (or segments) are compared on the highest-ranked factor; if the (direction-adjusted) difference
is within that factor's margin, the comparison falls through to the next factor, and so on. If every factor falls
through, the pair is a tie. Call it on your own data::

    from jaxrl_pref.rewards.hierarchy import compare, compare_all_pairs, std_margins
    # factors: [B, K] per-trajectory aggregates; order: ranking (factor indices, most important first)
    margins = std_margins(factors, sigma_mult=jnp.array([0.0, 1.0]))
    labels, level = compare_all_pairs(factors, margins, order=(0, 1), directions=jnp.array([1.0, -1.0]))
    # labels[i, j] = +1: i preferred over j, -1: j preferred, 0: tie; level[i, j] = rank position that decided

Labels are int32; ``level`` is the position in ``order`` of the deciding factor, ``len(order)`` for ties.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp


def compare(fa: jax.Array, fb: jax.Array, margins: jax.Array, order: Optional[Sequence[int]] = None,
            directions: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Compares trajectory ``a`` with ``b`` (factor vectors ``[K]``; leading batch axes broadcast).

    Args:
      fa, fb: factor aggregates ``[..., K]``.
      margins: ``[..., K]`` (or ``[K]``) non-negative margins, indexed like the factors (not like ``order``).
        A factor decides only when ``|difference| > margin``; margin 0 means any strict difference decides.
      order: factor indices, most important first (default ``0..K-1``). Factors left out are ignored.
      directions: ``[K]`` +1 where larger is better, -1 where smaller is better (default all +1).

    Returns ``(label, level)``: label +1 if ``a`` is preferred, -1 if ``b`` is, 0 for a tie; level the position in
    ``order`` of the factor that decided (``len(order)`` for a tie).
    """
    fa, fb = jnp.asarray(fa, jnp.float32), jnp.asarray(fb, jnp.float32)
    k = fa.shape[-1]
    order = tuple(range(k)) if order is None else tuple(int(i) for i in order)
    idx = jnp.asarray(order, jnp.int32)
    d = fa - fb
    if directions is not None:
        d = d * jnp.asarray(directions, jnp.float32)
    d = jnp.take(d, idx, axis=-1)
    m = jnp.take(jnp.broadcast_to(jnp.asarray(margins, jnp.float32), jnp.broadcast_shapes(
        jnp.shape(margins), fa.shape)), idx, axis=-1)
    decides = jnp.abs(d) > m
    first = jnp.argmax(decides, axis=-1)  # first True (0 if none; masked below)
    any_ = decides.any(axis=-1)
    sign = jnp.sign(jnp.take_along_axis(d, first[..., None], axis=-1)[..., 0])
    label = jnp.where(any_, sign, 0.0).astype(jnp.int32)
    level = jnp.where(any_, first, len(order)).astype(jnp.int32)
    return label, level


def compare_pairs(fa: jax.Array, fb: jax.Array, margins: jax.Array, order: Optional[Sequence[int]] = None,
                  directions: Optional[jax.Array] = None):
    """:func:`compare` vmapped over a batch of pairs ``fa[p]`` vs ``fb[p]`` (``[P, K]``; margins ``[K]`` or
    ``[P, K]``, e.g. randomised per pair)."""
    margins = jnp.asarray(margins, jnp.float32)
    in_m = 0 if margins.ndim == 2 else None
    fn = lambda a, b, m: compare(a, b, m, order, directions)  # noqa: E731
    return jax.vmap(fn, in_axes=(0, 0, in_m))(fa, fb, margins)


def compare_all_pairs(factors: jax.Array, margins: jax.Array, order: Optional[Sequence[int]] = None,
                      directions: Optional[jax.Array] = None):
    """All ``B x B`` comparisons of ``factors`` ``[B, K]`` in one vmapped call.

    ``margins`` is ``[K]`` (shared) or ``[B, B, K]`` (one per pair, e.g. from :func:`random_margins`). Returns
    ``(labels, levels)``, both ``[B, B]``; ``labels`` is antisymmetric, with zeros on the diagonal.
    """
    margins = jnp.asarray(margins, jnp.float32)
    per_pair = margins.ndim == 3

    def row(fi, m_row):
        inner = jax.vmap(lambda fj, m: compare(fi, fj, m, order, directions), in_axes=(0, 0 if per_pair else None))
        return inner(factors, m_row)

    return jax.vmap(row, in_axes=(0, 0 if per_pair else None))(factors, margins)


def std_margins(factors: jax.Array, sigma_mult: jax.Array | float, mask: Optional[jax.Array] = None):
    """Margins ``sigma_mult * std(factors)`` over the rows of ``[n, K]`` factors (paper: sigma_i = std of factor i
    over the buffer, times a multiplier); ``mask`` ``[n]`` selects the rows that count."""
    f = jnp.asarray(factors, jnp.float32)
    w = jnp.ones(f.shape[:1], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    mean = (f * w[:, None]).sum(0) / n
    var = (jnp.square(f - mean) * w[:, None]).sum(0) / n
    return jnp.sqrt(var) * jnp.asarray(sigma_mult, jnp.float32)


def random_margins(key: jax.Array, margins: jax.Array, shape: Sequence[int], low: float = 0.0,
                   high: float = 2.0) -> jax.Array:
    """Randomised margins: ``margins * U(low, high)`` drawn independently per comparison and factor, shape
    ``(*shape, K)``. The expected margin equals ``margins`` for the default ``[0, 2]``; the randomness makes the
    labels of near-ties noisy instead of deterministic, as HERON's randomised-margin variant does."""
    margins = jnp.asarray(margins, jnp.float32)
    u = jax.random.uniform(key, tuple(shape) + margins.shape[-1:], minval=low, maxval=high)
    return margins * u
