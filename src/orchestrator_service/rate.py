"""Per-tenant token buckets: how often one tenant may do something costly."""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_IDLE_KEYS = 1024
"""Buckets kept before full ones (idle tenants) are dropped: a full bucket is
the same as no bucket, so forgetting it changes nothing."""


class TokenBuckets:
    """One bucket per key, holding at most ``burst`` tokens and refilled at
    ``rate_per_s`` tokens a second; a rate of 0 means no limit."""

    def __init__(self, *, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s < 0 or (rate_per_s > 0 and burst < 1):
            raise ValueError("rate_per_s must be >= 0, and burst >= 1 when there is a rate")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        """key -> (tokens, when they were counted)."""

    def take(self, key: str) -> float:
        """Takes one token for ``key``: 0.0 when there was one, else the
        seconds until there will be (and nothing is taken)."""
        if self.rate_per_s == 0:
            return 0.0
        now = self._clock()
        tokens, then = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate_per_s)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_s
        if key not in self._buckets and len(self._buckets) >= MAX_IDLE_KEYS:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        full = [k for k, (tokens, then) in self._buckets.items()
                if tokens + (now - then) * self.rate_per_s >= self.burst]
        for k in full:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)
