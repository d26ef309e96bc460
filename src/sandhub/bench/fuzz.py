"""A request fuzzer for the Hub's public services, and its oracle.

``fuzz(channel, ...)`` sends ``requests`` calls generated from a seed
(`fuzz_calls.generate`) to a Hub, a few at a time, each with a deadline, and
judges every answer:

- a response, or an error with a specific code: fine;
- INTERNAL or UNKNOWN: a failure (a bug the caller could provoke);
- DEADLINE_EXCEEDED at the client's deadline: a hang, unless the request
  itself may rightly wait (those are cancelled by the client after a second);
- CANCELLED the client did not ask for; an error message longer than
  MAX_MESSAGE_CHARS (echoed input); a sandhub error without an ErrorInfo
  reason; an OK answer about another tenant's container, or another tenant's
  container in any answer; a valid (unmutated) request that does not succeed;
  an exception nobody handled on the servers' event loop: failures too;
- the memory of the process the Hub runs in (``rss``) may not grow by more
  than ``max_rss_growth_mib`` over the run;
- afterwards the Hub (and the Orchestrator behind it) must still answer a
  plain GetContainer and Run quickly.

Each failure carries the seed, the call's index and a compact repr of what
was sent: ``generate(seed, index, aim)`` builds the same call again. The
tests run it with a fixed seed (tests/hostile/test_fuzz.py); `sandhub bench
fuzz` runs it longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message

from sandhub import rpc
from sandhub.bench.fuzz_calls import (
    DONE_PROCESS, LABEL, LIVE_PROCESS, READ_DIR, Aim, Call, generate, message_class, methods,
)
from sandhub.bench.fuzz_values import compact
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.orchestrator.v1 import orchestrator_pb2 as opb

log = structlog.get_logger("sandhub.bench.fuzz")

DEADLINE_S = 10.0
"""Every call's deadline; a call that reaches it (and may not rightly wait) hangs."""
HEAVY_DEADLINE_S = 30.0
"""The deadline of calls that carry much work by design (an upload of many
files costs a few processes in the container per file): on a busy 2-core
host they take seconds, which is slow, not a hang."""
MAX_MESSAGE_CHARS = 4096
"""An error message longer than this echoes a caller's input (the servers cut
echoes to a few hundred characters)."""
MAX_READ_BYTES = 32 << 20
"""A server stream is read up to this much, then cancelled by the client."""
LIVENESS_S = 5.0
"""After the run, a plain GetContainer and Run must each answer within this."""
FAILED = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
CLIENT_SIDE = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    reason: str
    elapsed_s: float
    cancelled_by_client: bool = False
    responses: list[Message] = field(default_factory=list)
    read_bytes: int = 0


@dataclass(frozen=True)
class Failure:
    seed: int
    index: int
    rpc: str
    strategy: str
    what: str
    code: str
    details: str
    request: str

    def __str__(self) -> str:
        return (f"seed={self.seed} index={self.index} {self.rpc} [{self.strategy}]: {self.what} "
                f"({self.code}: {self.details[:200]!r})\n    request: {self.request}")


@dataclass
class Report:
    seed: int
    requests: int = 0
    duration_s: float = 0.0
    by_rpc: Counter[str] = field(default_factory=Counter)
    by_code: Counter[str] = field(default_factory=Counter)
    by_rpc_code: Counter[tuple[str, str]] = field(default_factory=Counter)
    slowest_s: dict[str, float] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    rss_start_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_end_mib: float = 0.0
    liveness_ms: dict[str, float] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)
    loop_errors: Counter[str] = field(default_factory=Counter)
    """Exceptions nobody handled on the client's and the servers' event loops:
    a servicer's task or generator that failed after its call ended."""

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_peak_mib - self.rss_start_mib


def self_rss_bytes() -> int:
    """VmRSS of this process (the servers run in it in the tests and the bench)."""
    return pid_rss_bytes("self")


def pid_rss_bytes(pid: int | str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# Setting up what the fuzzer aims at ------------------------------------------

async def prepare(channel: grpc.aio.Channel, metadata: Iterable[tuple[str, str]], *, containers: int = 2,
                  processes: bool = True) -> tuple[str, ...]:
    """Creates the tenant's own containers the fuzzer aims at, each with a few
    files in READ_DIR, and in the first one (with ``processes``) a background
    process that has exited and one that keeps running."""
    md = tuple(metadata)
    ids = []
    create = channel.unary_unary("/sandhub.orchestrator.v1.OrchestratorService/CreateContainer",
                                 request_serializer=opb.CreateContainerRequest.SerializeToString,
                                 response_deserializer=opb.CreateContainerResponse.FromString)
    start = channel.unary_unary("/sandhub.exec.v1.ExecService/StartProcess",
                                request_serializer=xpb.StartProcessRequest.SerializeToString,
                                response_deserializer=xpb.StartProcessResponse.FromString)
    put = channel.stream_unary("/sandhub.exec.v1.ExecService/PutFiles",
                               request_serializer=xpb.PutFilesRequest.SerializeToString,
                               response_deserializer=xpb.PutFilesResponse.FromString)
    for _ in range(containers):
        req = opb.CreateContainerRequest(labels=dict([LABEL]), wait_until_running=True)
        c = (await create(req, metadata=md, timeout=60)).container
        if c.state != opb.CONTAINER_STATE_RUNNING:
            raise RuntimeError(f"fuzz target container {c.container_id} is {opb.ContainerState.Name(c.state)}: {c.state_message}")
        ids.append(c.container_id)
        files = [xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=c.container_id, destination=READ_DIR))]
        for name, content in (("a.txt", b"a" * 100), ("sub/b.bin", bytes(range(256)) * 64)):
            files += [xpb.PutFilesRequest(file=xpb.FileHeader(path=name, size=len(content))),
                      xpb.PutFilesRequest(data=content)]
        await put(iter(files), metadata=md, timeout=30)
    for pid, argv in ((DONE_PROCESS, ["echo", "done"]), (LIVE_PROCESS, ["sleep", "3600"])) if processes else ():
        await start(xpb.StartProcessRequest(container_id=ids[0], process_id=pid, command=xpb.Command(argv=argv)),
                    metadata=md, timeout=30)
    return tuple(ids)


async def tenant_of(channel: grpc.aio.Channel, metadata: Iterable[tuple[str, str]], container_id: str) -> str:
    """The tenant the Hub says owns ``container_id`` (the caller's own)."""
    get = channel.unary_unary("/sandhub.orchestrator.v1.OrchestratorService/GetContainer",
                              request_serializer=opb.GetContainerRequest.SerializeToString,
                              response_deserializer=opb.GetContainerResponse.FromString)
    resp = await get(opb.GetContainerRequest(container_id=container_id), metadata=tuple(metadata), timeout=30)
    return str(resp.container.tenant)


async def delete_quietly(channel: grpc.aio.Channel, metadata: Iterable[tuple[str, str]], container_id: str) -> None:
    """Deletes a container, whatever it is now (gone already is fine)."""
    delete = channel.unary_unary("/sandhub.orchestrator.v1.OrchestratorService/DeleteContainer",
                                 request_serializer=opb.DeleteContainerRequest.SerializeToString,
                                 response_deserializer=opb.DeleteContainerResponse.FromString)
    with contextlib.suppress(grpc.aio.AioRpcError):
        await delete(opb.DeleteContainerRequest(container_id=container_id), metadata=tuple(metadata), timeout=30)


# Making one call -------------------------------------------------------------

class Caller:
    """Makes a Call on a channel, whatever its shape, and says how it ended."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Iterable[tuple[str, str]], *,
                 deadline_s: float = DEADLINE_S) -> None:
        self._metadata = tuple(metadata)
        self._deadline_s = deadline_s
        self._callables: dict[str, Any] = {}
        self._raw_callables: dict[str, Any] = {}
        for m in methods():
            path = f"/{m.containing_service.full_name}/{m.name}"
            kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                    (True, False): channel.stream_unary, (True, True): channel.stream_stream}
            make = kind[(m.client_streaming, m.server_streaming)]
            self._callables[path] = make(path, request_serializer=_serialize,
                                         response_deserializer=message_class(m.output_type).FromString)
            self._raw_callables[path] = make(path, request_serializer=bytes,
                                             response_deserializer=message_class(m.output_type).FromString)

    def deadline_of(self, c: Call) -> float:
        return max(self._deadline_s, HEAVY_DEADLINE_S) if c.heavy else self._deadline_s

    async def call(self, c: Call) -> Outcome:
        multi = self._callables[c.path]
        md = (*self._metadata, *c.metadata)
        deadline_s = self.deadline_of(c)
        t0 = time.monotonic()
        if c.client_streaming:
            grpc_call = multi(metadata=md, timeout=deadline_s)
        elif c.raw is not None:
            grpc_call = self._raw_callables[c.path](c.raw, metadata=md, timeout=deadline_s)
        else:
            grpc_call = multi(c.messages[0], metadata=md, timeout=deadline_s)
        outcome = Outcome(code=grpc.StatusCode.OK, details="", reason="", elapsed_s=0.0)
        try:
            await asyncio.wait_for(self._drive(c, grpc_call, outcome), deadline_s + 10)
            code = await asyncio.wait_for(grpc_call.code(), 10)
            outcome.details = (await grpc_call.details()) or ""
            if code is not grpc.StatusCode.OK:
                outcome.reason = _reason(await grpc_call.trailing_metadata())
        except asyncio.TimeoutError:
            grpc_call.cancel()
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            outcome.details = "the client's own deadline did not end the call"
        outcome.code = code
        outcome.elapsed_s = time.monotonic() - t0
        return outcome

    async def _drive(self, c: Call, grpc_call: Any, outcome: Outcome) -> None:
        writer = asyncio.ensure_future(self._write(c, grpc_call, outcome)) if c.client_streaming else None
        reader = asyncio.ensure_future(self._read(c, grpc_call, outcome))
        tasks = [t for t in (writer, reader) if t is not None]
        try:
            if c.cancel_after_s is not None:
                _, pending = await asyncio.wait([reader], timeout=c.cancel_after_s)
                if pending:
                    outcome.cancelled_by_client = True
                    grpc_call.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for t in tasks:
                t.cancel()

    async def _write(self, c: Call, grpc_call: Any, outcome: Outcome) -> None:
        try:
            for i, msg in enumerate(c.messages):
                if c.cancel_after_messages == i:
                    outcome.cancelled_by_client = True
                    grpc_call.cancel()
                    return
                if grpc_call.done():
                    return  # the server ended the call: writing on only hides its status (see _core_artifact)
                await grpc_call.write(msg)
            if c.half_close:
                await grpc_call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.CancelledError):
            _reraise_if_cancelled()  # else the server ended the call already: its status says how

    async def _read(self, c: Call, grpc_call: Any, outcome: Outcome) -> None:
        try:
            if not c.server_streaming:
                outcome.responses.append(await grpc_call)
                return
            async for resp in _responses(grpc_call):
                outcome.read_bytes += resp.ByteSize()
                if len(outcome.responses) < 200:
                    outcome.responses.append(resp)
                if outcome.read_bytes > MAX_READ_BYTES or len(outcome.responses) == c.cancel_after_responses:
                    outcome.cancelled_by_client = True
                    grpc_call.cancel()
                    return
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            _reraise_if_cancelled()  # else the call ended: its status says how


def _reraise_if_cancelled() -> None:
    """Re-raises a CancelledError meant for this task (not the call's own)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _responses(grpc_call: Any) -> AsyncIterator[Message]:
    async for resp in grpc_call:
        yield resp


def _serialize(msg: Message) -> bytes:
    return msg.SerializeToString()


def _reason(trailing: Any) -> str:
    class _Err:  # rpc.error_reason reads trailing metadata only
        def trailing_metadata(self) -> Any:
            return trailing

    return rpc.error_reason(_Err())  # type: ignore[arg-type]


# The oracle --------------------------------------------------------------------

def judge(c: Call, o: Outcome, *, tenant: str, deadline_s: float = DEADLINE_S) -> list[str]:
    """What is wrong with how ``c`` ended; empty when nothing is."""
    wrong = []
    if o.code in FAILED and not core_artifact(c, o):
        wrong.append(o.code.name)
    if o.code is grpc.StatusCode.DEADLINE_EXCEEDED and o.elapsed_s >= 0.9 * deadline_s and not c.may_wait:
        wrong.append(f"hang: no answer in {o.elapsed_s:.1f}s")
    if o.code is grpc.StatusCode.CANCELLED and not o.cancelled_by_client:
        wrong.append("CANCELLED without the client cancelling")
    if len(o.details) > MAX_MESSAGE_CHARS:
        wrong.append(f"error message of {len(o.details)} characters")
    if o.code not in (grpc.StatusCode.OK, *CLIENT_SIDE, *FAILED) and not o.reason and not _grpc_own(o):
        wrong.append("error without an ErrorInfo reason")
    if c.expect and o.code.name not in c.expect and not o.cancelled_by_client:
        wrong.append(f"a valid request ended {o.code.name}, expected {' or '.join(sorted(c.expect))}")
    if o.code is grpc.StatusCode.OK and c.foreign:
        wrong.append("OK for another tenant's container")
    others = {t for r in o.responses for t in _tenants(r)} - {tenant, ""}
    if others:
        wrong.append(f"another tenant's container in the answer: {sorted(others)}")
    return wrong


def core_artifact(c: Call, o: Outcome) -> bool:
    """The grpc.aio client's own INTERNAL for a write that lost a race with the
    server's status (grpc/grpc#36066): the server answered with its code (its
    log line says which), the client library then overwrote it. A server's
    INTERNAL always carries an ErrorInfo reason, so the two can't be confused."""
    return (c.client_streaming and o.code is grpc.StatusCode.INTERNAL and not o.reason
            and o.details == "Internal error from Core")


def _grpc_own(o: Outcome) -> bool:
    """Errors gRPC itself makes (message size limits), before any servicer runs."""
    return o.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in o.details


def _tenants(msg: Message) -> list[str]:
    names = msg.DESCRIPTOR.fields_by_name
    found = []
    if "container" in names and msg.HasField("container"):
        found.append(msg.container.tenant)  # type: ignore[attr-defined]
    if "containers" in names:
        found.extend(c.tenant for c in msg.containers)  # type: ignore[attr-defined]
    return found


# The run -----------------------------------------------------------------------

async def fuzz(channel: grpc.aio.Channel, metadata: Iterable[tuple[str, str]], *, tenant: str, aim: Aim, seed: int,
               requests: int, seconds: float = 0.0, concurrency: int = 4, deadline_s: float = DEADLINE_S,
               rss: Callable[[], int] = self_rss_bytes, max_rss_growth_mib: float = 300.0,
               indices: Iterable[int] | None = None,
               server_loops: Iterable[asyncio.AbstractEventLoop] = ()) -> Report:
    """Sends ``requests`` generated calls (or those of ``indices``), stopping
    early after ``seconds`` if that is set, and reports. Exceptions nobody
    handled on this event loop and on ``server_loops`` (where in-process
    servers run, if not on this one) are failures too."""
    caller = Caller(channel, metadata, deadline_s=deadline_s)
    report = Report(seed=seed)
    gc.collect()
    report.rss_start_mib = report.rss_peak_mib = rss() / (1 << 20)
    todo = iter(indices if indices is not None else range(requests))
    t0 = time.monotonic()
    stop = asyncio.Event()

    async def sample_rss() -> None:
        while not stop.is_set():
            report.rss_peak_mib = max(report.rss_peak_mib, rss() / (1 << 20))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    async def worker() -> None:
        for index in todo:
            if seconds and time.monotonic() - t0 > seconds:
                return
            c = generate(seed, index, aim)
            outcome = await caller.call(c)
            _record(report, c, outcome, tenant=tenant, deadline_s=caller.deadline_of(c))

    sampler = asyncio.ensure_future(sample_rss())
    loops = {asyncio.get_running_loop(), *server_loops}
    previous = {loop: loop.get_exception_handler() for loop in loops}

    def unhandled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        text = f"{type(error).__name__}: {error}" if error else str(context.get("message"))
        report.loop_errors[re.sub(r"0x[0-9a-f]+", "0x...", text)[:300]] += 1
        handler = previous.get(loop)
        if handler is not None:
            handler(loop, context)
        else:
            loop.default_exception_handler(context)

    for loop in loops:
        loop.set_exception_handler(unhandled)
    try:
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            stop.set()
            await sampler
        report.duration_s = time.monotonic() - t0
        await _cleanup(channel, caller, report)
        gc.collect()  # finalizes abandoned generators now, under the handler
        await asyncio.sleep(0.1)
    finally:
        for loop, handler in previous.items():
            loop.set_exception_handler(handler)
    for error, n in report.loop_errors.items():
        report.failures.append(Failure(seed, -1, "-", "-", f"unhandled exception on the event loop ({n}x)",
                                       "-", error, ""))
    report.rss_end_mib = rss() / (1 << 20)
    report.rss_peak_mib = max(report.rss_peak_mib, report.rss_end_mib)
    if report.rss_growth_mib > max_rss_growth_mib:
        report.failures.append(Failure(seed, -1, "-", "-", f"memory grew {report.rss_growth_mib:.0f} MiB "
                                       f"(limit {max_rss_growth_mib:.0f})", "-", "", ""))
    await _liveness(caller, aim, report)
    return report


def _record(report: Report, c: Call, o: Outcome, *, tenant: str, deadline_s: float) -> None:
    code = o.code.name + ("(client)" if o.cancelled_by_client or core_artifact(c, o) else "")
    report.requests += 1
    report.by_rpc[c.rpc] += 1
    report.by_code[code] += 1
    report.by_rpc_code[(c.rpc, code)] += 1
    report.slowest_s[c.rpc] = max(report.slowest_s.get(c.rpc, 0.0), o.elapsed_s)
    if c.method == "CreateContainer":
        report.created.update(r.container.container_id for r in o.responses if r.container.container_id)  # type: ignore[attr-defined]
    for what in judge(c, o, tenant=tenant, deadline_s=deadline_s):
        request = " | ".join(compact(m, limit=300) for m in c.messages[:6])
        if c.raw is not None:
            request = f"raw bytes {c.raw[:80]!r}{'...' if len(c.raw) > 80 else ''} (from {request})"
        if len(c.messages) > 6:
            request += f" | ...{len(c.messages) - 6} more messages"
        f = Failure(report.seed, c.index, c.rpc, c.strategy, what, o.code.name, o.details, request)
        report.failures.append(f)
        log.warning("fuzz.failure", seed=f.seed, index=f.index, rpc=f.rpc, what=what, code=f.code,
                    details=o.details[:200])


async def _cleanup(channel: grpc.aio.Channel, caller: Caller, report: Report) -> None:
    """Deletes the containers the fuzzer's creates made."""
    for cid in sorted(report.created):
        c = Call(index=-1, service="OrchestratorService", method="DeleteContainer", client_streaming=False,
                 server_streaming=False, strategy="cleanup", messages=[opb.DeleteContainerRequest(container_id=cid)])
        await caller.call(c)


async def _liveness(caller: Caller, aim: Aim, report: Report) -> None:
    """The Hub and the Orchestrator behind it still answer plain calls quickly."""
    own = aim.own[0]
    plain = [
        ("OrchestratorService", "GetContainer", opb.GetContainerRequest(container_id=own)),
        ("ExecService", "Run", xpb.RunRequest(container_id=own, command=xpb.Command(argv=["true"]))),
    ]
    for service, method, msg in plain:
        c = Call(index=-1, service=service, method=method, client_streaming=False, server_streaming=False,
                 strategy="liveness", messages=[msg])
        o = await caller.call(c)
        report.liveness_ms[method] = o.elapsed_s * 1000
        if o.code is not grpc.StatusCode.OK or o.elapsed_s > LIVENESS_S:
            report.failures.append(Failure(report.seed, -1, c.rpc, "liveness",
                                           f"after the run: {o.code.name} in {o.elapsed_s:.1f}s", o.code.name,
                                           o.details, compact(msg)))


def text(r: Report) -> str:
    """The figures, for a terminal."""
    lines = [f"fuzz seed {r.seed}: {r.requests} requests in {r.duration_s:.1f}s "
             f"({r.requests / max(r.duration_s, 1e-9):.0f}/s), {len(r.failures)} failures",
             f"Hub RSS: start {r.rss_start_mib:.0f} MiB, peak {r.rss_peak_mib:.0f} MiB, end {r.rss_end_mib:.0f} MiB "
             f"(growth {r.rss_growth_mib:+.0f} MiB)",
             "after the run: " + ", ".join(f"{k} {v:.0f} ms" for k, v in r.liveness_ms.items()),
             "by status: " + ", ".join(f"{k} {v}" for k, v in r.by_code.most_common()),
             "by RPC:"]
    for name in sorted(r.by_rpc):
        codes = ", ".join(f"{code} {n}" for (rpc_name, code), n in sorted(r.by_rpc_code.items(), key=lambda x: -x[1])
                          if rpc_name == name)
        lines.append(f"  {name:36} {r.by_rpc[name]:5}  slowest {r.slowest_s.get(name, 0) * 1000:6.0f} ms  {codes}")
    if r.failures:
        lines.append("failures (replay: --seed SEED --index INDEX):")
        lines.extend(f"  {f}" for f in r.failures[:50])
        if len(r.failures) > 50:
            lines.append(f"  ...{len(r.failures) - 50} more")
    return "\n".join(lines)
