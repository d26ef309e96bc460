"""Container lifecycle through the Hub, on the real local backend (root needed).

Runs against real grpc.aio servers on loopback port 0 in this process.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from orchestrator_service.backends.local.network import veth_name
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import Services, auth, container_host_pids

pytestmark = pytest.mark.root
A = auth("key-a")
B = auth("key-b")


def reason_of(err: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            info = error_details_pb2.ErrorInfo()
            assert status.details[0].Unpack(info)
            return info.reason, dict(info.metadata)
    raise AssertionError("no ErrorInfo detail")


def leftovers(container_id: str) -> list[str]:
    """What of a container is still on the host: processes, cgroups, its veth."""
    found = [f"pid {p}" for p in sandbox_pids(container_id)]
    found += [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/sandhub/*/{container_id}")]
    found += [str(p) for p in Path("/sys/fs/cgroup").glob(f"sandhub/*/{container_id}")]
    if os.path.exists(f"/sys/class/net/{veth_name(container_id)}"):
        found.append(veth_name(container_id))
    return found


async def create(s: Services, md=A, **kw) -> pb.Container:  # type: ignore[no-untyped-def]
    kw.setdefault("wait_until_running", True)
    resp = await s.hub_stub.CreateContainer(pb.CreateContainerRequest(**kw), metadata=md)
    return resp.container


def sandbox_pids(container_id: str) -> list[int]:
    return container_host_pids(container_id)


async def wait_state(s: Services, cid: str, state: int, timeout: float = 10.0) -> pb.Container:
    deadline = time.monotonic() + timeout
    while True:
        c = (await s.hub_stub.GetContainer(pb.GetContainerRequest(container_id=cid), metadata=A)).container
        if c.state == state or time.monotonic() > deadline:
            return c
        await asyncio.sleep(0.02)


async def test_create_get_list_delete(services: Services) -> None:
    c = await create(services, labels={"app": "web"}, env={"GREETING": "hi"})
    assert c.state == pb.CONTAINER_STATE_RUNNING
    assert c.tenant == "tenant-a" and c.backend == "local" and c.image == "host"
    assert c.ready_time.ToNanoseconds() >= c.create_time.ToNanoseconds() > 0
    assert c.expire_time.seconds - c.create_time.seconds == 3600
    assert c.resources.memory_mib == 512  # the default, never unlimited
    pids = sandbox_pids(c.container_id)
    assert pids, "the container's processes run on the host"
    for ns in ("pid", "mnt", "ipc", "uts", "net"):
        assert os.stat(f"/proc/{pids[0]}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino, ns

    got = (await services.hub_stub.GetContainer(pb.GetContainerRequest(container_id=c.container_id), metadata=A)).container
    assert got.container_id == c.container_id and got.labels["app"] == "web"

    deleted = (await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id), metadata=A)).container
    assert deleted.state in (pb.CONTAINER_STATE_TERMINATING, pb.CONTAINER_STATE_TERMINATED)
    final = await wait_state(services, c.container_id, pb.CONTAINER_STATE_TERMINATED)
    assert final.state == pb.CONTAINER_STATE_TERMINATED and final.state_reason == "Deleted"
    assert sandbox_pids(c.container_id) == []
    # Delete is idempotent.
    again = await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id), metadata=A)
    assert again.container.state == pb.CONTAINER_STATE_TERMINATED


async def test_list_with_selector_and_paging(services: Services) -> None:
    web = [await create(services, labels={"app": "web", "n": str(i)}) for i in range(3)]
    await create(services, labels={"app": "db"})
    await create(services, md=B, labels={"app": "web"})
    seen, token = [], ""
    while True:
        resp = await services.hub_stub.ListContainers(
            pb.ListContainersRequest(label_selector="app=web", page_size=2, page_token=token), metadata=A
        )
        assert len(resp.containers) <= 2
        seen += [c.container_id for c in resp.containers]
        token = resp.next_page_token
        if not token:
            break
    assert seen == [c.container_id for c in web]  # oldest first, this tenant only
    everything = await services.hub_stub.ListContainers(pb.ListContainersRequest(), metadata=A)
    assert len(everything.containers) == 4
    first = await services.hub_stub.ListContainers(pb.ListContainersRequest(label_selector="app=web", page_size=1), metadata=A)
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as e:  # a token of another query is refused
        await services.hub_stub.ListContainers(
            pb.ListContainersRequest(label_selector="app=db", page_token=first.next_page_token), metadata=A
        )
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(e.value)[0] == "INVALID_PAGE_TOKEN"


async def test_state_filter(services: Services) -> None:
    c = await create(services)
    await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id), metadata=A)
    await wait_state(services, c.container_id, pb.CONTAINER_STATE_TERMINATED)
    running = await services.hub_stub.ListContainers(pb.ListContainersRequest(state=pb.CONTAINER_STATE_RUNNING), metadata=A)
    assert running.containers == []
    gone = await services.hub_stub.ListContainers(pb.ListContainersRequest(state=pb.CONTAINER_STATE_TERMINATED), metadata=A)
    assert [x.container_id for x in gone.containers] == [c.container_id]


async def test_tenant_isolation(services: Services) -> None:
    c = await create(services)
    for call, req in (
        (services.hub_stub.GetContainer, pb.GetContainerRequest(container_id=c.container_id)),
        (services.hub_stub.DeleteContainer, pb.DeleteContainerRequest(container_id=c.container_id)),
        (services.hub_stub.ExtendContainer, pb.ExtendContainerRequest(container_id=c.container_id, extend_by=duration_pb2.Duration(seconds=60))),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(req, metadata=B)
        assert e.value.code() is grpc.StatusCode.NOT_FOUND
        assert reason_of(e.value)[0] == "CONTAINER_NOT_FOUND"
    listed = await services.hub_stub.ListContainers(pb.ListContainersRequest(), metadata=B)
    assert listed.containers == []
    still = await services.hub_stub.GetContainer(pb.GetContainerRequest(container_id=c.container_id), metadata=A)
    assert still.container.state == pb.CONTAINER_STATE_RUNNING


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [((), "MISSING_CREDENTIALS"), (auth("wrong"), "INVALID_CREDENTIALS"), ((("authorization", "Basic x"),), "MISSING_CREDENTIALS")],
)
async def test_unauthenticated(services: Services, metadata, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await services.hub_stub.ListContainers(pb.ListContainersRequest(), metadata=metadata)
    assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(e.value)[0] == reason


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"resources": pb.Resources(cpu_millicores=-1)}, "resources.cpu_millicores"),
        ({"resources": pb.Resources(memory_mib=10_000_000)}, "resources.memory_mib"),
        ({"labels": {"bad key": "x"}}, "labels[bad key]"),
        ({"image": "no-such-image"}, "image"),
        ({"ttl": duration_pb2.Duration(seconds=10**7)}, "ttl"),
        ({"ports": [pb.Port(port=70000)]}, "ports[0].port"),
        ({"placement": "moon"}, "placement"),
    ],
)
async def test_invalid_create_names_the_field(services: Services, request_kwargs, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await services.hub_stub.CreateContainer(pb.CreateContainerRequest(**request_kwargs), metadata=A)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in (e.value.details() or "")
    assert reason_of(e.value)[1]["field"] == field
    listed = await services.hub_stub.ListContainers(pb.ListContainersRequest(), metadata=A)
    assert listed.containers == []  # nothing half-made


async def test_unknown_and_malformed_ids(services: Services) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await services.hub_stub.GetContainer(pb.GetContainerRequest(container_id="cnt-000000000000"), metadata=A)
    assert e.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await services.hub_stub.GetContainer(pb.GetContainerRequest(container_id="../../etc"), metadata=A)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_idempotent_create(services: Services) -> None:
    first, second = await asyncio.gather(create(services, request_id="req-1"), create(services, request_id="req-1"))
    assert first.container_id == second.container_id
    other = await create(services, md=B, request_id="req-1")  # keys are per tenant
    assert other.container_id != first.container_id


async def test_create_cancelled_by_the_caller_still_finishes(services: Services) -> None:
    call = services.hub_stub.CreateContainer(
        pb.CreateContainerRequest(request_id="give-up-1", wait_until_running=True), metadata=A)
    await asyncio.sleep(0.005)  # the orchestrator is spawning now
    call.cancel()
    for _ in range(200):
        found = (await services.hub_stub.ListContainers(pb.ListContainersRequest(), metadata=A)).containers
        if found and found[0].state != pb.CONTAINER_STATE_PENDING:
            break
        await asyncio.sleep(0.02)
    if found:  # the request reached the orchestrator before the cancel
        assert [c.state for c in found] == [pb.CONTAINER_STATE_RUNNING]
        again = await create(services, request_id="give-up-1")
        assert again.container_id == found[0].container_id and sandbox_pids(again.container_id)


async def test_extend(services: Services) -> None:
    c = await create(services, ttl=duration_pb2.Duration(seconds=60))
    ext = await services.hub_stub.ExtendContainer(
        pb.ExtendContainerRequest(container_id=c.container_id, extend_by=duration_pb2.Duration(seconds=120)), metadata=A
    )
    assert ext.container.expire_time.seconds - c.expire_time.seconds == 120
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await services.hub_stub.ExtendContainer(
            pb.ExtendContainerRequest(container_id=c.container_id, extend_by=duration_pb2.Duration(seconds=86400)), metadata=A
        )
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_expiry_reaps(services: Services) -> None:
    c = await create(services, ttl=duration_pb2.Duration(seconds=1))
    assert sandbox_pids(c.container_id)
    final = await wait_state(services, c.container_id, pb.CONTAINER_STATE_TERMINATED, timeout=10)
    assert final.state == pb.CONTAINER_STATE_TERMINATED and final.state_reason == "Expired"
    assert c.network.ip_address and leftovers(c.container_id) == []  # processes, cgroups and veth all gone


async def test_container_that_dies_is_failed(services: Services) -> None:
    c = await create(services)
    for pid in sandbox_pids(c.container_id):
        os.kill(pid, 9)
    final = await wait_state(services, c.container_id, pb.CONTAINER_STATE_FAILED)
    assert final.state == pb.CONTAINER_STATE_FAILED and final.state_reason == "ProcessExited"


async def test_watch_reports_changes(services: Services) -> None:
    call = services.hub_stub.WatchContainers(pb.WatchContainersRequest(send_initial=True, label_selector="app=w"), metadata=A)
    first = await call.read()
    assert first.type == pb.WATCH_EVENT_TYPE_SYNCED
    c = await create(services, labels={"app": "w"})
    await create(services, labels={"app": "other"})  # filtered out
    await create(services, md=B, labels={"app": "w"})  # another tenant's: never shown
    await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id), metadata=A)
    seen = []
    async with asyncio.timeout(10):
        while True:
            ev = await call.read()
            seen.append((ev.type, ev.container.container_id, ev.container.state))
            if ev.type == pb.WATCH_EVENT_TYPE_DELETED:
                break
    call.cancel()
    assert seen[0][:2] == (pb.WATCH_EVENT_TYPE_ADDED, c.container_id)
    assert (pb.WATCH_EVENT_TYPE_MODIFIED, c.container_id, pb.CONTAINER_STATE_RUNNING) in seen
    assert all(cid == c.container_id for _, cid, _ in seen)
    assert seen[-1] == (pb.WATCH_EVENT_TYPE_DELETED, c.container_id, pb.CONTAINER_STATE_TERMINATED)


async def test_orchestrator_down_is_unavailable_promptly(services: Services) -> None:
    await services.orchestrator.server.stop(0)
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await services.hub_stub.ListContainers(pb.ListContainersRequest(), metadata=A, timeout=20)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    assert reason_of(e.value)[0] == "BACKEND_UNAVAILABLE"
    assert time.monotonic() - start < 10  # not the caller's 20 s deadline


async def test_delete_while_starting_leaves_nothing(services: Services) -> None:
    creating = asyncio.ensure_future(create(services, wait_until_running=False))
    backend = services.orchestrator.containers.backend
    assert backend is not None
    pending = None
    for _ in range(2000):
        pending = next((c for c in await backend.list() if c.state.value == "PENDING"), None)
        if pending is not None:
            break
        await asyncio.sleep(0.0005)
    assert pending is not None, "never saw the container PENDING"
    deleted = await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=pending.id), metadata=A)
    assert deleted.container.state == pb.CONTAINER_STATE_TERMINATING
    made = await creating
    assert made.container_id == pending.id
    final = await wait_state(services, made.container_id, pb.CONTAINER_STATE_TERMINATED)
    assert final.state == pb.CONTAINER_STATE_TERMINATED
    for _ in range(100):
        if leftovers(made.container_id) == []:
            break
        await asyncio.sleep(0.05)
    assert leftovers(made.container_id) == []


async def test_a_network_that_fails_while_the_agent_starts_leaves_nothing(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The network is attached while the sandbox mounts and the agent starts
    (not while bwrap holds it): when that fails, even after the agent is up,
    the create is FAILED with the reason, and nothing of it stays on the host."""
    from orchestrator_service.backends.local.network import NetworkError

    backend = services.orchestrator.containers.backend
    net = backend._net  # type: ignore[union-attr]
    assert net is not None
    real_attach = net.attach
    seen: list[int] = []

    async def attach(*, container_id: str, pid: int, ip: str, egress: bool) -> None:
        seen.append(pid)
        await real_attach(container_id=container_id, pid=pid, ip=ip, egress=egress)
        await asyncio.sleep(0.3)  # the agent is serving by now
        raise NetworkError("no room on the bridge (injected)")

    monkeypatch.setattr(net, "attach", attach)
    c = await create(services)
    assert c.state == pb.CONTAINER_STATE_FAILED and "injected" in c.state_message, c
    assert seen  # the injected failure did happen (leftovers() looks for its processes too)
    for _ in range(100):
        if leftovers(c.container_id) == []:
            break
        await asyncio.sleep(0.05)
    assert leftovers(c.container_id) == []
    monkeypatch.undo()
    assert (await create(services)).state == pb.CONTAINER_STATE_RUNNING
