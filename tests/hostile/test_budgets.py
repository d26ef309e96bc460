"""A hostile tenant at its limits, through the real Hub and Orchestrator on the
local backend (root): Watch streams, big Run outputs and concurrent calls are
bounded per tenant (RESOURCE_EXHAUSTED / QUOTA_EXCEEDED naming the limit), the
Hub's memory stays bounded, and another tenant's latency is measured in the same
run against its idle figure.

The attacker is a separate process (tests/hostile/budget_attacker.py) so its
client-side CPU and memory are not counted as the Hub's, which runs here.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from hub_service.server import start_hub
from sandhub.config import ExecLimits
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import Services, auth, hub_config
from tests.integration.test_lifecycle import create, reason_of

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]
A = auth("key-a")
B = auth("key-b")
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
VICTIM_BOUND = 10.0
"""The victim's p50 under attack over its idle p50 that the tests accept. The
goal is 2x, measured 2.0-2.3x at a quiet moment; on this shared 2-core machine
single runs reached 12x, and without the budgets it was 100-400x."""


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Attacker:
    """The attacker process: ready counts once the load is in place, final
    counts when it is stopped."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.ready: dict[str, int] = {}
        self.final: dict[str, int] = {}

    @classmethod
    @asynccontextmanager
    async def running(cls, port: int, mode: str, n: int, arg: str = "", *, ready_s: float = 120.0) -> AsyncIterator[Attacker]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.hostile.budget_attacker", str(port), "key-a", mode, str(n), arg,
            cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        attacker = cls(proc)
        assert proc.stdout is not None and proc.stdin is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), ready_s)
            assert line, "the attacker died before its load was in place"
            attacker.ready = json.loads(line)["ready"]
            yield attacker
            proc.stdin.close()
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            attacker.final = json.loads(line)["final"]
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def p50_ms(call: Callable[[], Awaitable[Any]], n: int = 30) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


class Victim:
    """Tenant B: GetContainer and Run(`ls /`) in its own container."""

    def __init__(self, s: Services, cid: str) -> None:
        self._stub = s.hub_stub
        self._ex = xpb_grpc.ExecServiceStub(s.hub_channel)
        self._cid = cid

    async def get(self) -> None:
        await self._stub.GetContainer(pb.GetContainerRequest(container_id=self._cid), metadata=B)

    async def ls(self) -> None:
        r = await self._ex.Run(xpb.RunRequest(container_id=self._cid, command=xpb.Command(argv=["ls", "/"])),
                               metadata=B)
        assert r.exit_status.exit_code == 0

    async def p50s(self) -> tuple[float, float]:
        return await p50_ms(self.get), await p50_ms(self.ls)


def report(what: str, idle: tuple[float, float], attacked: tuple[float, float]) -> None:
    print(f"\n{what}: victim GetContainer p50 {idle[0]:.2f} -> {attacked[0]:.2f} ms "
          f"({attacked[0] / idle[0]:.1f}x); Run(ls /) p50 {idle[1]:.2f} -> {attacked[1]:.2f} ms "
          f"({attacked[1] / idle[1]:.1f}x)")


def assert_fair(idle: tuple[float, float], attacked: tuple[float, float]) -> None:
    # A floor of 2 ms on the idle figure: sub-millisecond idle calls would make
    # scheduler noise look like a slowdown.
    for before, after in zip(idle, attacked):
        assert after <= VICTIM_BOUND * max(before, 2.0), (idle, attacked)


async def victim(s: Services) -> tuple[Victim, tuple[float, float]]:
    v = Victim(s, (await create(s, md=B)).container_id)
    await v.p50s()  # warm up: first calls connect and load
    return v, await v.p50s()


async def test_watch_streams_are_capped_per_tenant(services: Services) -> None:
    v, idle = await victim(services)
    churn = (await create(services)).container_id
    async with Attacker.running(services.hub.port, "watch", 1000, churn) as attack:
        attacked = await v.p50s()
    report("1000 Watch streams, one container changing", idle, attacked)
    print(f"attacker's watches: {attack.ready}; changes it made: {attack.final.get('events')}")
    limit = services.hub.config.max_watches_per_tenant
    assert attack.ready.get("OK", 0) <= limit
    assert attack.ready.get("RESOURCE_EXHAUSTED", 0) >= 1000 - limit
    assert_fair(idle, attacked)


async def test_big_run_outputs_are_bounded_per_tenant(services: Services) -> None:
    v, idle = await victim(services)
    budget = services.hub.budgets.output
    base = rss_bytes()
    peak_rss, peak_held = base, 0
    # 48 Runs at the largest per-stream cap (2 MiB - 32 KiB, so a reply fits a
    # default client) ask for ~94 MiB together, over the tenant's 64 MiB.
    size = services.hub.config.exec.max_output_bytes
    async with Attacker.running(services.hub.port, "run", 48, str(size)) as attack:
        sampling = True

        async def sample() -> None:
            nonlocal peak_rss, peak_held
            while sampling:
                peak_rss = max(peak_rss, rss_bytes())
                peak_held = max(peak_held, budget.used("tenant-a"))
                await asyncio.sleep(0.02)

        sampler = asyncio.ensure_future(sample())
        attacked = await v.p50s()
        await asyncio.sleep(2)  # a few more waves of the attack
        sampling = False
        await sampler
    report(f"48 concurrent Runs of {size / MiB:.2f} MiB output", idle, attacked)
    print(f"attacker's runs: {attack.final}; Hub RSS +{(peak_rss - base) / MiB:.0f} MiB; "
          f"output held for tenant-a at most {peak_held / MiB:.1f} MiB")
    limit = services.hub.config.exec.max_held_output_bytes_per_tenant
    assert peak_held <= limit
    # Held output is counted once; building and sending the reply copies it
    # about twice more. Far under the +956 MiB this took unbounded.
    assert peak_rss - base <= 4 * limit
    assert attack.final.get("TRUNCATED", 0) + attack.final.get("RESOURCE_EXHAUSTED", 0) > 0
    # Latency is printed, not asserted: the attacker's own processes (its
    # container's CPU) and draining their output load the host, which the
    # Hub's budgets don't govern.


async def test_a_tenant_at_its_call_limit_leaves_others_their_turn(services: Services) -> None:
    v, idle = await victim(services)
    cid = (await create(services)).container_id
    limit = services.hub.config.max_calls_per_tenant
    async with Attacker.running(services.hub.port, "calls", limit, cid) as attack:
        attacked = await v.p50s()
    report(f"{limit} concurrent GetContainer loops (the tenant's limit)", idle, attacked)
    print(f"attacker's calls: {attack.final}")
    assert_fair(idle, attacked)


async def test_calls_past_the_limit_are_refused(services: Services) -> None:
    v, idle = await victim(services)
    cid = (await create(services)).container_id
    async with Attacker.running(services.hub.port, "calls", 400, cid) as attack:
        attacked = await v.p50s()
    report("400 concurrent GetContainer loops", idle, attacked)
    print(f"attacker's calls: {attack.final}")
    assert attack.final.get("RESOURCE_EXHAUSTED", 0) > 0


async def test_orchestrator_caps_watches_per_tenant_behind_any_hub(services: Services) -> None:
    """A Hub that lets 1,000 through (or a second Hub replica) still meets the
    Orchestrator's own per-tenant cap."""
    hub = await start_hub(hub_config(services.orchestrator, max_watches_per_tenant=1000))
    try:
        async with Attacker.running(hub.port, "watch", 200) as attack:
            pass
    finally:
        await hub.stop(0)
    print(f"\nattacker's watches through a lax Hub: {attack.ready}")
    limit = services.orchestrator.config.max_watches_per_tenant
    assert attack.ready.get("OK", 0) == limit
    assert attack.ready.get("RESOURCE_EXHAUSTED", 0) == 200 - limit


async def test_budget_refusals_name_the_limit(services: Services) -> None:
    hub = await start_hub(hub_config(services.orchestrator, max_watches_per_tenant=1, max_calls_per_tenant=1,
                                     exec=ExecLimits(max_held_output_bytes_per_tenant=1)))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}")
    try:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        cid = (await create(services)).container_id
        watch = stub.WatchContainers(pb.WatchContainersRequest(send_initial=True), metadata=A)
        while (await watch.read()).type != pb.WATCH_EVENT_TYPE_SYNCED:
            pass
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.WatchContainers(pb.WatchContainersRequest(), metadata=A).read()
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_of(e.value) == ("QUOTA_EXCEEDED", {"limit": "max_watches_per_tenant"})
        # Another tenant's budget is its own.
        other = stub.WatchContainers(pb.WatchContainersRequest(send_initial=True), metadata=B)
        assert (await other.read()).type == pb.WATCH_EVENT_TYPE_SYNCED
        watch.cancel()
        other.cancel()
        # A Run is refused before it starts when the output budget has no room.
        ex = xpb_grpc.ExecServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ex.Run(xpb.RunRequest(container_id=cid, command=xpb.Command(argv=["true"])), metadata=A)
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_of(e.value) == ("QUOTA_EXCEEDED", {"limit": "max_held_output_bytes_per_tenant"})
        assert hub.budgets.output.used_total == 0 and hub.budgets.exec_calls.used_total == 0
    finally:
        await channel.close()
        await hub.stop(0)
