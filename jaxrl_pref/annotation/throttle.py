"""Reporting a repeated event without flooding: the first time, then at most once per interval."""
from __future__ import annotations

import time
from typing import Optional


class Throttle:
    """``hit()`` counts events and says when to report them: at the first one, then at most once per ``every``
    seconds; it returns how many events the report covers (0: stay quiet)."""

    def __init__(self, every: float):
        self.every = every
        self.last: Optional[float] = None
        self.count = 0

    def hit(self, n: int = 1, now: Optional[float] = None) -> int:
        now = time.monotonic() if now is None else now
        self.count += n
        if self.last is None or now - self.last >= self.every:
            n, self.count, self.last = self.count, 0, now
            return n
        return 0
