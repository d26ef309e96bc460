"""AgentDirectoryService on the Orchestrator: a real grpc.aio server on
loopback (port 0) with an in-memory backend, called through the generated stub."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from orchestrator_service.backends.base import Notify
from orchestrator_service.model import Container, ContainerSpec, Resources, State, utcnow
from orchestrator_service.server import RunningOrchestrator, start_orchestrator
from sandhub import internal_auth, rpc
from sandhub.config import OrchestratorConfig
from sandhub.errors import ContainerNotFound, NotSupported
from sandhub.internal.v1 import agents_pb2 as pb
from sandhub.internal.v1 import agents_pb2_grpc as pb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2
from tests.conftest import ORCHESTRATOR_TOKEN
from tests.integration.test_lifecycle import reason_of

RUNNING, PENDING, NO_AGENT = "cnt-running00001", "cnt-pending00001", "cnt-noagent00001"


class DirectoryBackend:
    """Three containers of tenant "a"; the one named NO_AGENT's backend has no agent."""

    name = "memory"

    def __init__(self, notify: Notify) -> None:
        spec = ContainerSpec(tenant="a", image="img", resources=Resources(100, 64, 64, 64, 256), env={}, labels={},
                             ttl_s=60, ports=(), placement="default")
        now = utcnow()
        self.containers = {
            cid: Container.from_spec(spec, id=cid, backend=self.name, now=now).with_state(state)
            for cid, state in ((RUNNING, State.RUNNING), (PENDING, State.PENDING), (NO_AGENT, State.RUNNING))
        }

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def list(self) -> list[Container]:
        return list(self.containers.values())

    async def get(self, *, container_id: str) -> Container:
        try:
            return self.containers[container_id]
        except KeyError:
            raise ContainerNotFound(container_id) from None

    def agent_target(self, container: Container) -> str:
        if container.id == NO_AGENT:
            raise NotSupported("this backend has no exec agent yet")
        return f"unix:/run/agents/{container.id}.sock"


@dataclass
class Directory:
    orchestrator: RunningOrchestrator
    stub: pb_grpc.AgentDirectoryServiceStub
    plain: pb_grpc.AgentDirectoryServiceStub


@pytest.fixture
async def directory() -> AsyncIterator[Directory]:
    config = OrchestratorConfig(listen="127.0.0.1:0", backend="memory", token=ORCHESTRATOR_TOKEN)
    orch = await start_orchestrator(config, backend=DirectoryBackend)  # type: ignore[arg-type]
    address = f"127.0.0.1:{orch.port}"
    async with internal_auth.orchestrator_channel(address, ORCHESTRATOR_TOKEN) as ch, \
            grpc.aio.insecure_channel(address) as plain:
        yield Directory(orch, pb_grpc.AgentDirectoryServiceStub(ch), pb_grpc.AgentDirectoryServiceStub(plain))
    await orch.stop(0)


def tenant(name: str) -> tuple[tuple[str, str]]:
    return ((rpc.TENANT_KEY, name),)


async def test_the_owner_and_the_operator_get_the_target(directory: Directory) -> None:
    for md in (tenant("a"), ()):
        got = await directory.stub.GetAgentEndpoint(pb.GetAgentEndpointRequest(container_id=RUNNING), metadata=md)
        assert got.target == f"unix:/run/agents/{RUNNING}.sock"
        assert got.state == orchestrator_pb2.CONTAINER_STATE_RUNNING
        assert got.backend == "memory"


@pytest.mark.parametrize(
    ("container_id", "md", "code", "reason"),
    [
        (RUNNING, tenant("b"), grpc.StatusCode.NOT_FOUND, "CONTAINER_NOT_FOUND"),  # another tenant's
        ("cnt-nosuchthing1", tenant("a"), grpc.StatusCode.NOT_FOUND, "CONTAINER_NOT_FOUND"),
        (PENDING, tenant("a"), grpc.StatusCode.FAILED_PRECONDITION, "CONTAINER_NOT_RUNNING"),
        (PENDING, tenant("b"), grpc.StatusCode.NOT_FOUND, "CONTAINER_NOT_FOUND"),  # says nothing of its state
        (NO_AGENT, tenant("a"), grpc.StatusCode.UNIMPLEMENTED, "NOT_SUPPORTED"),
        ("x" * 5000, tenant("a"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
    ],
)
async def test_refusals(directory: Directory, container_id: str, md: tuple[tuple[str, str]],
                        code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await directory.stub.GetAgentEndpoint(pb.GetAgentEndpointRequest(container_id=container_id), metadata=md)
    assert e.value.code() is code, e.value
    assert reason_of(e.value)[0] == reason
    if reason == "CONTAINER_NOT_RUNNING":
        assert reason_of(e.value)[1]["state"] == "CONTAINER_STATE_PENDING"


async def test_without_the_orchestrator_token_it_is_unauthenticated(directory: Directory) -> None:
    for md in (tenant("a"), (*tenant("a"), *internal_auth.metadata("y" * len(ORCHESTRATOR_TOKEN)))):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await directory.plain.GetAgentEndpoint(pb.GetAgentEndpointRequest(container_id=RUNNING), metadata=md)
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
