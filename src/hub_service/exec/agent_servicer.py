"""ExecService on the Hub as a router: authenticate, hold the tenant's budget,
find the container's agent, relay the call to it (relay.py).

The agent does the ExecService's work and its validation (commands, paths,
process ids, PTY sizes, timeouts). The Hub checks only what it needs itself:
the container id (it keys the look-up and the cache), Run's
``max_output_bytes`` (it sizes the reply the Hub holds) and, on streams, that
the first message is ``start`` (it names the container to route to).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

from hub_service.auth import ApiKeyAuth
from hub_service.budgets import HubBudgets
from hub_service.exec.agent_errors import agent_unavailable
from hub_service.exec.agents import MESSAGE_BYTES
from hub_service.exec.keepalives import with_keepalives
from hub_service.exec.relay import AgentRelay, drop_rest
from sandhub import rpc
from sandhub.budget import TenantBudget
from sandhub.config import ExecLimits
from sandhub.errors import InvalidField, InvalidStream
from sandhub.exec.v1 import exec_pb2 as pb
from sandhub.exec.v1 import exec_pb2_grpc as pb_grpc

GRACE_S = 30.0
"""Added to a command's own timeout for the agent's call: the agent kills the
command at its timeout and still has to answer."""
REPLY_FIELDS_BYTES = 4096
"""A RunResponse's bytes besides its output (status, timestamps, framing)."""


async def _first(requests: AsyncIterator[Any], name: str) -> Any:
    """The stream's first message, which must be ``start`` (it names the container)."""
    try:
        first = await requests.__anext__()
    except StopAsyncIteration:
        raise InvalidStream(f"the stream ended before its {name} message") from None
    if first.WhichOneof("msg") != "start":
        raise InvalidStream(f"the first message must be start, not {first.WhichOneof('msg') or 'empty'}")
    return first


def _seconds(duration: Any, *, default: float, maximum: float) -> float:
    """A request's timeout as the agent will read it, for the Hub's own deadline
    (a malformed one is the agent's to refuse: it is then answered at once)."""
    value = duration.seconds + duration.nanos / 1e9
    return default if value <= 0 else min(value, maximum)


class HeldReply:
    """The bytes one reply may hold in the Hub: taken from the tenant's output
    budget before the call (at least ``first``, or QUOTA_EXCEEDED before the
    agent is asked) and given back once the reply has gone."""

    def __init__(self, budget: TenantBudget, tenant: str, *, first: int, want: int) -> None:
        budget.take(tenant, first)
        self._budget, self._tenant = budget, tenant
        self.held = first + budget.take_upto(tenant, max(0, want - first))

    @property
    def per_stream(self) -> int:
        """What a Run's agent may keep of each of stdout and stderr."""
        return max(1, (self.held - REPLY_FIELDS_BYTES) // 2)

    def resize(self, size: int) -> None:
        """Holds exactly ``size`` (the reply that came): what is left over goes
        back at once, more is taken or QUOTA_EXCEEDED (the reply is dropped)."""
        if size > self.held:
            self._budget.take(self._tenant, size - self.held)
        else:
            self._budget.give_back(self._tenant, self.held - size)
        self.held = size

    def close(self) -> None:
        self._budget.give_back(self._tenant, self.held)
        self.held = 0


class AgentExecServicer(pb_grpc.ExecServiceServicer):
    """Every handler authenticates before it looks at the request."""

    def __init__(self, auth: ApiKeyAuth, relay: AgentRelay, limits: ExecLimits, budgets: HubBudgets, *,
                 call_timeout_s: float) -> None:
        """``call_timeout_s``: the longest a process call (Start/Get/List/Signal) may take."""
        self._auth = auth
        self._relay = relay
        self._limits = limits
        self._budgets = budgets
        self._slots = budgets.exec_calls
        self._calls = budgets.calls
        self._call_timeout_s = call_timeout_s

    @staticmethod
    def _deadline(context: rpc.Ctx, maximum: float) -> float:
        remaining = context.time_remaining()
        return maximum if remaining is None else max(0.0, min(remaining, maximum))

    async def PutFiles(self, request_iterator: AsyncIterator[pb.PutFilesRequest], context: rpc.Ctx) -> pb.PutFilesResponse:
        tenant = self._auth.tenant(context)
        with self._slots.hold(tenant):
            first = await _first(request_iterator, "start")
            try:
                agent = await self._relay.find(first.start.container_id, tenant=tenant, field="start.container_id")
                response: pb.PutFilesResponse = await self._relay.client_stream(
                    "PutFiles", first, request_iterator, agent=agent,
                    timeout_s=self._deadline(context, self._limits.max_upload_s + GRACE_S))
            except Exception:
                await drop_rest(request_iterator)  # refused while the caller still uploads
                raise
            return response

    async def GetFiles(self, request: pb.GetFilesRequest, context: rpc.Ctx) -> AsyncIterator[pb.GetFilesResponse]:
        tenant = self._auth.tenant(context)
        with self._slots.hold(tenant):
            agent = await self._relay.find(request.container_id, tenant=tenant)
            async for response in self._relay.server_stream(
                    "GetFiles", request, agent=agent, timeout_s=self._deadline(context, self._limits.max_exec_timeout_s)):
                yield response

    async def Run(self, request: pb.RunRequest, context: rpc.Ctx) -> pb.RunResponse:
        tenant = self._auth.tenant(context)  # first: an unknown caller learns nothing, not even a bad field
        limits = self._limits
        if request.max_output_bytes < 0 or request.max_output_bytes > limits.max_output_bytes:
            raise InvalidField("max_output_bytes", f"0..{limits.max_output_bytes}")
        cap = request.max_output_bytes or limits.default_output_bytes
        timeout = _seconds(request.timeout, default=limits.default_run_timeout_s, maximum=limits.max_run_timeout_s)
        # The slot and the reply stay taken until the reply has really gone (or
        # the call was cancelled), not until this returns: a client that does
        # not read would otherwise pile up replies the budget no longer counts.
        self._slots.take(tenant)
        held: list[HeldReply] = []

        def release() -> None:
            if held:
                held.pop().close()
            self._slots.give_back(tenant, 1)

        try:
            agent = await self._relay.find(request.container_id, tenant=tenant)
            reply = HeldReply(self._budgets.output, tenant, first=limits.chunk_bytes,
                             want=2 * cap + REPLY_FIELDS_BYTES)
            held.append(reply)
            sent = pb.RunRequest()
            sent.CopyFrom(request)
            sent.max_output_bytes = min(cap, reply.per_stream)
            response: pb.RunResponse = await self._relay.unary(
                "Run", sent, agent=agent, timeout_s=self._deadline(context, timeout + GRACE_S))
            if len(response.stdout) > sent.max_output_bytes or len(response.stderr) > sent.max_output_bytes:
                raise agent_unavailable(agent.container_id, "sent more output than it was asked to keep")
        except BaseException:
            release()
            raise
        context.add_done_callback(cast(Any, lambda _: release()))  # the stubs want a nominal _DoneCallback
        return response

    async def Exec(self, request_iterator: AsyncIterator[pb.ExecRequest], context: rpc.Ctx) -> AsyncIterator[pb.ExecResponse]:
        tenant = self._auth.tenant(context)
        with self._slots.hold(tenant):
            first = await _first(request_iterator, "start")
            try:
                agent = await self._relay.find(first.start.container_id, tenant=tenant, field="start.container_id")
                timeout = _seconds(first.start.timeout, default=self._limits.max_exec_timeout_s,
                                   maximum=self._limits.max_exec_timeout_s)
                responses = self._relay.bidi_stream(
                    "Exec", first, request_iterator, agent=agent, timeout_s=self._deadline(context, timeout + GRACE_S))
                async for response in with_keepalives(responses, interval_s=self._limits.keepalive_s,
                                                      keepalive=lambda: pb.ExecResponse(keepalive=pb.Keepalive()),
                                                      last=lambda r: r.HasField("exit_status")):
                    yield response
            except Exception:
                # Refused (unknown container, an agent that can't be reached or
                # proven) while the caller may already write stdin. Once the
                # relay's pump has read the stream, this returns at once.
                await drop_rest(request_iterator)
                raise

    async def _process_call(self, method: str, request: Any, context: rpc.Ctx) -> Any:
        """Like Run, the call's slot and its reply (up to a message's 4 MiB)
        stay counted until the reply has gone: a caller that does not read
        cannot pile up replies the budgets no longer see."""
        tenant = self._auth.tenant(context)
        self._calls.count.take(tenant)
        held: list[HeldReply] = []

        def release() -> None:
            if held:
                held.pop().close()
            self._calls.count.give_back(tenant, 1)

        try:
            reply = HeldReply(self._budgets.output, tenant, first=self._limits.chunk_bytes, want=MESSAGE_BYTES)
            held.append(reply)
            async with self._calls.gate.turn(tenant):
                agent = await self._relay.find(request.container_id, tenant=tenant)
                response = await self._relay.unary(method, request, agent=agent,
                                                   timeout_s=self._deadline(context, self._call_timeout_s))
            reply.resize(response.ByteSize())
            # An agent speaks for its own container only, whatever it wrote there.
            for process in response.processes if method == "ListProcesses" else [response.process]:
                process.container_id = agent.container_id
        except BaseException:
            release()
            raise
        context.add_done_callback(cast(Any, lambda _: release()))
        return response

    async def StartProcess(self, request: pb.StartProcessRequest, context: rpc.Ctx) -> pb.StartProcessResponse:
        return await self._process_call("StartProcess", request, context)  # type: ignore[no-any-return]

    async def GetProcess(self, request: pb.GetProcessRequest, context: rpc.Ctx) -> pb.GetProcessResponse:
        return await self._process_call("GetProcess", request, context)  # type: ignore[no-any-return]

    async def ListProcesses(self, request: pb.ListProcessesRequest, context: rpc.Ctx) -> pb.ListProcessesResponse:
        return await self._process_call("ListProcesses", request, context)  # type: ignore[no-any-return]

    async def SignalProcess(self, request: pb.SignalProcessRequest, context: rpc.Ctx) -> pb.SignalProcessResponse:
        return await self._process_call("SignalProcess", request, context)  # type: ignore[no-any-return]

    async def AttachProcess(self, request: pb.AttachProcessRequest, context: rpc.Ctx) -> AsyncIterator[pb.AttachProcessResponse]:
        tenant = self._auth.tenant(context)
        with self._slots.hold(tenant):
            agent = await self._relay.find(request.container_id, tenant=tenant)
            responses = self._relay.server_stream(
                "AttachProcess", request, agent=agent, timeout_s=self._deadline(context, self._limits.max_exec_timeout_s))
            async for response in with_keepalives(
                    responses, interval_s=self._limits.keepalive_s,
                    keepalive=lambda: pb.AttachProcessResponse(keepalive=pb.Keepalive())):
                yield response
