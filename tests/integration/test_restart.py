"""The orchestrator killed with SIGKILL and restarted adopts what runs, marks
what died, and leaves nothing orphaned. Runs `sandhub serve --only
orchestrator` as a real subprocess on loopback (root needed)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from orchestrator_service.backends.local import cgroups
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import ORCHESTRATOR_TOKEN, PrivateNetwork, sync_orchestrator_channel
from tests.integration.test_lifecycle import leftovers, sandbox_pids

pytestmark = pytest.mark.root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orchestrator:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.net = PrivateNetwork.new()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> pb_grpc.OrchestratorServiceStub:
        env = dict(os.environ, SANDHUB_STATE_DIR=str(self.state), SANDHUB_REAP_INTERVAL="0.2",
                   SANDHUB_ORCHESTRATOR_TOKEN=ORCHESTRATOR_TOKEN, **self.net.env())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandhub.cli.main", "serve", "--only", "orchestrator",
             "--orchestrator-listen", f"127.0.0.1:{self.port}"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.state / "orchestrator.log", "ab"),
        )
        channel = sync_orchestrator_channel(self.port)
        grpc.channel_ready_future(channel).result(timeout=20)
        return pb_grpc.OrchestratorServiceStub(channel)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)


@pytest.fixture
def orchestrator(tmp_path: Path) -> Iterator[Orchestrator]:
    o = Orchestrator(tmp_path)
    yield o
    # Stopped gracefully: it then removes its own (empty) cgroup parent.
    o.kill(signal.SIGTERM)
    # Clean anything a failed test left, by the pids its records name...
    for record in (tmp_path / "local" / "containers").glob("*.json"):
        for pid in sandbox_pids(record.stem):
            os.kill(pid, signal.SIGKILL)
    # ...and the cgroups of this orchestrator, deepest first (rmdir only
    # removes an empty cgroup without processes).
    parent = cgroups.parent_for(tmp_path / "local")
    for top in [Path("/sys/fs/cgroup", parent), *Path("/sys/fs/cgroup").glob(f"*/{parent}")]:
        for d in sorted((p for p in top.glob("**/") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
    asyncio.run(o.net.teardown())


def wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigkill_restart_adopts_and_cleans(orchestrator: Orchestrator) -> None:
    stub = orchestrator.start()
    made = [
        stub.CreateContainer(pb.CreateContainerRequest(labels={"n": str(i)}, wait_until_running=True)).container
        for i in range(3)
    ]
    assert all(c.state == pb.CONTAINER_STATE_RUNNING for c in made)
    orchestrator.kill(signal.SIGKILL)
    # While it is down: one container's processes die.
    victim = made[2]
    for pid in sandbox_pids(victim.container_id):
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: sandbox_pids(victim.container_id) == [])

    stub = orchestrator.start()
    listed = {c.container_id: c for c in stub.ListContainers(pb.ListContainersRequest(state=0)).containers}
    for c in made[:2]:
        assert listed[c.container_id].state == pb.CONTAINER_STATE_RUNNING
        assert listed[c.container_id].labels == c.labels and listed[c.container_id].expire_time == c.expire_time
        assert sandbox_pids(c.container_id)
    assert listed[victim.container_id].state == pb.CONTAINER_STATE_FAILED
    assert listed[victim.container_id].state_reason == "ProcessExited"

    # Adopted containers are still watched: one dying now is noticed.
    for pid in sandbox_pids(made[1].container_id):
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: stub.GetContainer(pb.GetContainerRequest(container_id=made[1].container_id)).container.state == pb.CONTAINER_STATE_FAILED)

    stub.DeleteContainer(pb.DeleteContainerRequest(container_id=made[0].container_id))
    assert wait_for(lambda: stub.GetContainer(pb.GetContainerRequest(container_id=made[0].container_id)).container.state == pb.CONTAINER_STATE_TERMINATED)
    assert wait_for(lambda: all(leftovers(c.container_id) == [] for c in made)), [leftovers(c.container_id) for c in made]
    # Adopted containers kept their address and answer on it.
    assert listed[made[0].container_id].network.ip_address == made[0].network.ip_address != ""


def test_graceful_stop_leaves_containers_running(orchestrator: Orchestrator) -> None:
    stub = orchestrator.start()
    c = stub.CreateContainer(pb.CreateContainerRequest(wait_until_running=True)).container
    orchestrator.kill(signal.SIGTERM)
    assert orchestrator.proc is not None and orchestrator.proc.returncode == 0
    assert sandbox_pids(c.container_id)
    stub = orchestrator.start()
    assert stub.GetContainer(pb.GetContainerRequest(container_id=c.container_id)).container.state == pb.CONTAINER_STATE_RUNNING
    stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id))
    assert wait_for(lambda: leftovers(c.container_id) == []), leftovers(c.container_id)
