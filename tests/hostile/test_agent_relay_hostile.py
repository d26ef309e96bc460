"""A hostile agent (the tenant owns it and can replace it) against the Hub's relay.

The agents here are Python servers that lie: huge messages, statuses with
unknown reasons and strange metadata, answers without (or with a wrong)
proof, streams that never end, calls that never answer. None of it may crash
the Hub, reach the caller as INTERNAL, leak into the caller's error details
unfiltered, or slow another container's calls. A real agent
($SANDHUB_AGENT) serves the other container.
"""

from __future__ import annotations

import asyncio
import hmac
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import hub_service.server
from sandhub import internal_auth, rpc
from sandhub.config import ExecLimits
from sandhub.errors import ECHO_CHARS, METADATA_KEYS
from sandhub.exec.v1 import exec_pb2 as pb
from sandhub.exec.v1 import exec_pb2_grpc as pb_grpc
from tests.integration.agent_harness import A, AGENT_KEY, B, Entry, RelayHub, agent_sends_proof, start_relay_hub

EVIL = "cnt-evil00000001"
GOOD = "cnt-good00000001"
MiB = 1 << 20


@dataclass
class FakeAgent(pb_grpc.ExecServiceServicer):
    """Does what ``mode`` says; proves itself with ``token`` (None: no proof)."""

    token: str | None
    mode: str = "ok"
    received: list[Any] = field(default_factory=list)
    sent: int = 0
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    headers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """(method, invocation metadata) of each call."""

    async def _prove(self, method: str, context: rpc.Ctx) -> None:
        """Before it reads any request, as the real agent does (the Hub sends
        none before the proof); an "unproven:" mode ends the call instead."""
        self.headers.append((method, dict(context.invocation_metadata() or ())))
        if self.mode.startswith("unproven:"):
            self.mode = self.mode.removeprefix("unproven:")
            await self._misbehave(context)
        if self.token is None:
            return
        nonce = self.headers[-1][1].get(internal_auth.AGENT_NONCE_KEY, "")
        await context.send_initial_metadata(((internal_auth.AGENT_PROOF_KEY,
                                              internal_auth.agent_proof(self.token, str(nonce))),))

    def handlers(self) -> grpc.GenericRpcHandler:
        """Every method as a bidi stream that proves itself first, as the real
        agent registers them."""
        handlers = {}
        for method in pb.DESCRIPTOR.services_by_name["ExecService"].methods:
            impl = getattr(self, method.name, None)
            if impl is not None:
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    self._proving(method.name, impl, method.client_streaming, method.server_streaming),
                    request_deserializer=getattr(pb, method.input_type.name).FromString,
                    response_serializer=lambda m: m.SerializeToString())
        return grpc.method_handlers_generic_handler("sandhub.exec.v1.ExecService", handlers)

    def _proving(self, name: str, impl: Any, client_streaming: bool, server_streaming: bool) -> Any:
        async def handler(requests: AsyncIterator[Any], context: rpc.Ctx) -> AsyncIterator[Any]:
            await self._prove(name, context)
            arg = requests if client_streaming else await requests.__anext__()
            if server_streaming:
                async for response in impl(arg, context):
                    yield response
            else:
                yield await impl(arg, context)
        return handler

    async def _misbehave(self, context: rpc.Ctx) -> None:
        if self.mode == "stall":
            await asyncio.sleep(3600)
        if self.mode.startswith("status:"):
            code, reason, meta = self.mode.split(":", 3)[1:]
            info = error_details_pb2.ErrorInfo(reason=reason, domain="sandhub.dev",
                                               metadata=dict(kv.split("=", 1) for kv in meta.split(",") if kv))
            detail = any_pb2.Any()
            detail.Pack(info)
            status = status_pb2.Status(code=grpc.StatusCode[code].value[0], message="agent says: " + "m" * 2000,
                                       details=[detail])
            await context.abort_with_status(rpc_status.to_status(status))
        if self.mode == "huge-trailers":
            context.set_trailing_metadata((("x-junk", "j" * 100_000),))
            await context.abort(grpc.StatusCode.NOT_FOUND, "junk")

    async def Run(self, request: pb.RunRequest, context: rpc.Ctx) -> pb.RunResponse:
        self.received.append(request)
        await self._misbehave(context)
        size = {"huge": 6 * MiB, "over-cap": request.max_output_bytes + 1}.get(self.mode, 5)
        return pb.RunResponse(stdout=b"s" * size, exit_status=pb.ExitStatus(exit_code=0))

    async def GetProcess(self, request: pb.GetProcessRequest, context: rpc.Ctx) -> pb.GetProcessResponse:
        self.received.append(request)
        await self._misbehave(context)
        argv = ["a" * MiB] * 3 if self.mode == "big-process" else []
        return pb.GetProcessResponse(process=pb.Process(process_id=request.process_id, command=pb.Command(argv=argv)))

    async def GetFiles(self, request: pb.GetFilesRequest, context: rpc.Ctx) -> AsyncIterator[pb.GetFilesResponse]:
        self.received.append(request)
        await self._misbehave(context)
        context.add_done_callback(lambda _: self.cancelled.set())  # it never ends otherwise
        yield pb.GetFilesResponse(info=pb.FileInfo(path="/x", size=-1))
        while True:
            yield pb.GetFilesResponse(data=b"d" * MiB)
            self.sent += 1

    async def PutFiles(self, request_iterator: AsyncIterator[pb.PutFilesRequest], context: rpc.Ctx) -> pb.PutFilesResponse:
        async for request in request_iterator:
            self.received.append(request)
        return pb.PutFilesResponse(total_bytes=1)

    async def Exec(self, request_iterator: AsyncIterator[pb.ExecRequest], context: rpc.Ctx) -> AsyncIterator[pb.ExecResponse]:
        await self._misbehave(context)
        context.add_done_callback(lambda _: self.cancelled.set())
        async for request in request_iterator:
            self.received.append(request)
            if self.mode == "flood":
                break
        while self.mode == "flood":  # never ends
            yield pb.ExecResponse(stdout=b"o" * 65536)
            self.sent += 1
        yield pb.ExecResponse(exit_status=pb.ExitStatus(exit_code=0))


@dataclass
class Hostile:
    relay: RelayHub
    agent: FakeAgent
    server: grpc.aio.Server


@pytest.fixture
async def hostile(request: pytest.FixtureRequest) -> AsyncIterator[Hostile]:
    if not agent_sends_proof():
        pytest.fail("agent/ does not send x-sandhub-agent-proof yet; the good container needs a real agent that does")
    hub_service.server.PROOF_TIMEOUT_S = 1.0  # a stalled agent is given up on quickly here (read at start_hub)
    root = Path(tempfile.mkdtemp(prefix="shh-", dir="/tmp"))
    try:
        config = getattr(request, "param", {})
        async for relay in start_relay_hub(root, backend_timeout_s=2.0, **config):
            await relay.agent(GOOD, tenant="tenant-b")
            fake = FakeAgent(token=internal_auth.agent_token(AGENT_KEY, EVIL))
            server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 * MiB)])
            server.add_generic_rpc_handlers((fake.handlers(),))
            socket = root / "evil.sock"
            server.add_insecure_port(f"unix:{socket}")
            await server.start()
            relay.directory.entries[EVIL] = Entry("tenant-a", f"unix:{socket}")
            try:
                yield Hostile(relay, fake, server)
            finally:
                await server.stop(0)
    finally:
        hub_service.server.PROOF_TIMEOUT_S = 10.0


def _run(cid: str, **kw: Any) -> pb.RunRequest:
    return pb.RunRequest(container_id=cid, command=pb.Command(argv=["echo", "ok"]), **kw)


async def _good_still_works(h: Hostile) -> None:
    reply = await h.relay.stub.Run(_run(GOOD), metadata=B, timeout=10)
    assert reply.stdout == b"ok\n"


def _error_info(e: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for key, value in e.trailing_metadata() or ():
        if key == rpc.STATUS_DETAILS_KEY:
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError("no ErrorInfo")


async def _run_error(h: Hostile, **kw: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await h.relay.stub.Run(_run(EVIL, **kw), metadata=A, timeout=20)
    return e.value


async def test_an_honest_fake_passes(hostile: Hostile) -> None:
    """The fixture's fake, well-behaved, gets through (so the failures below are the misbehaviour's)."""
    assert (await hostile.relay.stub.Run(_run(EVIL), metadata=A)).stdout == b"sssss"


@pytest.mark.parametrize("mode", [
    "huge", "over-cap", "huge-trailers",
    "status:INTERNAL:INTERNAL:", "status:UNKNOWN:INTERNAL:", "status:UNAUTHENTICATED:INVALID_CREDENTIALS:",
    "status:NOT_FOUND:HACKED:container_id=cnt-other0000001",  # a reason the contract does not know
    "status:RESOURCE_EXHAUSTED:INVALID_FIELD:field=x",  # a known reason with another code's
    "status:PERMISSION_DENIED:PATH_NOT_ALLOWED:path=/",
])
async def test_misbehaving_answers_are_unavailable_never_internal(hostile: Hostile, mode: str) -> None:
    hostile.agent.mode = mode
    e = await _run_error(hostile, max_output_bytes=1000)
    assert (e.code(), rpc.error_reason(e)) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE"), e
    assert "agent" in (e.details() or "")
    await _good_still_works(hostile)


async def test_a_meaningful_error_is_passed_on_with_rebuilt_details(hostile: Hostile) -> None:
    hostile.agent.mode = ("status:NOT_FOUND:PATH_NOT_FOUND:path=" + "p" * 3000
                          + ",container_id=cnt-other0000001,evil=1,x-sandhub-tenant=tenant-b")
    e = await _run_error(hostile)
    assert (e.code(), rpc.error_reason(e)) == (grpc.StatusCode.NOT_FOUND, "PATH_NOT_FOUND")
    info = _error_info(e)
    assert set(info.metadata) <= METADATA_KEYS and info.metadata["container_id"] == EVIL
    assert len(info.metadata["path"]) < ECHO_CHARS + 40
    assert len(e.details() or "") <= 1100


async def test_answers_without_the_right_proof_are_dropped(hostile: Hostile) -> None:
    """Unary calls too: the request itself goes out only after the proof."""
    for token in (None, internal_auth.agent_token(AGENT_KEY, GOOD), "x" * 64):
        hostile.agent.token = token
        e = await _run_error(hostile)
        assert e.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as got:
            await hostile.relay.stub.GetProcess(pb.GetProcessRequest(container_id=EVIL, process_id="p"), metadata=A)
        assert got.value.code() is grpc.StatusCode.UNAVAILABLE
    assert not hostile.agent.received, "a request reached an agent that did not prove itself"


async def test_the_credential_is_never_sent_and_every_call_is_signed(hostile: Hostile) -> None:
    token = internal_auth.agent_token(AGENT_KEY, EVIL)

    async def upload() -> AsyncIterator[pb.PutFilesRequest]:
        yield pb.PutFilesRequest(start=pb.PutFilesStart(container_id=EVIL))

    await hostile.relay.stub.Run(_run(EVIL), metadata=A)
    await hostile.relay.stub.GetProcess(pb.GetProcessRequest(container_id=EVIL, process_id="p"), metadata=A)
    await hostile.relay.stub.PutFiles(upload(), metadata=A)
    assert [m for m, _ in hostile.agent.headers] == ["Run", "GetProcess", "PutFiles"]
    nonces = set()
    for method, header in hostile.agent.headers:
        assert not [k for k, v in header.items() if token in str(v)], header
        nonce = header[internal_auth.AGENT_NONCE_KEY]
        nonces.add(nonce)
        expected = hmac.new(token.encode(), f"hub\x00{nonce}\x00/sandhub.exec.v1.ExecService/{method}".encode(),
                            "sha256").hexdigest()
        assert header[internal_auth.AGENT_AUTH_KEY] == expected
    assert len(nonces) == 3


async def test_a_status_before_the_proof_keeps_only_its_code_and_reason(hostile: Hostile) -> None:
    hostile.agent.mode = "unproven:status:NOT_FOUND:PATH_NOT_FOUND:path=/agent-chosen,evil=1"
    e = await _run_error(hostile)
    assert (e.code(), rpc.error_reason(e)) == (grpc.StatusCode.NOT_FOUND, "PATH_NOT_FOUND")
    assert "agent says" not in (e.details() or "") and "m" * 20 not in (e.details() or "")
    assert dict(_error_info(e).metadata) == {"container_id": EVIL}
    assert not hostile.agent.received


async def test_streams_send_nothing_to_an_agent_that_does_not_prove(hostile: Hostile) -> None:
    hostile.agent.token = internal_auth.agent_token(AGENT_KEY, GOOD)  # another container's agent

    async def upload() -> AsyncIterator[pb.PutFilesRequest]:
        yield pb.PutFilesRequest(start=pb.PutFilesStart(container_id=EVIL))
        yield pb.PutFilesRequest(file=pb.FileHeader(path="secret"))
        yield pb.PutFilesRequest(data=b"the tenant's secret")

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await hostile.relay.stub.PutFiles(upload(), metadata=A)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE

    async def session() -> AsyncIterator[pb.ExecRequest]:
        yield pb.ExecRequest(start=pb.ExecStart(container_id=EVIL, command=pb.Command(argv=["cat"])))
        yield pb.ExecRequest(stdin=b"the tenant's secret")

    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in hostile.relay.stub.Exec(session(), metadata=A):
            pass
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for m in hostile.relay.stub.GetFiles(pb.GetFilesRequest(container_id=EVIL, path="x"), metadata=A):
            raise AssertionError(f"got {m.WhichOneof('msg')} from an agent that did not prove itself")
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    assert not [r for r in hostile.agent.received if not isinstance(r, pb.GetFilesRequest)]


async def test_a_stalled_agent_times_out_and_others_go_on(hostile: Hostile) -> None:
    hostile.agent.mode = "stall"
    stalled = asyncio.ensure_future(hostile.relay.stub.GetProcess(
        pb.GetProcessRequest(container_id=EVIL, process_id="p"), metadata=A))
    await _good_still_works(hostile)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stalled  # the Hub's own deadline for a process call (backend_timeout_s)
    assert (e.value.code(), rpc.error_reason(e.value)) == (grpc.StatusCode.DEADLINE_EXCEEDED, "TIMEOUT")

    async def session() -> AsyncIterator[pb.ExecRequest]:
        yield pb.ExecRequest(start=pb.ExecStart(container_id=EVIL, command=pb.Command(argv=["cat"])))

    hostile.agent.token = None  # never sends its header: the relay gives up after PROOF_TIMEOUT_S
    hostile.agent.received.clear()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in hostile.relay.stub.Exec(session(), metadata=A):
            pass
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    assert not hostile.agent.received


async def test_a_never_ending_download_is_flow_controlled_and_cancelled(hostile: Hostile) -> None:
    call = hostile.relay.stub.GetFiles(pb.GetFilesRequest(container_id=EVIL, path="x"), metadata=A)
    assert (await call.read()).WhichOneof("msg") == "info"
    for _ in range(5):
        assert len((await call.read()).data) == MiB
    # The caller stops reading: the agent must soon be unable to send more
    # (flow control all the way back), however loaded this machine is.
    await _good_still_works(hostile)
    before, stalled = -1, False
    for _ in range(40):
        before = hostile.agent.sent
        await asyncio.sleep(0.5)
        if hostile.agent.sent == before:
            stalled = True
            break
    assert stalled, "the relay kept reading from the agent while its caller did not read"
    assert before < 64, f"{before} MiB in flight for one stream"
    call.cancel()
    await asyncio.wait_for(hostile.agent.cancelled.wait(), 10)


async def test_a_flooding_exec_is_cancelled_with_its_caller(hostile: Hostile) -> None:
    hostile.agent.mode = "flood"

    async def session() -> AsyncIterator[pb.ExecRequest]:
        yield pb.ExecRequest(start=pb.ExecStart(container_id=EVIL, command=pb.Command(argv=["yes"])))
        await asyncio.sleep(3600)

    call = hostile.relay.stub.Exec(session(), metadata=A)
    for _ in range(100):
        await call.read()
    await _good_still_works(hostile)
    call.cancel()
    await asyncio.wait_for(hostile.agent.cancelled.wait(), 10)


@pytest.mark.parametrize("hostile", [{"exec": ExecLimits(max_held_output_bytes_per_tenant=2 * MiB)}], indirect=True)
async def test_process_replies_count_against_the_output_budget(hostile: Hostile) -> None:
    """A 3 MiB GetProcess reply does not fit a 2 MiB budget: refused, and
    nothing stays counted once the calls are over."""
    budgets = hostile.relay.hub.budgets
    get = pb.GetProcessRequest(container_id=EVIL, process_id="p")
    await hostile.relay.stub.GetProcess(get, metadata=A)
    hostile.agent.mode = "big-process"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await hostile.relay.stub.GetProcess(get, metadata=A)
    assert (e.value.code(), rpc.error_reason(e.value)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    for _ in range(100):
        if budgets.output.used("tenant-a") == 0 and budgets.calls.count.used("tenant-a") == 0:
            break
        await asyncio.sleep(0.01)
    assert budgets.output.used("tenant-a") == 0 and budgets.calls.count.used("tenant-a") == 0


async def test_an_exec_refused_for_want_of_a_proof_ends_with_its_status_while_the_caller_writes(
        hostile: Hostile) -> None:
    """The caller writes stdin from the start; the agent can't prove itself.
    The caller must get UNAVAILABLE, never the INTERNAL that grpc.aio makes
    of its own write losing the race with the end of the call (the Hub drops
    what it still sends, to its half-close)."""
    hostile.agent.token = internal_auth.agent_token(AGENT_KEY, GOOD)  # another container's agent

    async def typing() -> AsyncIterator[pb.ExecRequest]:
        yield pb.ExecRequest(start=pb.ExecStart(container_id=EVIL, command=pb.Command(argv=["cat"])))
        for _ in range(300):
            yield pb.ExecRequest(stdin=b"s" * 16384)

    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in hostile.relay.stub.Exec(typing(), metadata=A):
                pass
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE, e.value
    assert not [r for r in hostile.agent.received if isinstance(r, pb.ExecRequest) and r.stdin]
