"""Ctrl-C and SIGTERM stop a bench the same way: its cleanup runs, then the report."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable

STOPPING = (signal.SIGINT, signal.SIGTERM)


async def until_signalled(work: Awaitable[object]) -> None:
    """Awaits ``work`` in the current task; SIGINT or SIGTERM cancels it, so
    the cleanup under it runs. SIGINT is handled here rather than left to
    asyncio.run, which installs no handler when SIGINT came in ignored (a
    non-interactive shell starts its background jobs so): a bench run by a
    script must still stop, and clean up, when it is sent SIGINT."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in STOPPING:
        loop.add_signal_handler(sig, task.cancel)
    try:
        await work
    finally:
        for sig in STOPPING:
            loop.remove_signal_handler(sig)
