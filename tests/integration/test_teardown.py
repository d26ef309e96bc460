"""TERMINATED means gone (issue 12, item 4): a container whose teardown leaves
something behind stays TERMINATING with a reason that says what, keeps its uid
and address from others, and is finished by the retries once the obstacle goes.

The obstacle is real: a cgroup of the test's own made inside the container's
cgroups, which the teardown does not remove (a process moved in from outside
no longer is one: the teardown kills whatever is in the container's cgroups).
Root needed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from orchestrator_service.backends.local import cgroups
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import Services
from tests.integration.test_lifecycle import A, create, leftovers, sandbox_pids

pytestmark = pytest.mark.root


def uid_claimed_by(services: Services, container_id: str) -> int | None:
    """The host uid whose claim file names ``container_id``, if any."""
    for path in services.orchestrator.config.local.uid_claims_dir.iterdir():
        if path.name.isdigit():
            with contextlib.suppress(OSError, ValueError):
                if json.loads(path.read_text()).get("container_id") == container_id:
                    return int(path.name)
    return None


async def get(services: Services, cid: str) -> pb.Container:
    return (await services.hub_stub.GetContainer(pb.GetContainerRequest(container_id=cid), metadata=A)).container


async def wait_for(services: Services, cid: str, done, timeout: float = 20.0) -> pb.Container:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        c = await get(services, cid)
        if done(c) or time.monotonic() > deadline:
            return c
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def obstacle(services: Services, container_id: str) -> Iterator[Callable[[], None]]:
    """A cgroup inside each of the container's: rmdir of theirs fails until
    it goes. Yields what removes it."""
    groups = cgroups.Cgroups(cgroups.detect(), parent=cgroups.parent_for(services.state_dir / "local"))
    assert groups.dirs(container_id), "cgroups are needed for this test"
    made = [d / "obstacle" for d in groups.dirs(container_id)]
    for d in made:
        d.mkdir()

    def remove() -> None:
        for d in made:
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()

    try:
        yield remove
    finally:
        remove()


async def test_a_container_is_terminated_only_when_nothing_of_it_is_left(services: Services) -> None:
    x = await create(services)
    uid = uid_claimed_by(services, x.container_id)
    assert uid is not None and x.network.ip_address
    with obstacle(services, x.container_id) as remove_obstacle:
        await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=x.container_id), metadata=A)

        stuck = await wait_for(services, x.container_id, lambda c: c.state_reason == "TeardownIncomplete")
        assert stuck.state == pb.CONTAINER_STATE_TERMINATING, stuck
        assert stuck.state_reason == "TeardownIncomplete" and "cgroup" in stuck.state_message, stuck
        assert sandbox_pids(x.container_id) == []  # its own processes are gone; the cgroup is not
        await asyncio.sleep(2.5)  # a retry or two later: still not gone, still not TERMINATED
        again = await get(services, x.container_id)
        assert again.state == pb.CONTAINER_STATE_TERMINATING and again.state_reason == "TeardownIncomplete"
        # Its uid and address stay its own meanwhile.
        assert uid_claimed_by(services, x.container_id) == uid
        y = await create(services)
        assert y.network.ip_address != x.network.ip_address
        assert uid_claimed_by(services, y.container_id) != uid

        remove_obstacle()
        done = await wait_for(services, x.container_id, lambda c: c.state == pb.CONTAINER_STATE_TERMINATED)
        assert done.state == pb.CONTAINER_STATE_TERMINATED, done
        assert done.state_reason == "Deleted" and done.state_message == ""
        assert uid_claimed_by(services, x.container_id) is None
        assert leftovers(x.container_id) == []


async def test_delete_of_a_stuck_container_is_idempotent_and_keeps_its_reason(services: Services) -> None:
    x = await create(services)
    with obstacle(services, x.container_id) as remove_obstacle:
        await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=x.container_id), metadata=A)
        await wait_for(services, x.container_id, lambda c: c.state_reason == "TeardownIncomplete")
        again = (await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=x.container_id), metadata=A)).container
        assert again.state == pb.CONTAINER_STATE_TERMINATING
        remove_obstacle()
        done = await wait_for(services, x.container_id, lambda c: c.state == pb.CONTAINER_STATE_TERMINATED)
        assert done.state == pb.CONTAINER_STATE_TERMINATED and done.state_reason == "Deleted"


async def test_a_process_moved_into_a_deleted_containers_cgroup_goes_with_it(services: Services) -> None:
    """Whatever is in a container's cgroups at teardown is the container's,
    wherever it came from: killed, and TERMINATED means it is gone."""
    x = await create(services)
    groups = cgroups.Cgroups(cgroups.detect(), parent=cgroups.parent_for(services.state_dir / "local"))
    stray = subprocess.Popen(["sleep", "600"])
    try:
        for d in groups.dirs(x.container_id):
            (d / "cgroup.procs").write_text(str(stray.pid))
        await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=x.container_id), metadata=A)
        done = await wait_for(services, x.container_id, lambda c: c.state == pb.CONTAINER_STATE_TERMINATED)
        assert done.state == pb.CONTAINER_STATE_TERMINATED and done.state_reason == "Deleted", done
        assert stray.wait(timeout=10) == -9
        assert leftovers(x.container_id) == []
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
