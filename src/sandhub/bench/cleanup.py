"""Deleting everything a run created, in parallel with bounded concurrency.

Containers are found two ways: the ids the run saw, and the run's label, which
also catches containers whose create answer never arrived (a timeout, or
Ctrl-C while the request was in flight).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from sandhub.bench.target import Target, TargetError


async def delete_all(
    target: Target,
    known_ids: Iterable[str],
    labels: Mapping[str, str],
    *,
    concurrency: int = 32,
    timeout_s: float = 120.0,
    poll_s: float = 0.1,
) -> tuple[list[str], list[str]]:
    """Deletes the containers and waits until they are gone. Returns
    (every id it deleted, ids still not gone after ``timeout_s``, with the
    reason when a delete failed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    slots = asyncio.Semaphore(concurrency)
    deleted: set[str] = set()
    errors: dict[str, str] = {}

    async def delete(cid: str) -> None:
        async with slots:
            try:
                await target.delete(cid)
                errors.pop(cid, None)
                deleted.add(cid)
            except TargetError as e:
                errors[cid] = e.reason

    pending = set(known_ids)
    while True:
        listing_error = ""
        try:
            present = set(await target.alive(labels))
        except TargetError as e:
            present, listing_error = set(), e.reason
        await asyncio.gather(*(delete(cid) for cid in sorted((pending | present) - deleted)))
        pending = set(errors)
        if not present and not pending and not listing_error:
            return sorted(deleted), []
        if loop.time() >= deadline:
            left = [f"{cid}: {errors[cid]}" if cid in errors else f"{cid}: not gone after {timeout_s:g}s"
                    for cid in sorted(present | pending)]
            if listing_error:
                left.append(f"could not list the run's containers: {listing_error}")
            return sorted(deleted), left
        await asyncio.sleep(poll_s)
