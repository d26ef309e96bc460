"""Client-side token buckets that keep sandhub inside ECS's published rates.

ECS throttles per account and region: RunTask calls, Fargate task launches
(a burst of 100, then 20 a second; Spot counted apart) and each read API have
their own buckets. Waiting here costs nothing; being throttled by AWS costs a
failed call, a backoff and, for a burst, a storm of retries.

A bucket hands out reservations in arrival order: a caller takes its tokens
at once (the bucket may go into debt) and sleeps until they would have been
there, so a burst is served first come first served without a queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class Bucket:
    """Holds at most ``burst`` tokens, refilled at ``rate_per_s``; 0 = no limit."""

    def __init__(self, *, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s < 0 or (rate_per_s > 0 and burst < 1):
            raise ValueError("rate_per_s must be >= 0, and burst >= 1 when there is a rate")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def reserve(self, n: int = 1) -> float:
        """Takes ``n`` tokens now; returns the seconds to wait before using them."""
        if self.rate_per_s == 0:
            return 0.0
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        self._tokens -= n
        return max(0.0, -self._tokens / self.rate_per_s)

    async def take(self, n: int = 1) -> float:
        """Reserves ``n`` tokens and waits for them; returns how long it waited."""
        wait_s = self.reserve(n)
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        return wait_s


class Limiter:
    """The buckets of one ECS client: one per API operation, and one per kind
    of launch capacity (FARGATE, FARGATE_SPOT; EC2 capacity providers share
    the RunTask bucket only: their limit is the instances' room)."""

    def __init__(self, *, call_rates: dict[str, tuple[float, int]], default_rate: tuple[float, int],
                 launch_rate: tuple[float, int], clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._call_rates = call_rates
        self._default_rate = default_rate
        self._launch_rate = launch_rate
        self._calls: dict[str, Bucket] = {}
        self._launches: dict[str, Bucket] = {}

    def call(self, operation: str) -> Bucket:
        bucket = self._calls.get(operation)
        if bucket is None:
            rate, burst = self._call_rates.get(operation, self._default_rate)
            bucket = self._calls[operation] = Bucket(rate_per_s=rate, burst=burst, clock=self._clock)
        return bucket

    def launches(self, capacity_provider: str) -> Bucket | None:
        """The launch bucket of a Fargate provider; None for EC2 capacity."""
        if capacity_provider not in ("FARGATE", "FARGATE_SPOT"):
            return None
        bucket = self._launches.get(capacity_provider)
        if bucket is None:
            rate, burst = self._launch_rate
            bucket = self._launches[capacity_provider] = Bucket(rate_per_s=rate, burst=burst, clock=self._clock)
        return bucket
