"""A hostile tenant against the Orchestrator's inputs and budgets, on real
servers (local backend, root): label selectors built to make a parser
backtrack, creates that fail or come too fast, io_uring from inside a
container, and two orchestrators sharing one host's uids.

The selector attacker runs as its own process (its client-side CPU must not
count against the servers, which run in the test process); the victim's
latency is measured in the same run, idle and under attack.
"""

from __future__ import annotations

import asyncio
import errno
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator_service.backends.local import sandbox
from orchestrator_service.backends.local.seccomp import syscall_number
from orchestrator_service.rate import TokenBuckets
from orchestrator_service.server import RunningOrchestrator, start_orchestrator
from orchestrator_service.validation import RawCreate
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.rpc import error_reason
from tests.conftest import PrivateNetwork, Services, auth, orchestrator_config, traversable
from tests.container_shell import ContainerShell

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

A = auth("key-a")
B = auth("key-b")
ROOT = Path(__file__).resolve().parents[2]
VICTIM_BOUND = 5.0
"""Victim p50 under attack over idle p50 that the test accepts (the bug made it 100x+)."""

SELECTORS = [
    "a" + " " * 4094 + "i",  # the reported one: ~0.5 s of event-loop CPU per call with the old regex
    "a" + " " * 4094 + "!",
    "!" + " " * 4095,
]

ATTACKER = r"""
import json, sys, threading, time
import grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc as pb_grpc

port, threads, per_thread_rate, selectors = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])
md = (("authorization", "Bearer key-a"),)
counts, lock, stop, ready = {}, threading.Lock(), threading.Event(), threading.Event()

def worker(n):
    stub = pb_grpc.OrchestratorServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    i = n
    while not stop.is_set():
        started = time.monotonic()
        try:
            stub.ListContainers(pb.ListContainersRequest(label_selector=selectors[i % len(selectors)]), metadata=md, timeout=30)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        with lock:
            counts[code] = counts.get(code, 0) + 1
        ready.set()
        i += 1
        stop.wait(max(0.0, 1 / per_thread_rate - (time.monotonic() - started)))

ts = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
for t in ts:
    t.start()
ready.wait(60)
print(json.dumps({"ready": True}), flush=True)
sys.stdin.read()
stop.set()
for t in ts:
    t.join(60)
print(json.dumps({"final": counts}), flush=True)
"""


async def p50_ms(call: object, n: int, pause_s: float = 0.0) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await call()  # type: ignore[operator]
        times.append((time.perf_counter() - start) * 1000)
        await asyncio.sleep(pause_s)
    return statistics.median(times)


async def test_pathological_selectors_do_not_slow_another_tenant(services: Services) -> None:
    victim = (await services.hub_stub.CreateContainer(pb.CreateContainerRequest(wait_until_running=True),
                                                       metadata=B)).container

    async def get() -> None:
        await services.hub_stub.GetContainer(pb.GetContainerRequest(container_id=victim.container_id), metadata=B)

    await p50_ms(get, 10)  # warm up
    idle = await p50_ms(get, 100, 0.02)  # ~2.5 s, as long as the attack below
    # Each selector alone, answered INVALID_ARGUMENT, whatever its shape.
    for selector in SELECTORS:
        start = time.process_time()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await services.hub_stub.ListContainers(pb.ListContainersRequest(label_selector=selector), metadata=A)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(e.value.details() or "") < 1024
        print(f"\nselector {selector[:2]!r}+{len(selector) - 2} chars: {(time.process_time() - start) * 1000:.1f} ms "
              "of this process's CPU (Hub + Orchestrator + client)")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ATTACKER, str(services.hub.port), "4", "20", json.dumps(SELECTORS),
        cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 90))["ready"]
        async with asyncio.timeout(120):  # the old parser took minutes here
            attacked = await p50_ms(get, 100, 0.02)
        proc.stdin.close()
        counts = json.loads(await asyncio.wait_for(proc.stdout.readline(), 90))["final"]
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    print(f"\nselector attack (4 threads x 20/s): victim GetContainer p50 {idle:.2f} -> {attacked:.2f} ms "
          f"({attacked / idle:.1f}x); attacker's answers {counts}")
    assert counts.get("INVALID_ARGUMENT", 0) > 0 and "OK" not in counts and "INTERNAL" not in counts
    assert attacked <= VICTIM_BOUND * max(idle, 2.0), (idle, attacked)


def set_limits(services: Services, **limits: object) -> None:
    """Gives the running Orchestrator other limits (its config is frozen and
    read at start; the fixture is shared, so the test swaps them in place)."""
    containers = services.orchestrator.containers
    containers._limits = replace(containers._limits, **limits)  # type: ignore[arg-type]
    containers._create_rate = TokenBuckets(rate_per_s=containers._limits.create_rate_per_s,
                                           burst=containers._limits.create_burst)


async def test_failed_creates_count_toward_the_quota(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    set_limits(services, max_containers_per_tenant=3)
    # Every sandbox of tenant A fails to start, as when the host ran out of
    # bridge ports: the backend's real failure path (release, then FAILED).
    real_spawn = sandbox.spawn  # the backend calls it through the module

    async def spawn(bwrap: str, box: sandbox.SandboxSpec, **kw: Any) -> Any:
        record = services.orchestrator.containers.backend._records[box.container_id]  # type: ignore[union-attr]
        if record.container.tenant == "tenant-a" and not record.container.labels.get("ok"):
            raise sandbox.SpawnError("no room on this host")
        return await real_spawn(bwrap, box, **kw)

    monkeypatch.setattr(sandbox, "spawn", spawn)
    outcomes: list[str] = []
    for _ in range(8):
        try:
            made = await services.hub_stub.CreateContainer(
                pb.CreateContainerRequest(wait_until_running=True), metadata=A)
            outcomes.append(pb.ContainerState.Name(made.container.state))
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
            outcomes.append(error_reason(e))
    print(f"\n8 creates that fail, quota 3: {outcomes}")
    assert outcomes == ["CONTAINER_STATE_FAILED"] * 3 + ["QUOTA_EXCEEDED"] * 5
    listed = await services.hub_stub.ListContainers(pb.ListContainersRequest(), metadata=A)
    assert len(listed.containers) == 3
    # Tenant B has its own quota; deleting a failed container frees its place.
    ok = await services.hub_stub.CreateContainer(pb.CreateContainerRequest(wait_until_running=True), metadata=B)
    assert ok.container.state == pb.CONTAINER_STATE_RUNNING
    await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=listed.containers[0].container_id), metadata=A)
    again = await services.hub_stub.CreateContainer(
        pb.CreateContainerRequest(labels={"ok": "1"}, wait_until_running=True), metadata=A)
    assert again.container.state == pb.CONTAINER_STATE_RUNNING


async def test_creates_are_rate_limited_per_tenant(services: Services) -> None:
    set_limits(services, create_rate_per_s=2.0, create_burst=3)
    outcomes: list[str] = []
    retry_after = 0.0
    for _ in range(6):
        try:
            await services.hub_stub.CreateContainer(pb.CreateContainerRequest(), metadata=A)
            outcomes.append("OK")
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
            outcomes.append(error_reason(e))
            retry_after = max(retry_after, float(_metadata(e)["retry_after_s"]))
    print(f"\n6 quick creates, burst 3 at 2/s: {outcomes}; retry after {retry_after:.2f}s")
    assert outcomes[:3] == ["OK"] * 3 and "RATE_LIMITED" in outcomes[3:]
    assert 0 < retry_after <= 0.5 + 0.1
    await services.hub_stub.CreateContainer(pb.CreateContainerRequest(), metadata=B)  # B's own bucket
    await asyncio.sleep(retry_after)
    await services.hub_stub.CreateContainer(pb.CreateContainerRequest(), metadata=A)  # as advised


def _metadata(e: grpc.aio.AioRpcError) -> dict[str, str]:
    from google.rpc import error_details_pb2, status_pb2

    for key, value in e.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return dict(info.metadata)
    return {}


IO_URING = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
r = libc.syscall(ctypes.c_long({nr}), ctypes.c_long(1), ctypes.c_long(0))  # params NULL: EFAULT if it got through
print(r, ctypes.get_errno())
"""


async def test_io_uring_is_refused_inside_a_container(services: Services, shell: ContainerShell) -> None:
    made = await services.hub_stub.CreateContainer(pb.CreateContainerRequest(wait_until_running=True), metadata=A)
    script = IO_URING.format(nr=syscall_number("io_uring_setup"))
    reply = await shell.run(made.container.container_id, ["/usr/bin/python3", "-c", script], timeout_s=30)
    out = reply.stdout + reply.stderr
    print(f"\nio_uring_setup in a container: {out.decode().strip()!r}")
    assert reply.exit_status.exit_code == 0, out
    assert reply.stdout.decode().split() == ["-1", str(errno.EPERM)]


async def _create_direct(orch: RunningOrchestrator, tenant: str) -> str:
    raw = RawCreate(image="", cpu_millicores=0, memory_mib=0, pids=0, disk_mib=0, open_files=0, env={}, labels={},
                    ttl_s=0, ports=(), placement="", request_id="")
    c = await orch.containers.create(raw, tenant=tenant, wait_until_running=True)
    assert c.state.value == "RUNNING", c.state_message
    return c.id


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def container_uids(orch: RunningOrchestrator) -> dict[str, int]:
    """Container id -> the host uid its init really runs as."""
    backend = orch.containers.backend
    records = backend._records  # type: ignore[union-attr]
    return {cid: process_uid(r.runtime.init_pid) for cid, r in records.items() if r.container.state.value == "RUNNING"}


@pytest.fixture
async def two_orchestrators(tmp_path: Path) -> AsyncIterator[list[RunningOrchestrator]]:
    traversable(tmp_path)
    nets = [PrivateNetwork.new(), PrivateNetwork.new()]
    orchs = [await start_orchestrator(orchestrator_config(tmp_path / name, net))
             for name, net in zip(("one", "two"), nets)]
    try:
        yield orchs
    finally:
        for orch in orchs:
            for c in await orch.containers.backend.list():  # type: ignore[union-attr]
                if c.state.alive:
                    await orch.containers.delete(c.id, tenant=None, grace_period_s=0)
            for _ in range(250):
                if all(c.state.value not in ("PENDING", "RUNNING", "TERMINATING")
                       for c in await orch.containers.backend.list()):  # type: ignore[union-attr]
                    break
                await asyncio.sleep(0.02)
            await orch.stop(0)
        for net in nets:
            await net.teardown()


async def test_two_orchestrators_on_one_host_never_share_a_uid(two_orchestrators: list[RunningOrchestrator], tmp_path: Path) -> None:
    one, two = two_orchestrators
    for _ in range(3):
        await _create_direct(one, "t")
        await _create_direct(two, "t")
    uids_one, uids_two = container_uids(one), container_uids(two)
    print(f"\nuids: one {sorted(uids_one.values())}, two {sorted(uids_two.values())}")
    assert len(uids_one) == len(uids_two) == 3
    assert not set(uids_one.values()) & set(uids_two.values())
    # One stops (as a crash would, leaving its containers running): the other
    # still never takes their uids; restarted, it adopts them and goes on.
    config_one = one.config
    await one.stop(0)
    for _ in range(3):
        await _create_direct(two, "t")
    assert not set(uids_one.values()) & set(container_uids(two).values())
    restarted = await start_orchestrator(config_one)
    two_orchestrators[0] = restarted
    assert container_uids(restarted) == uids_one  # adopted, same uids
    await _create_direct(restarted, "t")
    all_one, all_two = container_uids(restarted), container_uids(two)
    assert len(all_one) == 4 and len(all_two) == 6
    assert not set(all_one.values()) & set(all_two.values())
