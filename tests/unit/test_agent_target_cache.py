"""How long the Hub keeps a container's agent target (hub_service.exec.agents):
a cluster address ("ip:port") is asked for again after TCP_TARGET_TTL_S, a
unix socket of the container's own is kept; a deleted container is forgotten."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from hub_service.exec import agents
from hub_service.exec.agents import AgentDirectory
from sandhub import internal_auth, rpc
from sandhub.internal.v1 import agents_pb2_grpc
from tests.conftest import ORCHESTRATOR_TOKEN
from tests.integration.agent_harness import AGENT_KEY, Entry, FakeDirectory

TCP, UNIX = "cnt-tcptarget001", "cnt-unixtarget01"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Served = tuple[FakeDirectory, AgentDirectory, Clock]


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    fake = FakeDirectory({TCP: Entry("t", "10.1.2.3:49983"), UNIX: Entry("t", "unix:/run/x/agent.sock")})
    server = grpc.aio.server(interceptors=[rpc.CanonicalInterceptor("directory"),
                                           internal_auth.TokenServerInterceptor(ORCHESTRATOR_TOKEN)])
    agents_pb2_grpc.add_AgentDirectoryServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = internal_auth.orchestrator_channel(f"127.0.0.1:{port}", ORCHESTRATOR_TOKEN)
    clock = Clock()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(agents.time, "monotonic", clock)
        yield fake, AgentDirectory(channel, agent_key=AGENT_KEY, timeout_s=5), clock
    await channel.close()
    await server.stop(0)


async def test_a_cluster_target_expires_and_a_unix_one_stays(served: Served) -> None:
    fake, directory, clock = served
    for cid in (TCP, UNIX):
        await directory.find(cid, tenant="t")
    assert fake.asked == 2
    clock.now += agents.TCP_TARGET_TTL_S - 1
    await directory.find(TCP, tenant="t")
    assert fake.asked == 2
    fake.entries[TCP].target = "10.9.9.9:49983"  # the pod moved
    clock.now += 2
    assert (await directory.find(TCP, tenant="t")).target == "10.9.9.9:49983"
    clock.now += 10 * 86400
    await directory.find(UNIX, tenant="t")
    assert fake.asked == 3


async def test_a_deleted_container_is_forgotten(served: Served) -> None:
    fake, directory, _ = served
    await directory.find(UNIX, tenant="t")
    directory.forget_container(UNIX)
    directory.forget_container("cnt-neverseen001")
    await directory.find(UNIX, tenant="t")
    assert fake.asked == 2
