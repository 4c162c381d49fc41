"""ONI-Retrieval: message labels looked up by hash inside ``jit`` (a fixed-size open-addressing table on device).

Messages are NetHack-style byte strings (``uint8[..., L]``, NUL-padded). Each has a 64-bit key made of two
independent 32-bit polynomial hashes of its bytes, computed identically by numpy on the host
(:func:`message_hash_np`) and by JAX in ``jit`` (:func:`message_hash`). The host owns the table
(:class:`MessageTable`: linear probing, at most ``MAX_PROBES`` slots from the home slot, load kept <= 1/2) and
uploads its arrays after it changes; in ``jit`` :func:`lookup` probes the ``MAX_PROBES`` slots in parallel.

Each slot holds a message's label (NaN until annotated; the annotator may also give up -> stays NaN) and how many
times the learner has seen it (for count-based decay). Unknown or unlabeled messages score 0.

:class:`Retrieval` is the reward model: score = label of the message (0 if unknown). It has no parameters; it is
"trained" by the host inserting labels (see :class:`jaxrl_pref.rewards.shaping.ShapedIntrinsic`).
"""
from __future__ import annotations

from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

MAX_PROBES = 16
MESSAGE_LEN = 256
_B1, _B2 = 0x01000193, 0x9E3779B1  # bases of the two polynomial hashes (odd: invertible mod 2^32)


def _powers(base: int, n: int) -> np.ndarray:
    p = np.ones(n, np.uint64)
    for i in range(1, n):
        p[i] = (int(p[i - 1]) * base) & 0xFFFFFFFF
    return p.astype(np.uint32)


_P1, _P2 = _powers(_B1, MESSAGE_LEN), _powers(_B2, MESSAGE_LEN)


def _fmix_np(h):
    h = h.astype(np.uint32)
    h ^= h >> np.uint32(16)
    h = (h.astype(np.uint64) * 0x85EBCA6B).astype(np.uint32)
    h ^= h >> np.uint32(13)
    h = (h.astype(np.uint64) * 0xC2B2AE35).astype(np.uint32)
    h ^= h >> np.uint32(16)
    return h


def _fmix(h):
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def message_hash_np(msgs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two uint32 hashes of ``uint8[..., L]`` messages (host side)."""
    m = np.asarray(msgs, np.uint64)
    L = m.shape[-1]
    h1 = ((m * (_P1[:L].astype(np.uint64) + 1)).sum(-1) & 0xFFFFFFFF).astype(np.uint32)  # +1: wraps like uint32
    h2 = ((m * (_P2[:L].astype(np.uint64) + 3)).sum(-1) & 0xFFFFFFFF).astype(np.uint32)
    return _fmix_np(h1), _fmix_np(h2)


def message_hash(msgs) -> tuple[jax.Array, jax.Array]:
    """Same as :func:`message_hash_np`, in JAX (uint32 arithmetic wraps mod 2^32)."""
    m = msgs.astype(jnp.uint32)
    L = m.shape[-1]
    h1 = (m * (jnp.asarray(_P1[:L]) + jnp.uint32(1))).sum(-1, dtype=jnp.uint32)
    h2 = (m * (jnp.asarray(_P2[:L]) + jnp.uint32(3))).sum(-1, dtype=jnp.uint32)
    return _fmix(h1), _fmix(h2)


def encode_messages(texts: Iterable[str], length: int = MESSAGE_LEN) -> np.ndarray:
    """Texts -> ``uint8[n, length]`` NUL-padded (latin-1, so bytes <-> text is lossless)."""
    texts = list(texts)
    out = np.zeros((len(texts), length), np.uint8)
    for i, t in enumerate(texts):
        b = t.encode("latin-1", "replace")[:length]
        out[i, :len(b)] = np.frombuffer(b, np.uint8)
    return out


def decode_messages(msgs: np.ndarray) -> list[str]:
    """``uint8[n, L]`` -> texts (up to the first NUL; trailing spaces stripped)."""
    out = []
    for row in np.asarray(msgs, np.uint8).reshape(-1, np.shape(msgs)[-1]):
        b = row.tobytes().split(b"\x00", 1)[0]
        out.append(b.decode("latin-1").rstrip())
    return out


class TableFull(RuntimeError):
    pass


class MessageTable:
    """Host-side open-addressing table ``(h1, h2) -> (label, count)``; ``device()`` gives its jit-side arrays."""

    def __init__(self, capacity: int = 1 << 16):
        if capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two, got {capacity}")
        self.capacity = capacity
        self.k1 = np.zeros(capacity, np.uint32)
        self.k2 = np.zeros(capacity, np.uint32)
        self.used = np.zeros(capacity, bool)
        self.label = np.full(capacity, np.nan, np.float32)
        self.count = np.zeros(capacity, np.float32)
        self.size = 0
        self.dirty = True
        self._keys_dirty = True  # keys/labels changed (else only counts did: upload just those)
        self._dev: Optional[dict] = None

    def _slot(self, h1: int, h2: int, insert: bool) -> Optional[int]:
        home = int(_fmix_np(np.array([h1 ^ 0x5BD1E995], np.uint32))[0])
        for j in range(MAX_PROBES):
            s = (home + j) & (self.capacity - 1)
            if not self.used[s]:
                if not insert:
                    return None
                if self.size + 1 > self.capacity // 2:
                    raise TableFull(f"message table full ({self.size} of {self.capacity}); raise its capacity")
                self.used[s], self.k1[s], self.k2[s] = True, h1, h2
                self.size += 1
                self._keys_dirty = True
                return s
            if self.k1[s] == h1 and self.k2[s] == h2:
                return s
        if insert:
            raise TableFull(f"no free slot within {MAX_PROBES} probes; raise the table capacity")
        return None

    def add(self, msgs: np.ndarray, counts: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None) -> int:
        """Inserts messages (``uint8[n, L]``), adding ``counts`` to their counts and setting ``labels`` (NaN keeps
        the stored label). Returns how many were new."""
        h1, h2 = message_hash_np(msgs)
        new = 0
        for i in range(len(h1)):
            before = self.size
            s = self._slot(int(h1[i]), int(h2[i]), True)
            new += self.size - before
            if counts is not None:
                self.count[s] += counts[i]
            if labels is not None and not np.isnan(labels[i]):
                self.label[s] = labels[i]
                self._keys_dirty = True
        self.dirty = True
        return new

    def get(self, msgs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, counts) on the host; NaN / 0 for unknown messages."""
        h1, h2 = message_hash_np(msgs)
        lab, cnt = np.full(len(h1), np.nan, np.float32), np.zeros(len(h1), np.float32)
        for i in range(len(h1)):
            s = self._slot(int(h1[i]), int(h2[i]), False)
            if s is not None:
                lab[i], cnt[i] = self.label[s], self.count[s]
        return lab, cnt

    def device(self) -> dict:
        """The table's arrays on device; after a change of counts only, only the counts are uploaded again."""
        if self._dev is None or self._keys_dirty:
            self._dev = {"k1": jnp.asarray(self.k1), "k2": jnp.asarray(self.k2), "used": jnp.asarray(self.used),
                         "label": jnp.asarray(self.label), "count": jnp.asarray(self.count)}
        elif self.dirty:
            self._dev = {**self._dev, "count": jnp.asarray(self.count)}
        self.dirty = self._keys_dirty = False
        return self._dev

    @staticmethod
    def empty_device(capacity: int = 1 << 16) -> dict:
        return MessageTable(capacity).device()


def lookup(table: dict, msgs) -> tuple[jax.Array, jax.Array, jax.Array]:
    """In jit: ``(label, count, found)`` for ``uint8[..., L]`` messages (label NaN when known but unlabeled)."""
    h1, h2 = message_hash(msgs)
    cap = table["k1"].shape[0]
    home = _fmix(h1 ^ jnp.uint32(0x5BD1E995))
    slots = (home[..., None] + jnp.arange(MAX_PROBES, dtype=jnp.uint32)) & jnp.uint32(cap - 1)
    slots = slots.astype(jnp.int32)
    hit = table["used"][slots] & (table["k1"][slots] == h1[..., None]) & (table["k2"][slots] == h2[..., None])
    found = hit.any(-1)
    s = jnp.take_along_axis(slots, jnp.argmax(hit, -1)[..., None], -1)[..., 0]
    label = jnp.where(found, table["label"][s], jnp.nan)
    count = jnp.where(found, table["count"][s], 0.0)
    return label, count, found


class Retrieval:
    """Score = the annotator's label of the message (0 when unknown or unlabeled). No learned parameters."""
    name = "retrieval"

    def init(self, key):
        return ()

    def update(self, state, key):
        return state, {}

    def score(self, state, msgs, table):
        label, _, _ = lookup(table, msgs)
        return jnp.nan_to_num(label, nan=0.0)
