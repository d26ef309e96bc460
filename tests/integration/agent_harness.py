"""A Hub relaying ExecService to real sandhub-agent processes, without containers.

Each agent runs as a plain local process on a unix socket in a temporary
directory (its commands run on this host, which is all these tests need: they
test the Hub's relay, not isolation). A small AgentDirectoryService in this
process stands in for the Orchestrator: it maps container ids to the agents'
sockets, per tenant, and checks the Orchestrator token like the real one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from hub_service.server import RunningHub, start_hub
from sandhub import internal_auth, rpc
from sandhub.bench.pod_agent import stop_process
from sandhub.config import HubConfig
from sandhub.errors import ContainerNotFound
from sandhub.exec.v1 import exec_pb2_grpc
from sandhub.internal.v1 import agents_pb2, agents_pb2_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tests.conftest import KEYS, ORCHESTRATOR_TOKEN, auth

AGENT_KEY = internal_auth.agent_key(ORCHESTRATOR_TOKEN)
RUNNING = orchestrator_pb2.CONTAINER_STATE_RUNNING


def agent_binary() -> str:
    """$SANDHUB_AGENT (exported by make); a clear failure when it is not built."""
    path = os.environ.get("SANDHUB_AGENT", "")
    if not path or not os.access(path, os.X_OK):
        raise AssertionError(
            f"sandhub-agent is not built (SANDHUB_AGENT={path!r}): run `make agent` in the repository root and "
            "set SANDHUB_AGENT to the path it prints (`make` exports it for `make test`)")
    return path


def agent_sends_proof() -> bool:
    """Whether the agent's source answers the nonce (agents.proto's scheme)."""
    root = Path(__file__).resolve().parents[2] / "agent"
    return any(internal_auth.AGENT_PROOF_KEY in p.read_text(errors="replace") for p in root.rglob("*.go"))


@dataclass
class AgentProcess:
    container_id: str
    socket: Path
    work: Path
    process: asyncio.subprocess.Process

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"

    async def stop(self) -> None:
        await stop_process(self.process)


async def start_agent(root: Path, container_id: str, *, token: str | None = None) -> AgentProcess:
    """The real agent for ``container_id`` in ``root``; ``token``: its credential
    (default: the right one for that id)."""
    root.mkdir(parents=True, exist_ok=True)
    work, state = root / "work", root / "state"
    work.mkdir(exist_ok=True)
    socket = root / "agent.sock"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work),
           "SANDHUB_AGENT_TOKEN": token or internal_auth.agent_token(AGENT_KEY, container_id)}
    process = await asyncio.create_subprocess_exec(
        agent_binary(), f"--listen=unix:{socket}", f"--container-id={container_id}", f"--workdir={work}",
        f"--state-dir={state}", env=env, stdin=asyncio.subprocess.DEVNULL)
    for _ in range(500):
        if socket.exists():
            return AgentProcess(container_id, socket, work, process)
        if process.returncode is not None:
            break
        await asyncio.sleep(0.01)
    if process.returncode is None:
        process.kill()
    await process.wait()
    raise AssertionError(f"sandhub-agent did not listen on {socket} (exit {process.returncode})")


@dataclass
class Entry:
    tenant: str
    target: str
    state: int = RUNNING


@dataclass
class FakeDirectory(agents_pb2_grpc.AgentDirectoryServiceServicer):
    """container id -> Entry; another tenant's or an unknown id is NOT_FOUND."""

    entries: dict[str, Entry] = field(default_factory=dict)
    asked: int = 0

    async def GetAgentEndpoint(self, request: agents_pb2.GetAgentEndpointRequest,
                               context: rpc.Ctx) -> agents_pb2.GetAgentEndpointResponse:
        self.asked += 1
        tenant = dict(context.invocation_metadata() or ()).get(rpc.TENANT_KEY)
        entry = self.entries.get(request.container_id)
        if entry is None or entry.tenant != tenant:
            raise ContainerNotFound(request.container_id)
        return agents_pb2.GetAgentEndpointResponse(target=entry.target, state=entry.state, backend="local")  # type: ignore[arg-type]


class FakeOrchestrator(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """DeleteContainer only: marks the directory's entry TERMINATED."""

    def __init__(self, directory: FakeDirectory) -> None:
        self.directory = directory

    async def DeleteContainer(self, request: orchestrator_pb2.DeleteContainerRequest,
                              context: rpc.Ctx) -> orchestrator_pb2.DeleteContainerResponse:
        entry = self.directory.entries.get(request.container_id)
        if entry is None:
            raise ContainerNotFound(request.container_id)
        entry.state = orchestrator_pb2.CONTAINER_STATE_TERMINATED
        return orchestrator_pb2.DeleteContainerResponse(
            container=orchestrator_pb2.Container(container_id=request.container_id, state=entry.state))  # type: ignore[arg-type]


@dataclass
class RelayHub:
    hub: RunningHub
    directory: FakeDirectory
    directory_server: grpc.aio.Server
    channel: grpc.aio.Channel
    agents: list[AgentProcess]
    root: Path

    @property
    def stub(self) -> exec_pb2_grpc.ExecServiceStub:
        return exec_pb2_grpc.ExecServiceStub(self.channel)

    async def agent(self, container_id: str, *, tenant: str = "tenant-a", token: str | None = None,
                    register: bool = True) -> AgentProcess:
        agent = await start_agent(self.root / container_id, container_id, token=token)
        self.agents.append(agent)
        if register:
            self.directory.entries[container_id] = Entry(tenant, agent.target)
        return agent


A = auth("key-a")
B = auth("key-b")


async def start_relay_hub(root: Path, **config: object) -> AsyncIterator[RelayHub]:
    """An async generator for fixtures: the directory, a Hub relaying to agents, a client channel."""
    directory = FakeDirectory()
    server = grpc.aio.server(interceptors=[rpc.CanonicalInterceptor("directory"),
                                           internal_auth.TokenServerInterceptor(ORCHESTRATOR_TOKEN)])
    agents_pb2_grpc.add_AgentDirectoryServiceServicer_to_server(directory, server)
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(FakeOrchestrator(directory), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    hub = await start_hub(HubConfig(listen="127.0.0.1:0", orchestrator=f"127.0.0.1:{port}", api_keys=KEYS,
                                    orchestrator_token=ORCHESTRATOR_TOKEN, **config))  # type: ignore[arg-type]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}")
    relay = RelayHub(hub, directory, server, channel, [], root)
    try:
        yield relay
    finally:
        await channel.close()
        await hub.stop(0)
        await server.stop(0)
        for agent in relay.agents:
            await agent.stop()
        shutil.rmtree(root, ignore_errors=True)
