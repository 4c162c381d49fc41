"""Game messages as bytes: NetHack's message buffer form (``uint8[..., MESSAGE_LEN]``, NUL-padded, latin-1), shared by
the NetHack pool, the captioned JAX tasks and the reward models that read messages."""
from __future__ import annotations

from typing import Iterable

import numpy as np

MESSAGE_LEN = 256
"""NetHack's message buffer (bytes)."""
BLANK = (0, 9, 10, 11, 12, 13, 32)
"""NUL and the ASCII whitespace :func:`decode_messages` strips from a message's end."""


def encode_messages(texts: Iterable[str], length: int = MESSAGE_LEN) -> np.ndarray:
    """Texts -> ``uint8[n, length]`` NUL-padded (latin-1, so bytes <-> text is lossless)."""
    bs = [t.encode("latin-1", "replace")[:length] for t in texts]
    out = np.zeros((len(bs), length), np.uint8)
    lens = np.fromiter(map(len, bs), np.int64, len(bs))
    if lens.sum():  # one scatter of all the bytes (a row at a time costs ~1 us per message)
        starts = np.repeat(np.cumsum(lens) - lens, lens)
        out[np.repeat(np.arange(len(bs)), lens), np.arange(len(starts)) - starts] = \
            np.frombuffer(b"".join(bs), np.uint8)
    return out


def decode_messages(msgs: np.ndarray) -> list[str]:
    """``uint8[n, L]`` -> texts (up to the first NUL; trailing ASCII whitespace stripped)."""
    out = []
    strip = bytes(BLANK[1:])
    for row in np.asarray(msgs, np.uint8).reshape(-1, np.shape(msgs)[-1]):
        out.append(row.tobytes().split(b"\x00", 1)[0].rstrip(strip).decode("latin-1"))
    return out
