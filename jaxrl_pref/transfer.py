"""Host <-> device traffic of the host loop: one transfer each way per step.

A NetHack/MiniHack observation is a dict of small arrays (glyphs, blstats, message...); handing the dict to a jitted
function moves it key by key, and fetching ``(action, log_prob, value)`` brings each back separately. On an
accelerator each is a round trip. :class:`ObsPacker` packs the observation dict into one ``uint8`` buffer
``[B, nbytes]`` on the host (a memcpy per key), which goes up in one transfer and is split back into typed arrays
inside the jitted call (slices and bitcasts: free after compilation). :func:`pack_outputs` /
:func:`unpack_outputs` do the same for the way back: the action, its log-probability and the value in one
``float32 [3, B]`` array (the action's int32 bits carried as float32 bits).

Dtypes follow JAX's defaults (``jax_enable_x64`` off): 8-byte ints and floats are narrowed to 4 bytes on the host,
exactly as ``jnp.asarray`` would; bools travel as bytes. Byte order is the host's (little-endian on every platform
JAX supports), and XLA's bitcasts read it the same way.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

_NARROW = {np.dtype(np.int64): np.dtype(np.int32), np.dtype(np.uint64): np.dtype(np.uint32),
           np.dtype(np.float64): np.dtype(np.float32)}


def device_dtype(dtype) -> np.dtype:
    """The dtype an array of ``dtype`` has on the device with ``jax_enable_x64`` off."""
    d = np.dtype(dtype)
    return d if jax.config.jax_enable_x64 else _NARROW.get(d, d)


class ObsPacker:
    """Packs ``{key: [B, *shape] array}`` into one ``uint8 [B, nbytes]`` buffer and back (see module doc).

    ``spec``: ``{key: (shape, dtype)}`` per env (a host env's ``observation_spec()``). :meth:`pack` runs on the
    host (numpy); :meth:`unpack` is jittable and accepts any leading axes (``[B, width]`` or ``[T, B, width]``).
    ``tail_bytes``: extra bytes per row after the observation (e.g. the step's PRNG key and a recurrent policy's
    reset flag), so they travel in the same transfer; :meth:`tail` reads them back.
    """

    def __init__(self, spec: Mapping[str, tuple], tail_bytes: int = 0):
        self.fields = []  # (key, shape, device dtype, byte offset, byte count)
        off = 0
        for k, (shape, dtype) in spec.items():
            d = device_dtype(dtype)
            n = int(np.prod(shape, dtype=np.int64)) * d.itemsize
            self.fields.append((k, tuple(int(s) for s in shape), d, off, n))
            off += n
        self.nbytes = off  # the observation's bytes per env
        self.width = off + tail_bytes

    def pack(self, obs: Mapping[str, np.ndarray], tail: np.ndarray | None = None) -> np.ndarray:
        """``uint8 [B, width]``; ``tail``: ``uint8 [B, tail_bytes]`` (zeros when None)."""
        b = next(iter(obs.values())).shape[0]
        out = np.empty((b, self.width), np.uint8)
        if self.width > self.nbytes:
            out[:, self.nbytes:] = 0 if tail is None else tail
        for k, shape, d, off, n in self.fields:
            x = np.asarray(obs[k])
            if x.shape[1:] != shape:
                raise ValueError(f"ObsPacker.pack: obs[{k!r}] has shape {x.shape[1:]} per env, the spec says {shape}")
            out[:, off:off + n] = np.ascontiguousarray(x, dtype=d).reshape(b, n // d.itemsize).view(np.uint8)
        return out

    def tail(self, buf: jax.Array) -> jax.Array:
        """The tail bytes of packed rows ``[..., width] -> [..., tail_bytes]``."""
        return buf[..., self.nbytes:]

    def unpack(self, buf: jax.Array) -> dict:
        lead = buf.shape[:-1]
        out = {}
        for k, shape, d, off, n in self.fields:
            raw = buf[..., off:off + n]
            if d == np.bool_:
                x = raw != 0
            elif d.itemsize == 1:
                x = jax.lax.bitcast_convert_type(raw, d)
            else:
                x = jax.lax.bitcast_convert_type(raw.reshape(lead + (n // d.itemsize, d.itemsize)), d)
            out[k] = x.reshape(lead + shape)
        return out


def pack_outputs(action: jax.Array, log_prob: jax.Array, value: jax.Array) -> jax.Array:
    """``float32 [2 + K, B]``: the int32 action's bits, its log-probability and the value (``[B]``, K = 1) or values
    (``[B, K]``, one per value head) (inside jit)."""
    bits = jax.lax.bitcast_convert_type(action.astype(jnp.int32), jnp.float32)
    value = value.astype(jnp.float32)
    return jnp.concatenate([jnp.stack([bits, log_prob.astype(jnp.float32)]),
                            value[None] if value.ndim == 1 else value.T])


def unpack_outputs(host: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The host side of :func:`pack_outputs`: ``(action int32, log_prob, value)`` from the fetched array (the value
    ``[B]``, or ``[B, K]`` for K value heads)."""
    host = np.asarray(host)
    return host[0].view(np.int32), host[1], host[2] if host.shape[0] == 3 else host[2:].T
