"""Where each container's exec agent listens, and the channels that reach it.

The Orchestrator's AgentDirectoryService answers (asked with the caller's
tenant, so another tenant's container is NOT_FOUND). Its answer is kept per
container id, because a container's tenant never changes and its target
rarely does; a call whose agent fails at the transport level or can't prove
itself drops the entry (``forget``), and the next look-up asks again, which is
also how a deleted container comes to answer NOT_FOUND / NOT_RUNNING. A
DeleteContainer the Hub passes on drops it too (``forget_container``), and a
cluster target ("ip:port") is kept at most TCP_TARGET_TTL_S: a pod's or task's
address is handed on to another container once it is gone, and the proof alone
would only turn that into failed calls. A unix target names the container's own
socket and is kept until it fails.

Channels are pooled per target, a bounded number (LRU); an evicted channel is
closed once the calls that hold it end. Every agent is untrusted (the tenant
owns that process), so the channel bounds what it may send: messages,
metadata, and no transparent retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog

from hub_service.orchestrator_proxy import translate
from sandhub import internal_auth, rpc
from sandhub.container_ids import check_container_id
from sandhub.errors import BackendUnavailable, ContainerNotFound, ContainerNotRunning, clip
from sandhub.exec.v1 import exec_pb2
from sandhub.internal.v1 import agents_pb2, agents_pb2_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2

log = structlog.get_logger("sandhub.hub.agents")

CACHE_SIZE = 100_000
"""Container ids whose agent is remembered (~200 bytes each)."""
TCP_TARGET_TTL_S = 30.0
"""How long an "ip:port" target is used before the Orchestrator is asked again."""
MESSAGE_BYTES = (4 << 20) + (64 << 10)
"""Largest message either way: the contract's 4 MiB plus framing slack (a Run
reply with both streams at their cap is 4 MiB - 64 KiB plus a few fields)."""
METADATA_BYTES = 16 << 10
"""Largest header or trailer block an agent may send (its proof, its status
details; an agent's error details are rebuilt by the Hub anyway)."""
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MESSAGE_BYTES),
    ("grpc.max_send_message_length", MESSAGE_BYTES),
    ("grpc.max_metadata_size", METADATA_BYTES),
    ("grpc.absolute_max_metadata_size", METADATA_BYTES),
    # A relayed call may have delivered its request already: never sent twice.
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30000),
    # A deleted container's channel stops reconnecting once unused this long.
    ("grpc.client_idle_timeout_ms", 60000),
)


@dataclass(frozen=True)
class Agent:
    """One container's agent, as the Orchestrator described it to one tenant."""

    container_id: str
    tenant: str
    target: str
    token: str
    """The per-container credential (internal_auth.agent_token): never sent, only
    used to sign each call and to check the agent's proof."""
    expires: float = field(default=math.inf, compare=False)
    """time.monotonic() after which the entry is asked for again."""


class AgentDirectory:
    """Finds a container's agent for the caller's tenant, cached."""

    def __init__(self, channel: grpc.aio.Channel, *, agent_key: bytes, timeout_s: float) -> None:
        """``channel``: the Hub's channel to the Orchestrator (it adds the token)."""
        self._stub = agents_pb2_grpc.AgentDirectoryServiceStub(channel)
        self._key = agent_key
        self._timeout_s = timeout_s
        self._known: OrderedDict[str, Agent] = OrderedDict()
        self._asking: dict[tuple[str, str], asyncio.Future[Agent]] = {}

    async def find(self, container_id: str, *, tenant: str, field: str = "container_id") -> Agent:
        """``field``: where the request holds the id, for the error a malformed one gets."""
        check_container_id(container_id, field=field)
        known = self._known.get(container_id)
        if known is not None and known.expires <= time.monotonic():
            del self._known[container_id]
            known = None
        if known is not None:
            if known.tenant != tenant:
                raise ContainerNotFound(container_id)
            self._known.move_to_end(container_id)
            return known
        # Calls arriving together for an unknown container share one question.
        key = (container_id, tenant)
        asking = self._asking.get(key)
        if asking is None:
            asking = self._asking[key] = asyncio.ensure_future(self._ask_and_keep(container_id, tenant))
            asking.add_done_callback(lambda done: self._asked(key, done))
        return await asyncio.shield(asking)  # a caller that leaves does not end the others' question

    async def _ask_and_keep(self, container_id: str, tenant: str) -> Agent:
        """Kept before the question is done, so no call finds neither."""
        agent = await self._ask(container_id, tenant)
        self._known[container_id] = agent
        if len(self._known) > CACHE_SIZE:
            self._known.popitem(last=False)
        return agent

    def _asked(self, key: tuple[str, str], done: asyncio.Future[Agent]) -> None:
        self._asking.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here too: every caller may have left

    def forget(self, agent: Agent) -> None:
        """Drops the cached entry, if it still is ``agent`` (a concurrent call
        may already have put a newer one there)."""
        if self._known.get(agent.container_id) == agent:
            del self._known[agent.container_id]

    def forget_container(self, container_id: str) -> None:
        """Drops whatever is cached for ``container_id`` (it was deleted)."""
        self._known.pop(container_id, None)

    async def recheck(self, agent: Agent) -> None:
        """After ``agent`` failed: forgets it and asks the Orchestrator again,
        raising what it says when the container is gone or not running (the
        caller's real problem). Returns quietly when it still runs."""
        self.forget(agent)
        await self.find(agent.container_id, tenant=agent.tenant)

    async def _ask(self, container_id: str, tenant: str) -> Agent:
        metadata = [(rpc.TENANT_KEY, tenant)]
        info = rpc.current_rpc.get()
        if info is not None:
            metadata.append((rpc.REQUEST_ID_KEY, info.request_id))
        try:
            got = await self._stub.GetAgentEndpoint(
                agents_pb2.GetAgentEndpointRequest(container_id=container_id),
                metadata=metadata, timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            raise translate(e) from None
        if got.state != orchestrator_pb2.CONTAINER_STATE_RUNNING:
            state = orchestrator_pb2.ContainerState.Name(got.state) if got.state in orchestrator_pb2.ContainerState.values() else "CONTAINER_STATE_UNSPECIFIED"
            raise ContainerNotRunning(container_id, state)
        if not _usable_target(got.target):
            log.error("hub.agent_target_unusable", container_id=container_id, target=clip(got.target, 80))
            raise BackendUnavailable(f"the orchestrator gave no usable address for container {container_id}'s agent")
        ttl = math.inf if got.target.startswith("unix:") else TCP_TARGET_TTL_S
        return Agent(container_id=container_id, tenant=tenant, target=got.target,
                     token=internal_auth.agent_token(self._key, container_id), expires=time.monotonic() + ttl)


def _usable_target(target: str) -> bool:
    """"unix:/absolute/path" or "host:port" (the contract's two forms)."""
    if not target or len(target) > 1024 or any(c.isspace() for c in target):
        return False
    if target.startswith("unix:"):
        return target.startswith("unix:/")
    host, _, port = target.rpartition(":")
    return bool(host) and port.isdigit()


SERVICE = exec_pb2.DESCRIPTOR.services_by_name["ExecService"]


def method_path(method: str) -> str:
    """"Run" -> "/sandhub.exec.v1.ExecService/Run" (what the agent's check signs)."""
    return f"/{SERVICE.full_name}/{method}"


class AgentCalls:
    """One target's channel, every ExecService method opened as a bidi stream:
    the agent sends its proof before it reads a request of any kind, and a
    unary or server-stream call would send its request with the call itself."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=list(CHANNEL_OPTIONS))
        self._methods: dict[str, grpc.aio.StreamStreamMultiCallable[Any, Any]] = {}
        for m in SERVICE.methods:
            self._methods[m.name] = self.channel.stream_stream(
                method_path(m.name),
                request_serializer=_message(m.input_type).SerializeToString,
                response_deserializer=_message(m.output_type).FromString)

    def open(self, method: str, **options: Any) -> grpc.aio.StreamStreamCall[Any, Any]:
        return self._methods[method](**options)


def _message(descriptor: Any) -> Any:
    return getattr(exec_pb2, descriptor.name)


class _Pooled:
    def __init__(self, target: str) -> None:
        self.calls = AgentCalls(target)
        self.channel = self.calls.channel
        self.leases = 0
        self.evicted = False


class AgentChannels:
    """At most ``size`` channels, one per agent target, least recently used
    evicted first; an evicted channel closes when its last call ends (closing
    it at once would cancel calls in flight)."""

    def __init__(self, *, size: int = 512) -> None:
        self._size = size
        self._pool: OrderedDict[str, _Pooled] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def lease(self, target: str) -> Iterator[AgentCalls]:
        """``target``'s channel, held for one call."""
        pooled = self._pool.get(target)
        if pooled is None:
            pooled = self._pool[target] = _Pooled(target)
            while len(self._pool) > self._size:
                _, old = self._pool.popitem(last=False)
                old.evicted = True
                if not old.leases:
                    self._close(old)
        else:
            self._pool.move_to_end(target)
        pooled.leases += 1
        try:
            yield pooled.calls
        finally:
            pooled.leases -= 1
            if pooled.evicted and not pooled.leases:
                self._close(pooled)

    def _close(self, pooled: _Pooled) -> None:
        task = asyncio.ensure_future(pooled.channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def __len__(self) -> int:
        return len(self._pool)

    async def close(self) -> None:
        pooled = list(self._pool.values())
        self._pool.clear()
        for p in pooled:
            await p.channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
