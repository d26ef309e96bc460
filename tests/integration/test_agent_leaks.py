"""What issue 14 found the old exec path leaving on the host, checked on the agent.

Before the agent, every PutFiles left a root supervisor process, a zombie and
a Hub fd until the Hub restarted (a 500-file upload: 500 processes, ~850 MiB),
and each background process had a root supervisor on the host and its ring
files outside the container's disk. Now the agent, inside the container, does
all of it: the host keeps one bwrap launcher per container and nothing else.

Real servers (the `services` fixture runs the Hub and the Orchestrator in this
process), so "on the host" is "among this process's descendants".
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import duration_pb2

from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import Services, auth, container_host_pids, eventually

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]
A = auth("key-a")


def descendants(root: int) -> set[int]:
    """Every process below ``root`` in this host's pid namespace (zombies
    included: a zombie is what leaked). What runs inside a container (its own
    pid namespace, below its bwrap launcher) is the container's, not the host's."""
    host_ns = os.stat("/proc/self/ns/pid").st_ino
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            if os.stat(f"/proc/{name}/ns/pid").st_ino != host_ns:
                continue
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settled(expected: set[int], timeout_s: float = 5.0) -> set[int]:
    """This process's descendants once they are back to ``expected`` (or the
    timeout passed): a command that just ended may take a moment to be reaped."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        now = descendants(os.getpid())
        if now <= expected or asyncio.get_running_loop().time() > deadline:
            return now
        await asyncio.sleep(0.05)


async def create(services: Services) -> pb.Container:
    made = await services.hub_stub.CreateContainer(pb.CreateContainerRequest(wait_until_running=True), metadata=A)
    assert made.container.state == pb.CONTAINER_STATE_RUNNING, made.container.state_message
    return made.container


async def raw_upload(cid: str, files: int) -> AsyncIterator[xpb.PutFilesRequest]:
    yield xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=cid, destination="/work/up"))
    for i in range(files):
        data = f"file {i}\n".encode()
        yield xpb.PutFilesRequest(file=xpb.FileHeader(path=f"d{i % 10}/f{i}.txt", size=len(data)))
        yield xpb.PutFilesRequest(data=data)


async def test_uploads_leave_no_process_zombie_or_fd_on_the_host(services: Services) -> None:
    ex = xpb_grpc.ExecServiceStub(services.hub_channel)
    c = await create(services)
    await ex.Run(xpb.RunRequest(container_id=c.container_id, command=xpb.Command(argv=["true"])), metadata=A)
    before, fds = descendants(os.getpid()), open_fds()
    inside = container_host_pids(c.container_id)

    got = await ex.PutFiles(raw_upload(c.container_id, 500), metadata=A)
    assert len(got.files) == 500
    for _ in range(20):
        await ex.PutFiles(raw_upload(c.container_id, 5), metadata=A)

    left = await settled(before)
    assert left <= before, f"new host processes after 21 uploads: {sorted(left - before)}"
    assert open_fds() <= fds + 8, (fds, open_fds())
    assert container_host_pids(c.container_id) == inside, "processes left running inside after the uploads"
    n = await ex.Run(xpb.RunRequest(container_id=c.container_id,
                                    command=xpb.Command(shell="find /work/up -type f | wc -l")), metadata=A)
    assert n.stdout.strip() == b"500"  # the 20 small uploads rewrote d0-d4/f0-f4


async def test_background_processes_have_no_host_supervisor_and_keep_output_inside(services: Services) -> None:
    ex = xpb_grpc.ExecServiceStub(services.hub_channel)
    c = await create(services)
    before = descendants(os.getpid())
    for i in range(16):
        await ex.StartProcess(xpb.StartProcessRequest(
            container_id=c.container_id, process_id=f"bg-{i}",
            command=xpb.Command(shell="echo started; exec sleep 1000")), metadata=A)
    assert await settled(before) <= before, "a background process got a supervisor on the host"

    agent = min(container_host_pids(c.container_id))  # pid 1 inside: the first started
    cgroups = Path(f"/proc/{agent}/cgroup").read_text()

    async def sleeping() -> list[int]:  # a shell just started may not have exec'd its sleep yet
        return [p for p in container_host_pids(c.container_id)
                if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"sleep\0")]

    sleeps = await eventually(sleeping, lambda found: len(found) == 16)
    for pid in sleeps:
        assert Path(f"/proc/{pid}/cgroup").read_text() == cgroups, "a background process outside the container's cgroups"

    # Their output buffers are files of the container's own /tmp (its disk
    # limit), not of the host.
    r = await ex.Run(xpb.RunRequest(container_id=c.container_id, command=xpb.Command(
        shell="grep -c ' /tmp ' /proc/mounts; find /tmp -type f | wc -l"),
        timeout=duration_pb2.Duration(seconds=30)), metadata=A)
    mounts, ring_files = r.stdout.split()
    assert int(mounts) >= 1 and int(ring_files) >= 16, r.stdout
