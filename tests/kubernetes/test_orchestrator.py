"""The orchestrator's domain (ContainerService: quota, wait-until-running,
the TTL reaper) on the Kubernetes backend, loaded by name like in
production, against the REAL kube-apiserver + KWOK."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from orchestrator_service.backends import load_backend
from orchestrator_service.containers import ContainerService
from orchestrator_service.model import Port, State
from orchestrator_service.server import start_orchestrator
from orchestrator_service.validation import RawCreate
from sandhub import rpc
from sandhub.config import OrchestratorConfig
from sandhub.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tests.conftest import ORCHESTRATOR_TOKEN, orchestrator_channel
from tests.kubernetes.control_plane import ControlPlane
from tests.kubernetes.helpers import PLACEMENTS, eventually, k8s_config

pytestmark = pytest.mark.kubernetes


def orchestrator_config(cp: ControlPlane, namespace: str) -> OrchestratorConfig:
    return OrchestratorConfig(listen="127.0.0.1:0", backend="kubernetes",
                              kubernetes=k8s_config(cp.kubeconfig, namespace),
                              placements=tuple(PLACEMENTS), reap_interval_s=0.2, tombstone_s=1.0,
                              token=ORCHESTRATOR_TOKEN)


def raw(**changes: object) -> RawCreate:
    base: dict[str, object] = dict(image="", cpu_millicores=0, memory_mib=0, pids=0, disk_mib=0, open_files=0,
                                   env={}, labels={"app": "web"}, ttl_s=0, ports=[Port(8000)], placement="",
                                   request_id="")
    base.update(changes)
    return RawCreate(**base)  # type: ignore[arg-type]


@pytest.fixture
async def containers(control_plane: ControlPlane, namespace: str) -> AsyncIterator[ContainerService]:
    service = ContainerService(orchestrator_config(control_plane, namespace))
    service.attach(load_backend(service._config, service.notify))
    await service.start()
    yield service
    await service.close()


async def test_wait_until_running_then_expiry_reaps(containers: ContainerService) -> None:
    c = await containers.create(raw(ttl_s=2), tenant="tenant-a", wait_until_running=True)
    assert c.state is State.RUNNING and c.image == "busybox:1.37" and c.ip_address
    got = await eventually(lambda: containers.get(c.id, tenant="tenant-a"), lambda x: x.state is State.TERMINATED)
    assert (got.state, got.state_reason) == (State.TERMINATED, "Expired")


async def test_failed_image_is_reported_to_a_waiting_caller(containers: ContainerService) -> None:
    c = await containers.create(raw(image="sandhub-test.invalid/no-such-image:1"), tenant="tenant-a",
                                wait_until_running=True)
    assert (c.state, c.state_reason) == (State.FAILED, "ImagePullBackOff")
    # The reaper forgets it after the tombstone time (1 s here): the pod is removed.
    listed = await eventually(containers._backend.list, lambda cs: c.id not in [x.id for x in cs])
    assert c.id not in [x.id for x in listed], "the FAILED container was never forgotten"


async def test_tenants_and_request_ids(containers: ContainerService) -> None:
    a = await containers.create(raw(request_id="once"), tenant="tenant-a", wait_until_running=False)
    again = await containers.create(raw(request_id="once"), tenant="tenant-a", wait_until_running=False)
    assert again.id == a.id
    page = await containers.list(tenant="tenant-b", label_selector="", state=None, size=10, token="")
    assert page.containers == []
    page = await containers.list(tenant="tenant-a", label_selector="app=web", state=None, size=10, token="")
    assert [c.id for c in page.containers] == [a.id]


async def test_grpc_create_and_unavailable(control_plane: ControlPlane, namespace: str) -> None:
    """Through the orchestrator's gRPC server, as the Hub calls it."""
    orch = await start_orchestrator(orchestrator_config(control_plane, namespace))
    channel = orchestrator_channel(orch.port)
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    try:
        resp = await stub.CreateContainer(orchestrator_pb2.CreateContainerRequest(
            labels={"app": "web"}, placement="ec2", wait_until_running=True), metadata=((rpc.TENANT_KEY, "t"),))
        assert resp.container.state == orchestrator_pb2.CONTAINER_STATE_RUNNING
        assert resp.container.placement == "ec2"
    finally:
        await channel.close()
        await orch.stop(0)
