"""A tenant takes every pseudo-terminal it can get. Issue 11, item 6.

Before the fix one container took 3,071 of the host pool's 3,072 ptys in four
processes, and every other tenant's PTY exec then failed, reported as
INVALID_ARGUMENT on `command.argv`. Now each container's devpts has its own
cap (LocalBackendConfig.max_ptys), the host pool is raised so every container
can reach its cap, and a PTY exec in a container at its cap is
RESOURCE_EXHAUSTED. Real servers, local backend, through the Hub.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from orchestrator_service.backends.local import devpts
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import Services, auth

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]
A, B = auth("key-a"), auth("key-b")
# Opens ptys until the kernel says no, writes how many, then holds them.
HOARD = """
import os, time
held = []
try:
    while True:
        held.append(os.openpty())
except OSError as e:
    err = e.errno
with open('/work/count.tmp', 'w') as f:
    f.write(f'{len(held)} {err}\\n')
os.rename('/work/count.tmp', '/work/count')
time.sleep(300)
"""


async def run(ex: xpb_grpc.ExecServiceStub, cid: str, script: str, md: tuple[tuple[str, str], ...]) -> str:
    r = await ex.Run(xpb.RunRequest(container_id=cid, command=xpb.Command(shell=script)), metadata=md)
    return r.stdout.decode()


async def pty_exec(ex: xpb_grpc.ExecServiceStub, cid: str, md: tuple[tuple[str, str], ...]) -> bytes:
    """`tty` on a PTY; its output."""
    async def requests() -> AsyncIterator[xpb.ExecRequest]:
        yield xpb.ExecRequest(start=xpb.ExecStart(
            container_id=cid, command=xpb.Command(argv=["tty"]), pty=xpb.PtySize(rows=24, cols=80)))
        await asyncio.sleep(30)  # stdin stays open until the command is done

    out = bytearray()
    call = ex.Exec(requests(), metadata=md)
    async for r in call:
        out += r.stdout
        if r.HasField("exit_status"):
            assert r.exit_status.exit_code == 0, bytes(out)
            break
    call.cancel()
    return bytes(out)


async def test_one_container_cannot_take_every_pty(services: Services) -> None:
    cap = services.orchestrator.config.local.max_ptys
    made = [await services.hub_stub.CreateContainer(pb.CreateContainerRequest(wait_until_running=True), metadata=md)
            for md in (A, B)]
    a, b = (r.container.container_id for r in made)
    ex = xpb_grpc.ExecServiceStub(services.hub_channel)
    # The pool leaves room for every container's cap (64 by default).
    assert int(Path("/proc/sys/kernel/pty/max").read_text()) >= 1024 + 1000 * cap
    # Tenant A hoards from four processes, as in the report.
    for i in range(4):
        await ex.StartProcess(xpb.StartProcessRequest(
            container_id=a, process_id=f"hoard{i}", command=xpb.Command(argv=["python3", "-c", HOARD.replace(
                "/work/count", f"/work/count{i}")])), metadata=A)
    counts = ""
    for _ in range(200):
        counts = await run(ex, a, "cat /work/count0 /work/count1 /work/count2 /work/count3 2>/dev/null; echo", A)
        if len(counts.split()) == 8:
            break
        await asyncio.sleep(0.05)
    fields = counts.split()
    assert len(fields) == 8, counts
    held = sum(int(n) for n in fields[0::2])
    assert held == cap, counts  # the container's cap, not the host's pool
    assert set(fields[1::2]) == {"28"}, counts  # ENOSPC
    # A's own PTY exec is refused as what it is...
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await pty_exec(ex, a, A)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert "pseudo-terminals" in (refused.value.details() or "")
    # ...and tenant B's still works.
    assert b"/dev/pts/" in await pty_exec(ex, b, B)


def test_the_host_pool_is_only_ever_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool, reserve = tmp_path / "max", tmp_path / "reserve"
    reserve.write_text("1024\n")
    monkeypatch.setattr(devpts, "PTY_MAX", pool)
    monkeypatch.setattr(devpts, "PTY_RESERVE", reserve)
    pool.write_text("4096\n")
    assert devpts.raise_host_pool(100, 64) == 1024 + 6400
    pool.write_text("999999\n")
    assert devpts.raise_host_pool(100, 64) == 999999
    pool.write_text("4096\n")
    assert devpts.raise_host_pool(1 << 20, 64) == devpts.KERNEL_PTY_LIMIT
