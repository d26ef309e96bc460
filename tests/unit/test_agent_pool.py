"""The Hub's agent channel pool and target check (hub_service.exec.agents)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from hub_service.exec.agents import AgentCalls, AgentChannels, _usable_target


def test_usable_targets_are_the_contracts_two_forms() -> None:
    assert _usable_target("unix:/run/sandhub/c/agent.sock")
    assert _usable_target("10.0.0.7:7070")
    assert _usable_target("[fd00::1]:7070")
    for bad in ("", "unix:relative.sock", "10.0.0.7", "host:port", "a b:1", "x" * 2000 + ":1"):
        assert not _usable_target(bad), bad


async def _closed(calls: AgentCalls) -> bool:
    try:
        await calls.open("Run", timeout=0.05).read()
    except grpc.aio.AioRpcError:
        return False  # open (nobody listens there)
    except (grpc.aio.UsageError, asyncio.CancelledError):  # closed before, or while, the call was made
        return True
    raise AssertionError("a Run to nowhere succeeded")


async def test_the_pool_is_bounded_and_closes_evicted_channels_once_unused() -> None:
    pool = AgentChannels(size=2)
    with pool.lease("unix:/nowhere/a.sock") as held:
        with pool.lease("unix:/nowhere/b.sock"):
            pass
        with pool.lease("unix:/nowhere/c.sock") as newest:  # evicts a, which is still in use
            pass
        assert len(pool) == 2
        await asyncio.sleep(0.01)
        assert not await _closed(held)
    for _ in range(100):  # closed in the background once its call ended
        if await _closed(held):
            break
        await asyncio.sleep(0.01)
    assert await _closed(held)
    assert not await _closed(newest)
    await pool.close()
    assert len(pool) == 0 and await _closed(newest)


@pytest.mark.parametrize("size", [1, 3])
async def test_a_target_in_the_pool_reuses_its_channel(size: int) -> None:
    pool = AgentChannels(size=size)
    with pool.lease("unix:/nowhere/a.sock") as first:
        pass
    with pool.lease("unix:/nowhere/a.sock") as again:
        assert again is first
    await pool.close()
