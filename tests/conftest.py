"""Shared fixtures: real grpc.aio servers on port 0, called through generated stubs."""

from __future__ import annotations

import asyncio
import os
import shutil
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from hub_service.server import RunningHub, start_hub
from orchestrator_service.backends.local.network import HostNetwork, NetworkConfig
from orchestrator_service.server import RunningOrchestrator, start_orchestrator
from sandhub import internal_auth
from sandhub.config import HubConfig, LocalBackendConfig, OrchestratorConfig
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc
from tests.container_shell import ContainerShell

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
T = TypeVar("T")
ORCHESTRATOR_TOKEN = "test-orchestrator-token-" + "0123456789abcdef"
"""The tests' Hub <-> Orchestrator token (orchestrator_config sets it)."""


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def orchestrator_channel(port: int, token: str = ORCHESTRATOR_TOKEN) -> grpc.aio.Channel:
    """A channel to an Orchestrator on this host whose calls carry the token,
    as the Hub's do."""
    return internal_auth.orchestrator_channel(f"127.0.0.1:{port}", token)


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """The token on every call of a blocking channel (tests that use grpc's sync API)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        @dataclass(frozen=True)
        class Details(grpc.ClientCallDetails):
            method: str
            timeout: float | None
            metadata: tuple[tuple[str, str | bytes], ...]
            credentials: grpc.CallCredentials | None
            wait_for_ready: bool | None
            compression: grpc.Compression | None

        metadata = (*(d.metadata or ()), *internal_auth.metadata(self._token))
        return Details(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)


def sync_orchestrator_channel(port: int, token: str = ORCHESTRATOR_TOKEN) -> grpc.Channel:
    """A blocking channel to an Orchestrator on this host, its calls carrying the token."""
    return grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{port}"), _SyncToken(token))


def hub_config(orchestrator: RunningOrchestrator, **overrides: object) -> HubConfig:
    """A Hub on port 0 in front of ``orchestrator``, with its token and KEYS."""
    base = HubConfig(listen="127.0.0.1:0", orchestrator=f"127.0.0.1:{orchestrator.port}", api_keys=KEYS,
                     orchestrator_token=orchestrator.config.token)
    return replace(base, **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PrivateNetwork:
    """A bridge and subnet of one test's own, so tests running at the same
    time (two checkouts, helpers) never hand out the same address."""

    bridge: str
    subnet: str

    @classmethod
    def new(cls) -> PrivateNetwork:
        n = secrets.randbelow(16 * 256)
        net = cls(bridge=f"sht{secrets.token_hex(4)}", subnet=f"10.{240 + n // 256}.{n % 256}.0/24")
        _MADE.append(net)
        return net

    def env(self) -> dict[str, str]:
        return {"SANDHUB_BRIDGE": self.bridge, "SANDHUB_SUBNET": self.subnet,
                "SANDHUB_PLACEMENTS": "default,internet", "SANDHUB_EGRESS_PLACEMENTS": "internet"}

    async def teardown(self) -> None:
        """The bridge outlives the orchestrator on purpose (containers survive
        a restart); a test removes its own."""
        await HostNetwork(NetworkConfig(bridge=self.bridge, subnet=self.subnet)).teardown()


_MADE: list[PrivateNetwork] = []


@pytest.fixture(scope="session", autouse=True)
def _remove_test_networks() -> Iterator[None]:
    """Whatever a test forgot (or could not do after a failure), the session
    removes: every bridge and firewall table a PrivateNetwork named."""
    yield
    async def teardown_all() -> None:
        for net in _MADE:
            await net.teardown()

    if os.geteuid() == 0:
        asyncio.run(teardown_all())


def container_host_pids(container_id: str) -> list[int]:
    """Host pids of a container's processes: those whose environment names it,
    less bwrap's launcher, which waits on the host (its environment is the id
    alone, and it is in this host's pid namespace)."""
    entry = f"SANDHUB_CONTAINER_ID={container_id}".encode()
    host_pid_ns = os.stat("/proc/self/ns/pid").st_ino
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
            if environ == entry + b"\0" and os.stat(f"/proc/{name}/ns/pid").st_ino == host_pid_ns:
                continue
        except OSError:  # gone, or not ours to read
            continue
        if entry in environ.split(b"\0"):
            found.append(int(name))
    return sorted(found)


async def eventually(get: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    """``get()`` until ``ok`` of what it gives, for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if ok(value) or time.monotonic() > deadline:
            assert ok(value), f"still {value!r} after {timeout}s"
            return value
        await asyncio.sleep(0.02)


def agent_for_others(directory: Path) -> Path:
    """A copy of this checkout's sandhub-agent in ``directory`` that any uid
    can run: a user other than root builds the agent into their own home,
    and root's tools cache (/root is 0700) is out of their reach."""
    from orchestrator_service.backends.local.agent_binary import find_agent

    agent = directory / "sandhub-agent"
    shutil.copy2(find_agent(os.environ.get("SANDHUB_AGENT", "")), agent)
    agent.chmod(0o755)
    return agent


def traversable(path: Path) -> Path:
    """Lets other uids (containers run as their own) pass through ``path`` and
    its pytest parents, which pytest makes 0700."""
    for p in (path, *path.parents):
        if str(p).startswith(tempfile.gettempdir() + "/pytest-of-"):
            p.chmod(p.stat().st_mode | 0o711)
    return path


def orchestrator_config(state: Path, net: PrivateNetwork | None = None, **overrides: object) -> OrchestratorConfig:
    net = net or PrivateNetwork.new()
    base = OrchestratorConfig(
        listen="127.0.0.1:0",
        local=LocalBackendConfig(
            state_dir=state / "local", images_dir=state / "images", bridge=net.bridge, subnet=net.subnet,
            egress_placements=("internet",),
            # This checkout's agent (make exports it), not the newest build in
            # the tools cache, which may be another checkout's.
            agent_path=os.environ.get("SANDHUB_AGENT", ""),
        ),
        reap_interval_s=0.2,
        placements=("default", "internet"),
        token=ORCHESTRATOR_TOKEN,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


@dataclass
class Services:
    orchestrator: RunningOrchestrator
    hub: RunningHub
    hub_channel: grpc.aio.Channel
    hub_stub: orchestrator_pb2_grpc.OrchestratorServiceStub
    orchestrator_stub: orchestrator_pb2_grpc.OrchestratorServiceStub
    state_dir: Path
    network: PrivateNetwork


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    if os.geteuid() != 0:
        pytest.fail("these tests create namespaces and need root (CI runs as root)")
    net = PrivateNetwork.new()
    traversable(tmp_path)  # local images live under it
    orch = await start_orchestrator(orchestrator_config(tmp_path, net))
    hub = await start_hub(hub_config(orch))
    hub_channel = grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}")
    orch_channel = orchestrator_channel(orch.port)
    try:
        yield Services(
            orch,
            hub,
            hub_channel,
            orchestrator_pb2_grpc.OrchestratorServiceStub(hub_channel),
            orchestrator_pb2_grpc.OrchestratorServiceStub(orch_channel),
            tmp_path,
            net,
        )
    finally:
        # Leave nothing behind: stop the Hub, delete every container, then
        # stop the Orchestrator.
        await hub_channel.close()
        await hub.stop(0)
        containers = await orch.containers.backend.list()  # type: ignore[union-attr]
        for c in containers:
            if c.state.alive:
                await orch.containers.delete(c.id, tenant=None, grace_period_s=0)
        # Until every teardown has finished (a loaded machine takes seconds):
        # one cut short keeps its uid claimed host-wide until a restart finishes it.
        deadline = asyncio.get_running_loop().time() + 60
        while asyncio.get_running_loop().time() < deadline:
            if all(not c.state.alive and c.state.value != "TERMINATING" for c in await orch.containers.backend.list()):  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        await orch_channel.close()
        await orch.stop(0)
        await net.teardown()


@pytest.fixture
def shell(services: Services) -> ContainerShell:
    """Scripts and servers in the services' containers through the Hub, as tenant-a."""
    return ContainerShell.through_hub(services.hub_channel, auth("key-a"))
