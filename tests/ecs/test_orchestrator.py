"""The Orchestrator on SANDHUB_BACKEND=ecs, loaded by name as in production,
against a moto server on loopback: through its gRPC server as the Hub calls
it (create with placement, list by labels with paging, get, delete, quota,
errors), and its domain (wait-until-running, the TTL reaper, a stopped task
reaching a waiting caller)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from orchestrator_service.backends import load_backend
from orchestrator_service.containers import ContainerService
from orchestrator_service.model import Port, State
from orchestrator_service.server import start_orchestrator
from orchestrator_service.validation import RawCreate
from sandhub import rpc
from sandhub.config import Limits, OrchestratorConfig
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc
from hub_service.server import start_hub
from tests.conftest import ORCHESTRATOR_TOKEN, auth, hub_config, orchestrator_channel
from tests.ecs.helpers import PLACEMENTS, ecs_config
from tests.ecs.moto_aws import CLUSTER, Aws


def orchestrator_config(aws: Aws, **limits: int) -> OrchestratorConfig:
    return OrchestratorConfig(listen="127.0.0.1:0", backend="ecs", ecs=ecs_config(aws),
                              placements=tuple(PLACEMENTS), reap_interval_s=0.2, tombstone_s=1.0,
                              limits=Limits(**limits), token=ORCHESTRATOR_TOKEN)


def raw(**changes: object) -> RawCreate:
    base: dict[str, object] = dict(image="", cpu_millicores=0, memory_mib=0, pids=0, disk_mib=0, open_files=0,
                                   env={}, labels={"app": "web"}, ttl_s=0, ports=[Port(8000)], placement="",
                                   request_id="")
    base.update(changes)
    return RawCreate(**base)  # type: ignore[arg-type]


@pytest.fixture
async def containers(aws: Aws) -> AsyncIterator[ContainerService]:
    service = ContainerService(orchestrator_config(aws))
    service.attach(load_backend(service._config, service.notify))
    await service.start()
    yield service
    await service.close()


def tenant(name: str) -> tuple[tuple[str, str], ...]:
    return ((rpc.TENANT_KEY, name),)


async def test_grpc_lifecycle_on_ecs(aws: Aws) -> None:
    orch = await start_orchestrator(orchestrator_config(aws, max_containers_per_tenant=4, max_memory_mib=8192))
    channel = orchestrator_channel(orch.port)
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    try:
        made = []
        for i in range(3):
            resp = await stub.CreateContainer(pb.CreateContainerRequest(
                labels={"app": "web", "n": str(i)}, placement="spot", wait_until_running=True,
                ports=[pb.Port(port=8000)]), metadata=tenant("t"))
            made.append(resp.container)
        await stub.CreateContainer(pb.CreateContainerRequest(labels={"app": "db"}), metadata=tenant("t"))
        c = made[0]
        assert (c.state, c.placement, c.backend, c.image) == (pb.CONTAINER_STATE_RUNNING, "spot", "ecs",
                                                               "busybox:1.37")
        assert c.network.ip_address and c.resources.memory_mib == 2048  # 1 core needs 2 GiB on Fargate
        # Quota: four held, the fifth is refused.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateContainer(pb.CreateContainerRequest(), metadata=tenant("t"))
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # List by labels, two to a page.
        seen, token = [], ""
        while True:
            page = await stub.ListContainers(pb.ListContainersRequest(
                label_selector="app=web", page_size=2, page_token=token), metadata=tenant("t"))
            seen += [x.container_id for x in page.containers]
            token = page.next_page_token
            if not token:
                break
        assert sorted(seen) == sorted(x.container_id for x in made)
        other = await stub.ListContainers(pb.ListContainersRequest(), metadata=tenant("someone-else"))
        assert list(other.containers) == []
        got = await stub.GetContainer(pb.GetContainerRequest(container_id=c.container_id), metadata=tenant("t"))
        assert got.container.labels["n"] == "0"
        deleted = await stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id),
                                             metadata=tenant("t"))
        assert deleted.container.state == pb.CONTAINER_STATE_TERMINATED
        again = await stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id),
                                           metadata=tenant("t"))
        assert again.container.state == pb.CONTAINER_STATE_TERMINATED
        # 8 vCPU needs 16 GiB on Fargate, over this installation's 8 GiB: the
        # error names the field and the nearest sizes.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateContainer(pb.CreateContainerRequest(
                resources=pb.Resources(cpu_millicores=8000, memory_mib=512)), metadata=tenant("u"))
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "resources.cpu_millicores" in (e.value.details() or "") and "4000m/8192MiB" in (e.value.details() or "")
    finally:
        await channel.close()
        await orch.stop(0)


async def test_expiry_reaps_the_task(containers: ContainerService, aws: Aws) -> None:
    c = await containers.create(raw(ttl_s=1), tenant="tenant-a", wait_until_running=True)
    assert c.state is State.RUNNING and c.ip_address
    for _ in range(100):
        got = await containers.get(c.id, tenant="tenant-a")
        if got.state is State.TERMINATED:
            break
        await asyncio.sleep(0.05)
    assert (got.state, got.state_reason) == (State.TERMINATED, "Expired")
    [task] = aws.tasks()
    assert (task["lastStatus"], task["stoppedReason"]) == ("STOPPED", "sandhub: Expired")


async def test_restart_keeps_request_ids_and_containers(aws: Aws) -> None:
    first = ContainerService(orchestrator_config(aws))
    first.attach(load_backend(first._config, first.notify))
    await first.start()
    a = await first.create(raw(request_id="once"), tenant="tenant-a", wait_until_running=False)
    await first.close()
    second = ContainerService(orchestrator_config(aws))
    second.attach(load_backend(second._config, second.notify))
    await second.start()
    try:
        again = await second.create(raw(request_id="once"), tenant="tenant-a", wait_until_running=False)
        assert again.id == a.id and len(aws.tasks()) == 1
    finally:
        await second.close()


async def test_a_stopped_task_is_failed_for_its_caller(containers: ContainerService, aws: Aws) -> None:
    c = await containers.create(raw(), tenant="tenant-a", wait_until_running=True)
    [task] = aws.tasks()
    aws.client("ecs").stop_task(cluster=CLUSTER, task=task["taskArn"],
                                reason="CannotPullContainerError: ref pull has been retried 1 time(s)")
    for _ in range(100):
        got = await containers.get(c.id, tenant="tenant-a")
        if got.state is State.FAILED:
            break
        await asyncio.sleep(0.05)
    assert (got.state, got.state_reason) == (State.FAILED, "ImagePullFailed")
    # The reaper forgets it after its tombstone time (1 s here).
    for _ in range(100):
        if c.id not in [x.id for x in await containers._backend.list()]:
            break
        await asyncio.sleep(0.05)
    assert c.id not in [x.id for x in await containers._backend.list()]


async def test_through_the_hub(aws: Aws) -> None:
    """The public API on SANDHUB_BACKEND=ecs: tenants by API key, labels, delete."""
    orch = await start_orchestrator(orchestrator_config(aws))
    hub = await start_hub(hub_config(orch))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}")
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    try:
        created = (await stub.CreateContainer(pb.CreateContainerRequest(
            labels={"course": "cs101"}, placement="ec2", wait_until_running=True, request_id="student-7"),
            metadata=auth("key-a"))).container
        assert (created.state, created.placement, created.backend) == (pb.CONTAINER_STATE_RUNNING, "ec2", "ecs")
        [task] = aws.tasks()
        assert task["capacityProviderName"] == "sandhub-ec2" and task["startedBy"] == "sandhub-test"
        mine = await stub.ListContainers(pb.ListContainersRequest(label_selector="course=cs101"),
                                         metadata=auth("key-a"))
        assert [c.container_id for c in mine.containers] == [created.container_id]
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.GetContainer(pb.GetContainerRequest(container_id=created.container_id), metadata=auth("key-b"))
        assert e.value.code() is grpc.StatusCode.NOT_FOUND
        gone = await stub.DeleteContainer(pb.DeleteContainerRequest(container_id=created.container_id),
                                          metadata=auth("key-a"))
        assert gone.container.state == pb.CONTAINER_STATE_TERMINATED
    finally:
        await channel.close()
        await hub.stop(0)
        await orch.stop(0)
