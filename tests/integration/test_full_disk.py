"""A full state disk (issue 12, item 3): the Orchestrator refuses what it can't
record (RESOURCE_EXHAUSTED, reason STATE_STORAGE_FULL) and changes nothing, still
tears containers down and expires them, and starts and serves on it.

Each test mounts a small tmpfs of its own as the state directory and fills it
with a file (root needed); the Orchestrator and Hub run in this process."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from hub_service.server import RunningHub, start_hub
from orchestrator_service.backends.local import store
from orchestrator_service.model import utcnow
from orchestrator_service.server import RunningOrchestrator, start_orchestrator
from sandhub.config import Limits
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import PrivateNetwork, auth, hub_config, orchestrator_config, traversable
from tests.integration.test_lifecycle import leftovers, reason_of, sandbox_pids

pytestmark = pytest.mark.root
A = auth("key-a")
FILLER = "filler"


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "sandhub-test-state", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Writes a file into ``path`` until its filesystem has no byte left."""
    fd = os.open(path / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (65536, 4096, 512, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    probe = path / "probe"
    with pytest.raises(OSError):
        probe.write_bytes(b"x" * 4096)
    probe.unlink(missing_ok=True)


def free(path: Path) -> None:
    (path / FILLER).unlink()


class Stack:
    """An Orchestrator (state on its own tmpfs) and a Hub, restartable."""

    def __init__(self, tmp_path: Path, **overrides: object) -> None:
        self.root = traversable(tmp_path)
        self.state = self.root / "local"
        self.net = PrivateNetwork.new()
        self.overrides = {"limits": Limits(create_rate_per_s=0), **overrides}
        self.orch: RunningOrchestrator | None = None
        self.hub: RunningHub | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.OrchestratorServiceStub

    async def start(self) -> pb_grpc.OrchestratorServiceStub:
        self.orch = await start_orchestrator(orchestrator_config(self.root, self.net, **self.overrides))
        self.hub = await start_hub(hub_config(self.orch))
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.hub.port}")
        self.stub = pb_grpc.OrchestratorServiceStub(self.channel)
        return self.stub

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.hub is not None:
            await self.hub.stop(0)
        if self.orch is not None:
            await self.orch.stop(0)
        self.orch = self.hub = self.channel = None

    async def restart(self) -> pb_grpc.OrchestratorServiceStub:
        await self.stop()
        return await self.start()

    async def get(self, cid: str) -> pb.Container:
        return (await self.stub.GetContainer(pb.GetContainerRequest(container_id=cid), metadata=A)).container

    async def wait_state(self, cid: str, state: int, timeout: float = 15.0) -> pb.Container:
        deadline = time.monotonic() + timeout
        while True:
            c = await self.get(cid)
            if c.state == state or time.monotonic() > deadline:
                return c
            await asyncio.sleep(0.05)

    def record(self, cid: str) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.state / "containers" / f"{cid}.json").read_text())["container"]
        return data

    async def cleanup(self) -> None:
        """Whatever the test left: every container's processes and host pieces."""
        if self.orch is not None:
            for c in await self.orch.containers.backend.list():  # type: ignore[union-attr]
                if c.state.alive:
                    with contextlib.suppress(Exception):  # a test that failed may have left it unable to
                        await self.orch.containers.delete(c.id, tenant=None, grace_period_s=0)
            for _ in range(300):
                if all(c.state.value in ("TERMINATED", "FAILED")
                       for c in await self.orch.containers.backend.list()):  # type: ignore[union-attr]
                    break
                await asyncio.sleep(0.02)
        with contextlib.suppress(Exception):
            await self.stop()
        for record in (self.state / "containers").glob("*.json"):
            for pid in sandbox_pids(record.stem):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        await self.net.teardown()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path)
    with small_tmpfs(s.state):
        await s.start()
        try:
            yield s
        finally:
            with contextlib.suppress(FileNotFoundError):
                free(s.state)
            await s.cleanup()


async def create(s: Stack, **kw: object) -> pb.Container:
    kw.setdefault("wait_until_running", True)
    resp = await s.stub.CreateContainer(pb.CreateContainerRequest(**kw), metadata=A, timeout=20)  # type: ignore[arg-type]
    return resp.container


async def test_create_on_a_full_disk_is_refused_and_leaves_nothing(stack: Stack) -> None:
    fill(stack.state)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create(stack, request_id="full-1")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    reason, metadata = reason_of(e.value)
    assert reason == "STATE_STORAGE_FULL" and metadata["error"] == "ENOSPC"
    # No ghost: nothing listed, nothing recorded, nothing running.
    listed = await stack.stub.ListContainers(pb.ListContainersRequest(), metadata=A)
    assert list(listed.containers) == []
    assert list((stack.state / "containers").iterdir()) == []

    free(stack.state)
    c = await create(stack, request_id="full-1")  # the same request_id: a fresh start, at once
    assert c.state == pb.CONTAINER_STATE_RUNNING
    assert sandbox_pids(c.container_id)


async def test_delete_on_a_full_disk_tears_down_and_records_it(stack: Stack) -> None:
    c = await create(stack)
    assert sandbox_pids(c.container_id)
    fill(stack.state)
    deleted = (await stack.stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id), metadata=A)).container
    assert deleted.state in (pb.CONTAINER_STATE_TERMINATING, pb.CONTAINER_STATE_TERMINATED)
    done = await stack.wait_state(c.container_id, pb.CONTAINER_STATE_TERMINATED)
    assert done.state == pb.CONTAINER_STATE_TERMINATED and done.state_reason == "Deleted"
    assert sandbox_pids(c.container_id) == [] and leftovers(c.container_id) == []
    # Recorded although the disk is still full: a restart does not bring it back.
    assert stack.record(c.container_id)["state"] == "TERMINATED"
    await stack.restart()
    assert (await stack.get(c.container_id)).state == pb.CONTAINER_STATE_TERMINATED
    assert sandbox_pids(c.container_id) == []


async def test_a_teardown_record_with_no_room_at_all_is_written_once_there_is(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when the record can't be overwritten in place, the sandbox goes at
    once; the record follows when space returns."""
    c = await create(stack)
    monkeypatch.setattr(store, "_overwrite", lambda path, data: False)
    fill(stack.state)
    await stack.stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id), metadata=A)
    assert (await stack.wait_state(c.container_id, pb.CONTAINER_STATE_TERMINATED)).state == pb.CONTAINER_STATE_TERMINATED
    assert sandbox_pids(c.container_id) == [] and leftovers(c.container_id) == []
    assert stack.record(c.container_id)["state"] == "RUNNING"  # not written yet
    free(stack.state)
    deadline = time.monotonic() + 10
    while stack.record(c.container_id)["state"] != "TERMINATED" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert stack.record(c.container_id)["state"] == "TERMINATED"


async def test_extend_on_a_full_disk_fails_cleanly_and_the_last_good_one_survives_a_restart(stack: Stack) -> None:
    c = await create(stack, ttl=duration_pb2.Duration(seconds=600))
    extended = (await stack.stub.ExtendContainer(pb.ExtendContainerRequest(
        container_id=c.container_id, extend_by=duration_pb2.Duration(seconds=600)), metadata=A)).container
    assert extended.expire_time.seconds >= c.expire_time.seconds + 600
    fill(stack.state)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stack.stub.ExtendContainer(pb.ExtendContainerRequest(
            container_id=c.container_id, extend_by=duration_pb2.Duration(seconds=600)), metadata=A)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(e.value)[0] == "STATE_STORAGE_FULL"
    assert (await stack.get(c.container_id)).expire_time == extended.expire_time  # memory unchanged
    await stack.restart()  # on the full disk
    got = await stack.get(c.container_id)
    assert got.state == pb.CONTAINER_STATE_RUNNING and got.expire_time == extended.expire_time


async def test_the_reaper_expires_every_container_though_some_records_cannot_be_written(stack: Stack) -> None:
    n, broken = 6, 2
    containers = [await create(stack) for _ in range(n)]
    backend = stack.orch.containers.backend  # type: ignore[union-attr]
    for c in containers:
        await backend.set_expiry(container_id=c.container_id, expire_time=utcnow() - timedelta(seconds=1))
    # The first records' writes fail (a directory where the temp file goes).
    blocked = [stack.state / "containers" / f"{c.container_id}.tmp" for c in containers[:broken]]
    for path in blocked:
        path.mkdir()
    reaped = await stack.orch.containers.reap_once()  # type: ignore[union-attr]
    assert reaped == n
    for c in containers:
        got = await stack.wait_state(c.container_id, pb.CONTAINER_STATE_TERMINATED)
        assert got.state == pb.CONTAINER_STATE_TERMINATED and got.state_reason == "Expired", c.container_id
        assert sandbox_pids(c.container_id) == [], c.container_id
    assert all(stack.record(c.container_id)["state"] == "RUNNING" for c in containers[:broken])
    for path in blocked:
        path.rmdir()
    deadline = time.monotonic() + 10
    while any(stack.record(c.container_id)["state"] != "TERMINATED" for c in containers) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert [stack.record(c.container_id)["state"] for c in containers] == ["TERMINATED"] * n


async def test_one_failing_container_does_not_stop_a_reaper_round(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    containers = [await create(stack) for _ in range(3)]
    backend = stack.orch.containers.backend  # type: ignore[union-attr]
    for c in containers:
        await backend.set_expiry(container_id=c.container_id, expire_time=utcnow() - timedelta(seconds=1))
    delete = backend.delete

    async def flaky_delete(*, container_id: str, grace_period_s: float, reason: str):  # type: ignore[no-untyped-def]
        if container_id == containers[0].container_id:
            raise RuntimeError("a bug in one container's teardown")
        return await delete(container_id=container_id, grace_period_s=grace_period_s, reason=reason)

    monkeypatch.setattr(backend, "delete", flaky_delete)
    assert await stack.orch.containers.reap_once() == 2  # type: ignore[union-attr]
    for c in containers[1:]:
        assert (await stack.wait_state(c.container_id, pb.CONTAINER_STATE_TERMINATED)).state == pb.CONTAINER_STATE_TERMINATED


async def test_the_orchestrator_starts_and_serves_on_a_full_disk(stack: Stack) -> None:
    running = await create(stack, labels={"keep": "yes"})
    deleted = await create(stack)
    lost = await create(stack)
    await stack.stub.DeleteContainer(pb.DeleteContainerRequest(container_id=deleted.container_id), metadata=A)
    await stack.wait_state(deleted.container_id, pb.CONTAINER_STATE_TERMINATED)
    await stack.stop()
    for pid in sandbox_pids(lost.container_id):  # dies while the orchestrator is down
        os.kill(pid, signal.SIGKILL)
    fill(stack.state)
    await stack.start()
    assert (await stack.get(running.container_id)).state == pb.CONTAINER_STATE_RUNNING
    assert (await stack.get(deleted.container_id)).state == pb.CONTAINER_STATE_TERMINATED
    got_lost = await stack.get(lost.container_id)
    assert got_lost.state == pb.CONTAINER_STATE_FAILED and got_lost.state_reason == "ProcessExited"
    listed = await stack.stub.ListContainers(pb.ListContainersRequest(label_selector="keep=yes"), metadata=A)
    assert [c.container_id for c in listed.containers] == [running.container_id]
    assert sandbox_pids(running.container_id)  # adopted, not killed
    # And it still tears down on the full disk.
    await stack.stub.DeleteContainer(pb.DeleteContainerRequest(container_id=running.container_id), metadata=A)
    assert (await stack.wait_state(running.container_id, pb.CONTAINER_STATE_TERMINATED)).state == pb.CONTAINER_STATE_TERMINATED
    assert leftovers(running.container_id) == []


def test_fill_leaves_no_room(tmp_path: Path) -> None:
    """The tests' own tool: a filled tmpfs refuses a new page."""
    with small_tmpfs(tmp_path / "t", size="256k") as path:
        fill(path)
        with pytest.raises(OSError) as e:
            (path / "x").write_bytes(b"y" * 4096)
        assert e.value.errno == errno.ENOSPC
        free(path)
        (path / "x").write_bytes(b"y" * 4096)
