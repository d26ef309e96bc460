"""The Hub's own keepalives on a relayed stream (hub_service/exec/keepalives.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hub_service.exec.keepalives import with_keepalives


async def test_keepalives_fill_silences_after_the_first_message_only() -> None:
    async def agent() -> AsyncIterator[str]:
        await asyncio.sleep(0.35)  # silent before its first message: nothing of ours goes first
        yield "started"
        await asyncio.sleep(0.35)
        yield "exit"

    got = [m async for m in with_keepalives(agent(), interval_s=0.1, keepalive=lambda: "keepalive")]
    assert got[0] == "started" and got[-1] == "exit"
    assert 2 <= got.count("keepalive") <= 4 and set(got[1:-1]) == {"keepalive"}, got


async def test_leaving_early_ends_the_agent_stream() -> None:
    ended = asyncio.Event()

    async def agent() -> AsyncIterator[str]:
        try:
            yield "started"
            await asyncio.sleep(60)
            yield "never"
        finally:
            ended.set()

    stream = with_keepalives(agent(), interval_s=0.05, keepalive=lambda: "keepalive")
    assert await anext(stream) == "started"
    assert await anext(stream) == "keepalive"
    await stream.aclose()
    assert ended.is_set()


async def test_the_agent_stream_s_error_reaches_the_caller() -> None:
    async def agent() -> AsyncIterator[str]:
        yield "started"
        raise ValueError("agent status")

    stream = with_keepalives(agent(), interval_s=1, keepalive=lambda: "keepalive")
    assert await anext(stream) == "started"
    try:
        await anext(stream)
    except ValueError as e:
        assert str(e) == "agent status"
    else:
        raise AssertionError("the error was swallowed")


async def test_nothing_follows_the_last_message_while_the_call_lingers() -> None:
    async def agent() -> AsyncIterator[str]:
        yield "started"
        yield "exit"
        await asyncio.sleep(0.35)  # the Hub waiting for the caller's half-close

    got = [m async for m in with_keepalives(agent(), interval_s=0.05, keepalive=lambda: "keepalive",
                                            last=lambda m: m == "exit")]
    assert got == ["started", "exit"], got
