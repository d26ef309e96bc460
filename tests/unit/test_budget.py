"""Per-tenant budgets and fair turns (sandhub.budget): no servers needed.
Run output held against its tenant's budget is tested through the relay
(tests/integration/test_agent_relay.py)."""

from __future__ import annotations

import asyncio

import pytest

from sandhub.budget import FairGate, TenantBudget
from sandhub.errors import QuotaExceeded


def budget(per_tenant: int = 3, total: int = 5) -> TenantBudget:
    return TenantBudget(what="things", per_tenant=per_tenant, total=total, tenant_limit="max_things_per_tenant",
                        total_limit="max_things")


def test_a_tenant_over_its_cap_is_refused_naming_the_limit() -> None:
    b = budget()
    b.take("a", 3)
    with pytest.raises(QuotaExceeded) as e:
        b.take("a")
    assert e.value.metadata == {"limit": "max_things_per_tenant"}
    b.take("b", 2)  # another tenant has its own
    with pytest.raises(QuotaExceeded) as e:
        b.take("c")
    assert e.value.metadata == {"limit": "max_things"}
    b.give_back("a", 3)
    with b.hold("c"):
        assert b.used("c") == 1
    assert b.used("c") == 0 and b.used_total == 2


def test_take_upto_takes_what_room_is_left() -> None:
    b = budget(per_tenant=10, total=100)
    assert b.take_upto("a", 7) == 7
    assert b.take_upto("a", 7) == 3
    assert b.take_upto("a", 1) == 0


async def test_fair_gate_gives_the_next_turn_to_another_tenant() -> None:
    gate = FairGate(1)
    order: list[str] = []
    release = asyncio.Event()

    async def call(tenant: str, hold: bool = False) -> None:
        async with gate.turn(tenant):
            order.append(tenant)
            if hold:
                await release.wait()

    first = asyncio.ensure_future(call("a", hold=True))
    await asyncio.sleep(0)
    many = [asyncio.ensure_future(call("a")) for _ in range(10)]
    await asyncio.sleep(0)
    victim = asyncio.ensure_future(call("b"))
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, victim, *many)
    # b waited behind one of a's calls, not behind all ten.
    assert order.index("b") == 2
    assert gate.running == 0


async def test_fair_gate_a_waiter_that_leaves_keeps_no_turn() -> None:
    gate = FairGate(1)
    release = asyncio.Event()

    async def hold() -> None:
        async with gate.turn("a"):
            await release.wait()

    holder = asyncio.ensure_future(hold())
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(hold())
    await asyncio.sleep(0)
    waiter.cancel()
    release.set()
    await holder
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.running == 0
    async with gate.turn("b"):
        assert gate.running == 1


async def test_fair_gate_one_tenant_never_holds_every_turn() -> None:
    """Found in review: with the per-tenant call cap equal to the gate's width,
    8 slow calls of one tenant made another's call wait for them (4.9 s)."""
    gate = FairGate(8)
    release = asyncio.Event()

    async def slow() -> None:
        async with gate.turn("a"):
            await release.wait()

    hogs = [asyncio.create_task(slow()) for _ in range(8)]
    await asyncio.sleep(0)
    assert gate.running == 4  # half the width; the other four of a's wait
    async with asyncio.timeout(1):
        async with gate.turn("b"):
            assert gate.running == 5
    release.set()
    await asyncio.gather(*hogs)
    assert gate.running == 0
