"""The open-loop scheduler: job i starts at t0 + i * interval whether or not
earlier ones finished, so a slow system shows as growing latency rather than
as a slower request rate (no coordinated omission)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class ScheduleStats:
    issued: int = 0
    finished: int = 0
    max_lag_s: float = 0.0
    """Largest delay between a job's due time and its start: the client's own
    slowness, or jobs held back by the concurrency cap."""
    in_flight: int = 0
    lags_s: list[float] = field(default_factory=list)


async def open_loop(
    n: int,
    interval_s: float,
    job: Callable[[int], Awaitable[None]],
    *,
    concurrency_cap: int,
    stats: ScheduleStats | None = None,
    on_change: Callable[[ScheduleStats], None] | None = None,
) -> ScheduleStats:
    """Runs ``job(0..n-1)`` on schedule; at most ``concurrency_cap`` run at
    once (a job due while the cap is reached starts as soon as one ends, and
    its lag says so). A job that raises cancels the others and the error
    propagates; jobs are expected to record their own failures instead.
    ``stats`` (given by the caller, so it survives a cancellation) is kept
    up to date as jobs start and end."""
    if n < 0 or interval_s < 0 or concurrency_cap < 1:
        raise ValueError("n and interval must not be negative, the cap must be at least 1")
    loop = asyncio.get_running_loop()
    stats = stats if stats is not None else ScheduleStats()
    slots = asyncio.Semaphore(concurrency_cap)
    changed = on_change or (lambda s: None)

    async def one(i: int, due: float) -> None:
        async with slots:
            lag = max(loop.time() - due, 0.0)
            stats.lags_s.append(lag)
            stats.max_lag_s = max(stats.max_lag_s, lag)
            stats.in_flight += 1
            changed(stats)
            try:
                await job(i)
            finally:
                stats.in_flight -= 1
                stats.finished += 1
                changed(stats)

    t0 = loop.time()
    async with asyncio.TaskGroup() as group:
        for i in range(n):
            due = t0 + i * interval_s
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            group.create_task(one(i, due), name=f"bench-job-{i}")
            stats.issued += 1
    return stats
