"""Keepalives the Hub itself sends on a relayed stream whose agent is silent.

The caller's idle stream must not be cut by a proxy or load balancer in
between, whatever the agent does: the Hub's own ``exec.keepalive_s`` rules
(an agent's own keepalives pass through as any message, and reset the wait).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


async def with_keepalives(responses: AsyncIterator[T], *, interval_s: float, keepalive: Callable[[], T],
                          last: Callable[[T], bool] = lambda _: False) -> AsyncGenerator[T, None]:
    """``responses``, with ``keepalive()`` in between whenever none came for
    ``interval_s`` since the first (which the contract says is ``started``
    for Exec; before it the agent's own keepalives are all) and until the
    ``last`` one (``exit_status``: nothing follows it, though the call may go
    on a moment, waiting for the caller's half-close). Each step of
    ``responses`` runs in a task of its own (so the wait can time out without
    cutting it); ending early cancels the pending step and closes ``responses``."""
    pending: asyncio.Future[T] | None = None
    first, ended = True, False
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(responses))
            done, _ = await asyncio.wait({pending}, timeout=None if first or ended else interval_s)
            if not done:
                yield keepalive()
                continue
            step, pending = pending, None
            try:
                response = step.result()
            except StopAsyncIteration:
                return
            first = False
            ended = ended or last(response)
            yield response
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):  # its own end (CancelledError, the call's status)
                await pending
        aclose = getattr(responses, "aclose", None)
        if aclose is not None:
            await aclose()
