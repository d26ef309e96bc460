"""Relays one ExecService call to a container's agent, one function per RPC kind.

The container's credential is never sent: every call carries a fresh nonce
and the Hub's signature of it and of the method (``x-sandhub-agent-auth``, see
agents.proto), and is answered only once the agent proved it holds that
credential (``x-sandhub-agent-proof``). Every call, whatever its kind, is
opened as a bidi stream and waits for that proof before a single request
payload goes out or a single response comes back, so an address handed on to
another container neither receives nor gives this container's data.

Flow control: one message in flight each way (every write is awaited before
the next is read from the caller, every response is handed to the caller
before the next is read from the agent). Cancellation: the agent's call ends
when the caller's does (``finally: call.cancel()``). Deadlines: the caller's
remaining one, capped by the RPC's own maximum. Errors: see agent_errors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from hub_service.exec.agent_errors import agent_unavailable, passed_on
from hub_service.exec.agents import Agent, AgentChannels, AgentDirectory, method_path
from sandhub import internal_auth, rpc
from sandhub.errors import SandhubError

log = structlog.get_logger("sandhub.hub.relay")

Metadata = tuple[tuple[str, str | bytes], ...] | grpc.aio.Metadata | None

# How long a finished Exec waits for its caller's half-close (the agent's exitLinger).
EXIT_LINGER_S = 2.0
# How long headers without a proof wait for the status that may come with them.
ENDED_GRACE_S = 0.5


def _proven(agent: Agent, nonce: str, header: Metadata) -> bool:
    """Whether the header holds exactly one proof, and the right one."""
    proofs = [v for k, v in header or () if k == internal_auth.AGENT_PROOF_KEY]
    if len(proofs) != 1 or not isinstance(proofs[0], str) or len(proofs[0]) != 64:
        return False
    return internal_auth.proof_ok(agent.token, nonce, proofs[0])


class AgentRelay:
    def __init__(self, directory: AgentDirectory, channels: AgentChannels, *, proof_timeout_s: float) -> None:
        """``proof_timeout_s``: how long a call waits for the agent's header
        (connecting included) before the agent counts as unreachable."""
        self._directory = directory
        self._channels = channels
        self._proof_timeout_s = proof_timeout_s

    async def find(self, container_id: str, *, tenant: str, field: str = "container_id") -> Agent:
        return await self._directory.find(container_id, tenant=tenant, field=field)

    @staticmethod
    def _metadata(agent: Agent, nonce: str, method: str) -> tuple[tuple[str, str], ...]:
        """Made here, nothing copied from the caller's metadata: the caller's API
        key never reaches the agent."""
        pairs = list(internal_auth.agent_call_metadata(agent.token, method_path(method), nonce))
        info = rpc.current_rpc.get()
        if info is not None:
            pairs.append((rpc.REQUEST_ID_KEY, info.request_id))
        return tuple(pairs)

    async def _failure(self, agent: Agent, e: grpc.aio.AioRpcError | None, what: str, *,
                       proven: bool = True) -> Exception:
        """The caller's error when a call to ``agent`` went wrong: its status
        if it means something to the caller (an unproven agent's without its
        text); else the Orchestrator's word on the container if that changed
        (NOT_FOUND, NOT_RUNNING), else UNAVAILABLE."""
        if e is not None:
            passed = passed_on(e, container_id=agent.container_id, proven=proven)
            if passed is not None:
                return passed
        log.warning("hub.agent_failed", container_id=agent.container_id, target=agent.target, what=what,
                    code=e.code().name if e is not None else None)
        try:
            await self._directory.recheck(agent)
        except SandhubError as err:
            return err
        except grpc.aio.AioRpcError as err:
            if rpc.error_reason(err):  # the Orchestrator's word (NOT_FOUND, NOT_RUNNING): passed on as for containers
                return err
            return agent_unavailable(agent.container_id, f"is unreachable and the orchestrator said {err.code().name}")
        return agent_unavailable(agent.container_id, what)

    async def _error(self, agent: Agent, e: grpc.aio.AioRpcError) -> Exception:
        """An error status of a call whose agent proved itself."""
        if e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED) and not e.initial_metadata():
            return await self._failure(agent, e, "did not answer in time")  # raised here, not by the agent
        return await self._failure(agent, e, f"failed ({e.code().name})")

    @contextlib.asynccontextmanager
    async def _call(self, method: str, agent: Agent, timeout_s: float) -> AsyncIterator[Any]:
        """``method``'s call to ``agent``, opened and proven; its errors become
        the caller's (see _failure), and it is cancelled on the way out."""
        nonce = internal_auth.new_agent_nonce()
        with self._channels.lease(agent.target) as calls:
            call = calls.open(method, metadata=self._metadata(agent, nonce, method), timeout=timeout_s)
            try:
                await self._prove(call, agent, nonce)
                yield call
            except grpc.aio.AioRpcError as e:
                raise await self._error(agent, e) from None
            finally:
                call.cancel()  # no-op once done; ends the agent's call if the caller went away

    async def _prove(self, call: Any, agent: Agent, nonce: str) -> None:
        """Waits (bounded) for the agent's header and checks its proof."""
        try:
            async with asyncio.timeout(self._proof_timeout_s):
                header = await call.initial_metadata()
        except TimeoutError:
            call.cancel()
            raise await self._failure(agent, None, "did not answer in time") from None
        if _proven(agent, nonce, header):
            return
        # No proof. An agent that refuses ends the call with these headers (a
        # trailers-only status), whose end may be seen a moment after them:
        # wait for it, briefly, before calling the agent unreachable.
        over = asyncio.Event()
        call.add_done_callback(lambda _: over.set())  # at once if it is over already
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(over.wait(), ENDED_GRACE_S)
        if call.done() and await call.code() is not grpc.StatusCode.OK:
            # Ended before a proof reached us (the agent refused the Hub's
            # signature, or is not this container's): nothing was sent yet, and
            # of its status only a code and reason the contract pairs go on,
            # in words the Hub writes (a wrong agent's refusal of the
            # signature, UNAUTHENTICATED, is UNAVAILABLE after the recheck).
            ended = grpc.aio.AioRpcError(await call.code(), grpc.aio.Metadata(),
                                         await call.trailing_metadata() or grpc.aio.Metadata(),
                                         details=await call.details())
            raise await self._failure(agent, ended, f"failed ({ended.code().name}) without a proof", proven=False)
        call.cancel()
        raise await self._failure(agent, None, "could not be reached, or did not prove it is this container's")

    async def unary(self, method: str, request: Any, *, agent: Agent, timeout_s: float) -> Any:
        """Run, StartProcess, GetProcess, ListProcesses, SignalProcess: the
        request goes out after the proof, then exactly one reply and an OK."""
        async with self._call(method, agent, timeout_s) as call:
            if await _send(call, request):
                await _half_close(call)
            return await _only_reply(call, agent)

    async def server_stream(self, method: str, request: Any, *, agent: Agent, timeout_s: float) -> AsyncIterator[Any]:
        """GetFiles, AttachProcess."""
        async with self._call(method, agent, timeout_s) as call:
            if await _send(call, request):
                await _half_close(call)
            while (response := await call.read()) is not grpc.aio.EOF:
                yield response

    async def client_stream(self, method: str, first: Any, rest: AsyncIterator[Any], *, agent: Agent,
                            timeout_s: float) -> Any:
        """PutFiles: ``first`` (already read by the servicer), then ``rest``."""
        async with self._call(method, agent, timeout_s) as call:
            if await _send(call, first):
                async for request in rest:
                    if not await _send(call, request):
                        break  # the agent ended the call: its status says why
                else:
                    await _half_close(call)
            return await _only_reply(call, agent)

    async def bidi_stream(self, method: str, first: Any, rest: AsyncIterator[Any], *, agent: Agent,
                          timeout_s: float) -> AsyncIterator[Any]:
        """Exec: requests go up in a task of their own while responses come down;
        the caller half-closing half-closes the agent's call."""
        upstream: asyncio.Task[None] | None = None
        writes = _Writes()
        async with self._call(method, agent, timeout_s) as call:
            try:
                if await _send(call, first):  # else the agent ended the call: read() raises its status
                    upstream = asyncio.ensure_future(_pump(call, rest, writes))
                while True:
                    try:
                        response = await call.read()
                    except asyncio.CancelledError:
                        # _pump cancels the agent's call when the caller's
                        # stream broke (a malformed message): that error wins.
                        failed = _caller_error(upstream)
                        if failed is None or _being_cancelled():
                            raise
                        raise failed from None
                    if response is grpc.aio.EOF:
                        break
                    if upstream is not None and not writes.stopped and response.WhichOneof("msg") == "exit_status":
                        # The command is over: stop writing before the agent
                        # ends the call (a write that loses that race makes
                        # grpc.aio report INTERNAL instead of the agent's OK,
                        # grpc/grpc#36066), then half-close, which the agent
                        # waits for (bounded) before it ends the call.
                        await writes.stop()
                        await _half_close(call)
                    yield response
                if upstream is not None and writes.stopped:
                    await _linger(upstream)
            except Exception:
                if upstream is not None:
                    writes.stopped = True  # the call failed: what the caller still sends goes nowhere
                    await _linger(upstream)
                raise
            finally:
                if upstream is not None:
                    upstream.cancel()
                    with contextlib.suppress(BaseException):
                        await upstream


async def _linger(pump: asyncio.Task[None]) -> None:
    """The same race one hop up: ending the caller's call while it still
    writes fails its write with INTERNAL instead of our status. The pump drops
    what the caller still sends; wait (bounded, like the agent) for the
    caller's half-close."""
    await asyncio.wait({pump}, timeout=EXIT_LINGER_S)


async def drop_rest(requests: AsyncIterator[Any]) -> None:
    """Reads and drops what a caller still sends on a call that failed, until
    it half-closes (at most EXIT_LINGER_S), so the error reaches it rather
    than an INTERNAL from its own write (grpc/grpc#36066)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(EXIT_LINGER_S):
            async for _ in requests:
                pass


async def _only_reply(call: Any, agent: Agent) -> Any:
    """The one reply of a call with a single response, once the call ended OK
    (read() raises the status of one that did not)."""
    reply = await call.read()
    if reply is grpc.aio.EOF:
        raise agent_unavailable(agent.container_id, "ended the call without a reply")
    if await call.read() is not grpc.aio.EOF:
        raise agent_unavailable(agent.container_id, "sent more than one reply")
    return reply


async def _half_close(call: Any) -> None:
    with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
        await call.done_writing()


async def _send(call: Any, request: Any) -> bool:
    """Writes one request; False when the agent's call already ended. Never
    writes to a call known to be over: a write that fails because the agent
    ended the call meanwhile makes grpc.aio replace the agent's status with
    INTERNAL (grpc/grpc#36066; the agent reads a refused upload to its end to
    keep that window closed)."""
    if call.done():
        return False
    try:
        await call.write(request)
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
        return False
    return True


class _Writes:
    """Lets Exec's reader stop the pump between writes, never during one."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.stopped = False

    async def stop(self) -> None:
        async with self.lock:  # a write in flight finishes first
            self.stopped = True  # the pump now drops what the caller sends


async def _pump(call: Any, requests: AsyncIterator[Any], writes: _Writes) -> None:
    """The caller's requests to the agent, then the half-close. A caller's
    broken stream (an exception from ``requests``) cancels the agent's call
    and is kept as this task's exception."""
    try:
        async for request in requests:
            async with writes.lock:
                if writes.stopped:
                    continue  # the command ended: what the caller still sends is dropped
                if not await _send(call, request):
                    writes.stopped = True  # the agent ended the call: its status says why
        async with writes.lock:
            if not writes.stopped:
                await _half_close(call)
    except asyncio.CancelledError:
        raise
    except BaseException:
        call.cancel()
        raise


def _caller_error(upstream: asyncio.Task[None] | None) -> BaseException | None:
    if upstream is None or not upstream.done() or upstream.cancelled():
        return None
    return upstream.exception()


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
