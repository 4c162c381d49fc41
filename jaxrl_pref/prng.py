"""JAX's default PRNG (Threefry-2x32) with its hash unrolled in the traced program: the same bits, faster on CPU.

On CPU, JAX lowers every Threefry hash (each ``split``, ``uniform``, ``categorical``...) to an XLA while loop of
five iterations, a dozen small kernels each; on GPU it emits the 20 rounds straight-line. Inside a rollout of
cheap envs the three or four hashes a step needs (the policy's sample, the env step's key splits) cost about as
much as the rest of the step. :data:`IMPL` is a JAX PRNG implementation (``jax.extend.random``) computing exactly
the bits of the default ``threefry2x32`` keys, for either setting of ``jax_threefry_partitionable``, with the
rounds written out as array ops that XLA fuses into one kernel, as it does on GPU.

The trainers pass their rollouts' keys through :func:`unrolled` (``collect(..., prng.unrolled(k_roll), ...)``):
no random stream changes. Runner states and checkpoints keep raw ``uint32[..., 2]`` keys (:func:`raw` converts back),
and the env wrappers hand the wrapped envs raw keys (``envs.wrappers.raw_keys``: xminigrid and Craftax store theirs
in their state). The update keeps the default keys: with the unrolled hash in the update's shuffles the 1-seed
CartPole run measured slower (4.4 s instead of 3.4 s; its CPU time doubled), not faster.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import define_prng_impl, threefry_prng_impl

from envs.wrappers import raw_keys

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(x, r: int):
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 block cipher (20 rounds, Salmon et al. 2011) of counters ``(x1, x2)`` under the key
    ``(k1, k2)`` (uint32 arrays, the counters of one shape), written out round by round."""
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = _rotl(x2, r) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _hash_flat(key, count):
    """JAX's ``threefry_2x32(key, count)``: the flattened counters (padded to even length) split in halves as the
    cipher's two words; the two output words concatenated back to ``count``'s shape."""
    flat = count.ravel()
    n = flat.shape[0]
    if n % 2:
        flat = jnp.concatenate([flat, jnp.zeros((1,), jnp.uint32)])
    half = flat.shape[0] // 2
    y1, y2 = threefry2x32(key[0], key[1], flat[:half], flat[half:])
    return jnp.concatenate([y1, y2])[:n].reshape(count.shape)


def _hash_indices(key, shape):
    """Partitionable mode: the cipher of every element's flat index (as high and low uint32 words) under ``key``."""
    size = math.prod(shape)
    if size >= 2 ** 32:
        raise ValueError(f"jaxrl_pref.prng: {size} random values at once is more than 2**32; draw them in parts")
    return threefry2x32(key[0], key[1], jnp.zeros(shape, jnp.uint32),
                        lax.iota(jnp.uint32, max(size, 1))[:size].reshape(shape))


def _split(key, shape):
    shape = tuple(int(d) for d in shape)
    if jax.config.jax_threefry_partitionable:
        b1, b2 = _hash_indices(key, shape)
        return jnp.stack([b1, b2], axis=b1.ndim)
    num = math.prod(shape)
    return _hash_flat(key, lax.iota(jnp.uint32, num * 2)).reshape((*shape, 2))


def _fold_in(key, data):
    return _hash_flat(key, threefry_prng_impl.seed(jnp.asarray(data, jnp.uint32)))


def _random_bits(key, bit_width, shape):
    if bit_width not in (8, 16, 32, 64):
        raise TypeError("requires 8-, 16-, 32- or 64-bit field width.")
    shape = tuple(int(d) for d in shape)
    dtype = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[bit_width]
    if jax.config.jax_threefry_partitionable:
        b1, b2 = _hash_indices(key, shape)
        if bit_width == 64:
            return (b1.astype(dtype) << dtype(32)) | b2.astype(dtype)
        return (b1 ^ b2).astype(dtype)
    size = math.prod(shape)
    words = -(-bit_width * size // 32)
    if words >= 2 ** 32 - 1:
        raise ValueError(f"jaxrl_pref.prng: {size} random values at once is too many; draw them in parts")
    bits = _hash_flat(key, lax.iota(jnp.uint32, words))
    if bit_width == 64:
        hi, lo = jnp.split(bits, 2)
        return ((hi.astype(dtype) << dtype(32)) | lo.astype(dtype)).reshape(shape)
    if bit_width in (8, 16):  # each 32-bit word's bytes (or halves) in order, lowest first
        per = 32 // bit_width
        shifts = jnp.arange(per, dtype=jnp.uint32)[:, None] * np.uint32(bit_width)
        parts = (bits[None, :] >> shifts) & np.uint32((1 << bit_width) - 1)
        return parts.T.reshape(-1)[:size].astype(dtype).reshape(shape)
    return bits.reshape(shape)


IMPL = define_prng_impl(key_shape=(2,), seed=threefry_prng_impl.seed, split=_split, random_bits=_random_bits,
                        fold_in=_fold_in, name="threefry2x32_unrolled", tag="fru")
"""Threefry-2x32 keys with the hash unrolled: the bits of ``jax.random.PRNGKey``/``key`` keys."""


def unrolled(key):
    """``key`` (raw ``uint32[..., 2]`` data or typed threefry keys) as typed keys of :data:`IMPL`."""
    return jax.random.wrap_key_data(raw_keys(key), impl=IMPL)


raw = raw_keys
"""``raw(key)``: the raw ``uint32[..., 2]`` data of typed keys (as ``jax.random.PRNGKey`` returns and states store);
raw keys unchanged."""
