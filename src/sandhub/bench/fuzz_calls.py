"""The calls the request fuzzer makes: one per index, drawn from (seed, index).

Every RPC of the Hub's public services (OrchestratorService, ExecService) is
covered, found from the service descriptors. A call is one of:

- ``random``: a request built from nothing by walking its descriptor
  (`fuzz_values.Values`);
- ``mutated``: a valid request aimed at the tenant's own container with one to
  three fields replaced by random or boundary values, so it passes the first
  checks and reaches deeper code;
- a stream strategy (PutFiles, Exec): a message sequence that breaks the
  stream's rules (no start, data first, two starts, many or huge messages,
  a hostile tar, half-close early, never half-close, cancel mid-way).

``generate(seed, index, aim)`` is a pure function: a failure's seed and index
replay it exactly.
"""

from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor as d
from google.protobuf import duration_pb2, message_factory
from google.protobuf.message import Message

from sandhub.bench.fuzz_values import PATHS, SHELLS, Values, mutable_fields
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.orchestrator.v1 import orchestrator_pb2 as opb

SERVICES = (
    opb.DESCRIPTOR.services_by_name["OrchestratorService"],
    xpb.DESCRIPTOR.services_by_name["ExecService"],
)
LABEL = ("fuzz", "1")
"""The label every baseline create carries, so the fuzzer's containers are
found (and deleted) afterwards."""
DONE_PROCESS = "fuzz-done"
"""A background process the fuzzer starts in its first container that has exited."""
LIVE_PROCESS = "fuzz-live"
"""One that keeps running (sleep), so attach with follow waits on it."""
READ_DIR = "/tmp/fuzz-read"
"""A directory with a few files the fuzzer puts in each of its containers
first, for downloads that should succeed (no fuzzed upload lands in it)."""
STREAM_WAIT_S = 0.5
"""How long the client lets a call run that may rightly wait for more (a
Watch, an attach with follow, an exec whose stdin stays open) before it
cancels it."""


@dataclass(frozen=True)
class Aim:
    """What the fuzzer's requests aim at."""

    own: tuple[str, ...]
    """The tenant's own containers, kept alive for the whole run (never deleted by it)."""
    foreign: tuple[str, ...] = ()
    """Another tenant's containers: any OK answer about them is a failure."""

    @property
    def ids(self) -> tuple[str, ...]:
        return (*self.own, *self.foreign, DONE_PROCESS, LIVE_PROCESS, *LABEL)


@dataclass
class Call:
    index: int
    service: str
    method: str
    client_streaming: bool
    server_streaming: bool
    strategy: str
    messages: Sequence[Message]
    may_wait: bool = False
    """The request itself may rightly run on past the client's deadline."""
    cancel_after_s: float | None = None
    """The client cancels the call after this long (it may_wait)."""
    cancel_after_messages: int | None = None
    """Client streams: cancel after writing this many messages."""
    cancel_after_responses: int | None = None
    """Server streams: cancel after reading this many messages (a caller that
    goes away mid-download)."""
    half_close: bool = True
    """Client streams: say 'no more messages' after the last one."""
    metadata: tuple[tuple[str, str], ...] = ()
    raw: bytes | None = None
    """Sent instead of messages[0]'s serialization: bytes no protobuf library
    would make (a string field that is not UTF-8, a cut or corrupt message)."""
    heavy: bool = False
    """Much work by design (many files or messages): it gets HEAVY_DEADLINE_S."""
    foreign: bool = False
    """The call names another tenant's container."""
    expect: frozenset[str] = frozenset()
    """A valid request (strategy baseline): the status codes it may end with;
    empty means any specific code will do."""
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def rpc(self) -> str:
        return f"{self.service}/{self.method}"

    @property
    def path(self) -> str:
        package = "sandhub.orchestrator.v1" if self.service == "OrchestratorService" else "sandhub.exec.v1"
        return f"/{package}.{self.service}/{self.method}"


def methods() -> list[d.MethodDescriptor]:
    return [m for s in SERVICES for m in s.methods]


def message_class(desc: d.Descriptor) -> type[Message]:
    cls: type[Message] = message_factory.GetMessageClass(desc)
    return cls


def generate(seed: int, index: int, aim: Aim) -> Call:
    """The ``index``-th call of run ``seed``."""
    rng = random.Random(f"{seed}:{index}")
    method = rng.choice(methods())
    values = Values(rng, ids=aim.ids)
    call = Call(index=index, service=method.containing_service.name, method=method.name,
                client_streaming=method.client_streaming, server_streaming=method.server_streaming,
                strategy="", messages=[])
    r = rng.random()
    if method.client_streaming:
        _stream(call, values, aim, r)
    else:
        cls = message_class(method.input_type)
        if r < 0.3:
            call.strategy, msg = "random", values.message(cls)
        else:
            msg = _baseline(method.name, rng, aim)
            if r < 0.9:
                call.strategy = "mutated"
                _mutate(msg, values)
            else:
                call.strategy = "baseline"
                call.expect = EXPECT.get(method.name, OK)
        call.messages = [msg]
        if rng.random() < 0.04:
            call.strategy, call.raw, call.expect = "wire", wire_bytes(msg, rng), frozenset()
    if rng.random() < 0.05:
        call.metadata = (("x-request-id", rng.choice(("", "a b", "a" * 129, "../../x", "%00", "ok-1", "x" * 2000))),)
    _aim_rules(call, aim, rng)
    return call


OK = frozenset({"OK", "RESOURCE_EXHAUSTED"})
"""What a valid request may end with (a budget or rate limit may refuse it)."""
EXPECT = {"DeleteContainer": frozenset({"NOT_FOUND"})}
"""Baselines that are valid but must be refused (they name no container of the tenant's)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def wire_bytes(msg: Message, rng: random.Random) -> bytes:
    """``msg`` on the wire, made invalid the ways another language's client (or
    a hand-made one) could: a string field that is not UTF-8 (proto3 requires
    it), a known field with the wrong wire type, a message cut short, junk."""
    data = msg.SerializeToString()
    fields: Any = msg.DESCRIPTOR.fields
    strings = [f for f in fields if f.type == d.FieldDescriptor.TYPE_STRING and not f.is_repeated]
    r = rng.random()
    if r < 0.5 and strings:
        bad = rng.choice((b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"a\x80b", b"\xf8\x88\x80\x80\x80"))
        return data + _varint(rng.choice(strings).number << 3 | 2) + _varint(len(bad)) + bad
    if r < 0.6 and fields:
        return data + _varint(rng.choice(fields).number << 3 | rng.choice((0, 1, 5))) + b"\x01" * 8
    if r < 0.8 and data:
        return data[: rng.randrange(len(data))] + b"\x0a\xff\xff\xff\x0f"  # a length past the end
    return rng.randbytes(rng.randint(1, 64))


def _mutate(msg: Message, values: Values, *, times: int = 0) -> None:
    for _ in range(times or values.rng.choice((1, 1, 1, 2, 3))):
        target, fd = values.rng.choice(mutable_fields(msg))
        values.set_field(target, fd)


def _dur(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))


def _baseline(method: str, rng: random.Random, aim: Aim) -> Message:
    """A request that should succeed, aimed at the tenant's own container."""
    own = rng.choice(aim.own)
    label_selector = f"{LABEL[0]}={LABEL[1]}"
    if method == "CreateContainer":
        return opb.CreateContainerRequest(labels=dict([LABEL]), ttl=_dur(120), wait_until_running=rng.random() < 0.5,
                                          resources=opb.Resources(memory_mib=64, pids=64))
    if method == "GetContainer":
        return opb.GetContainerRequest(container_id=own)
    if method == "ListContainers":
        return opb.ListContainersRequest(label_selector=label_selector, page_size=5)
    if method == "DeleteContainer":
        return opb.DeleteContainerRequest(container_id=rng.choice((*aim.foreign, "cnt-000000000000")), grace_period=_dur(0))
    if method == "ExtendContainer":
        return opb.ExtendContainerRequest(container_id=own, extend_by=_dur(10))
    if method == "WatchContainers":
        return opb.WatchContainersRequest(label_selector=label_selector, send_initial=rng.random() < 0.7)
    if method == "GetFiles":
        if rng.random() < 0.5:  # a directory: a tar stream of some size
            return xpb.GetFilesRequest(container_id=own, path=READ_DIR, format=rng.choice((0, 2)))  # type: ignore[arg-type]
        return xpb.GetFilesRequest(container_id=own, path="/etc/hostname", format=rng.choice((0, 1, 2)))  # type: ignore[arg-type]
    if method == "Run":
        return xpb.RunRequest(container_id=own, command=xpb.Command(argv=["echo", "fuzz"]), timeout=_dur(5),
                              stdin=b"in")
    first = aim.own[0]  # where the fuzzer's background processes are
    if method == "StartProcess":
        return xpb.StartProcessRequest(container_id=own, process_id=f"fz-{rng.randrange(40)}",
                                       command=xpb.Command(shell=rng.choice(SHELLS)))
    if method == "GetProcess":
        return xpb.GetProcessRequest(container_id=first, process_id=rng.choice((DONE_PROCESS, LIVE_PROCESS)))
    if method == "ListProcesses":
        return xpb.ListProcessesRequest(container_id=own, page_size=10)
    if method == "SignalProcess":
        return xpb.SignalProcessRequest(container_id=first, process_id=DONE_PROCESS, signal=xpb.SIGNAL_SIGTERM)
    if method == "AttachProcess":
        return xpb.AttachProcessRequest(container_id=first, process_id=rng.choice((DONE_PROCESS, LIVE_PROCESS)),
                                        follow=rng.random() < 0.5)
    raise ValueError(f"no baseline for {method}")


# Streams ---------------------------------------------------------------------

def _stream(call: Call, values: Values, aim: Aim, r: float) -> None:
    if call.method == "PutFiles":
        _put_files(call, values, aim, r)
    elif call.method == "Exec":
        _exec(call, values, aim, r)
    else:
        raise ValueError(f"no stream strategies for {call.method}")


def file(path: str, size: int, mode: int = 0o644) -> xpb.PutFilesRequest:
    return xpb.PutFilesRequest(file=xpb.FileHeader(path=path, mode=mode, size=size))


def data(chunk: bytes) -> xpb.PutFilesRequest:
    return xpb.PutFilesRequest(data=chunk)


def stdin(chunk: bytes) -> xpb.ExecRequest:
    return xpb.ExecRequest(stdin=chunk)


def _put_start(aim: Aim, rng: random.Random, fmt: int) -> xpb.PutFilesRequest:
    return xpb.PutFilesRequest(start=xpb.PutFilesStart(
        container_id=rng.choice(aim.own), destination=rng.choice(("fuzz", "/tmp/fuzz", "")), format=fmt))  # type: ignore[arg-type]


def _put_files(call: Call, values: Values, aim: Aim, r: float) -> None:
    rng = values.rng
    raw, tar = xpb.ARCHIVE_FORMAT_RAW, xpb.ARCHIVE_FORMAT_TAR
    strategies = ["baseline", "random", "mutated", "mutated", "data-first", "file-first", "two-starts", "many-files",
                  "many-chunks", "huge-chunk", "size-mismatch", "tar", "tar", "tar-garbage", "empty",
                  "start-only", "no-half-close", "cancel"]
    call.strategy = s = rng.choice(strategies)
    start = _put_start(aim, rng, rng.choice((raw, raw, tar)) if s != "tar" else tar)
    baseline = [_put_start(aim, rng, raw), file("a.txt", 3), data(b"abc")]
    if s == "baseline":
        call.messages, call.expect = baseline, OK
    elif s == "random":
        call.messages = [values.message(xpb.PutFilesRequest) for _ in range(rng.choice((0, 1, 2, 5, 20)))]
    elif s == "mutated":
        msgs = baseline + [file(rng.choice(PATHS) or "b", -1), data(b"x" * 10)]
        for _ in range(rng.randint(1, 3)):
            _mutate(rng.choice(msgs), values, times=1)
        call.messages = msgs
    elif s == "data-first":
        call.messages = [data(b"abc"), *baseline]
    elif s == "file-first":
        call.messages = [file("a.txt", 3), data(b"abc")]
    elif s == "two-starts":
        call.messages = [baseline[0], baseline[0], *baseline[1:]]
    elif s == "many-files":
        n = rng.choice((5, 10, 25))  # each file costs a shell and ~5 execs in the container
        call.messages = [start] + [m for i in range(n) for m in (file(f"m/{i}", 1), data(b"x"))]
    elif s == "many-chunks":
        call.messages = [baseline[0], file("many", -1)] + [data(b"y" * rng.choice((1, 100))) for _ in range(1000)]
    elif s == "huge-chunk":
        n = rng.choice(((1 << 20) + 1, 2 << 20, 3 << 20, (4 << 20) + 10))
        call.messages = [baseline[0], file("huge", rng.choice((-1, 0, n))), data(b"z" * n)]
    elif s == "size-mismatch":
        size = rng.choice((1, 10, -5, 1 << 40, (1 << 63) - 1))
        call.messages = [baseline[0], file("mm", size), data(b"w" * 100), file("mm2", 0)]
    elif s == "tar":
        archive = fuzz_tar(rng)
        cut = rng.randint(1, max(1, len(archive)))
        call.messages = [start, data(archive[:cut]), data(archive[cut:])]
    elif s == "tar-garbage":
        call.messages = [_put_start(aim, rng, tar), data(values.data()), data(b"\0" * 1024)]
    elif s == "empty":
        call.messages = []
    elif s == "start-only":
        call.messages = [start]
    elif s == "no-half-close":
        call.messages = baseline
        call.half_close = False
        call.may_wait, call.cancel_after_s = True, STREAM_WAIT_S
    elif s == "cancel":
        call.messages = [*baseline, file("b.txt", 3), data(b"def")]
        call.cancel_after_messages = rng.randint(0, len(call.messages))
    call.heavy = s in ("many-files", "many-chunks")


def _exec_start(aim: Aim, rng: random.Random, argv: list[str], *, pty: bool = False) -> xpb.ExecRequest:
    start = xpb.ExecStart(container_id=rng.choice(aim.own), command=xpb.Command(argv=argv), timeout=_dur(5))
    if pty:
        start.pty.rows, start.pty.cols = 24, 80
    return xpb.ExecRequest(start=start)


def _exec(call: Call, values: Values, aim: Aim, r: float) -> None:
    rng = values.rng
    close = xpb.ExecRequest(close_stdin=xpb.CloseStdin())
    strategies = ["random", "mutated", "mutated", "baseline", "stdin-first", "two-starts", "resize", "signals",
                  "many-stdin", "huge-stdin", "pty", "no-close", "empty", "cancel"]
    call.strategy = s = rng.choice(strategies)
    base = [_exec_start(aim, rng, ["cat"]), stdin(b"hello"), close]
    waits = False
    if s == "random":
        call.messages = [values.message(xpb.ExecRequest) for _ in range(rng.choice((0, 1, 2, 5, 20)))]
        waits = True
    elif s == "mutated":
        msgs = [base[0], stdin(b"x"), xpb.ExecRequest(resize=xpb.PtySize(rows=10, cols=10)),
                xpb.ExecRequest(signal=xpb.SIGNAL_SIGCONT), close]
        for _ in range(rng.randint(1, 3)):
            _mutate(rng.choice(msgs), values, times=1)
        call.messages, waits = msgs, True
    elif s == "baseline":
        call.messages, call.expect = base, OK
    elif s == "stdin-first":
        call.messages = [stdin(b"x"), *base]
    elif s == "two-starts":
        call.messages = [base[0], *base]
    elif s == "resize":
        sizes = [xpb.PtySize(rows=values.integer(-(1 << 31), (1 << 31) - 1), cols=values.integer(-(1 << 31), (1 << 31) - 1))
                 for _ in range(rng.randint(1, 5))]
        call.messages = [_exec_start(aim, rng, ["cat"], pty=rng.random() < 0.5),
                         *(xpb.ExecRequest(resize=z) for z in sizes), close]
    elif s == "signals":
        sigs = [values.enum(xpb.Signal.DESCRIPTOR) for _ in range(rng.randint(1, 5))]
        call.messages = [_exec_start(aim, rng, ["sleep", "0.5"]), *(xpb.ExecRequest(signal=g) for g in sigs), close]  # type: ignore[arg-type]
    elif s == "many-stdin":
        call.messages = [base[0], *(stdin(b"z" * rng.choice((1, 1000))) for _ in range(2000)), close]
    elif s == "huge-stdin":
        call.messages = [base[0], stdin(b"h" * rng.choice((1 << 20, 3 << 20, (4 << 20) + 10))), close]
    elif s == "pty":
        call.messages = [_exec_start(aim, rng, ["sh", "-c", rng.choice(SHELLS)], pty=True), close]
    elif s == "no-close":
        call.messages, call.half_close, waits = base[:2], rng.random() < 0.5, True
    elif s == "empty":
        call.messages = []
    elif s == "cancel":
        call.messages = [*base[:2], stdin(b"more")]
        call.cancel_after_messages, waits = rng.randint(0, 3), True
    if waits:
        call.may_wait, call.cancel_after_s = True, STREAM_WAIT_S


def fuzz_tar(rng: random.Random) -> bytes:
    """A small tar whose members try what a hostile archive tries: paths out of
    the destination, links out of it, devices, fifos, odd modes and owners,
    long names, and sometimes a cut or a flipped byte."""
    buf = io.BytesIO()
    fmt = rng.choice((tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT))
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i in range(rng.randint(0, 6)):
            name = rng.choice((*PATHS[:30], f"ok{i}", f"dir{i}/f", "a" * 300, "link/x", "é/ü"))
            info = tarfile.TarInfo(name or f"e{i}")
            info.type = rng.choice((tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                                    tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE))
            info.mode = rng.choice((0o644, 0o777, 0o4755, 0o7777, 0, 0o200))
            info.uid, info.gid = rng.choice(((0, 0), (1000, 1000), (65534, 65534)))
            info.mtime = rng.choice((0, 1, 1 << 32))
            payload = b""
            if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = rng.choice(("/etc/shadow", "../../../../", "/", "ok0", "link", "/proc/1/root"))
            elif info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = 1, rng.choice((3, 5, 8))
            elif info.type == tarfile.REGTYPE:
                payload = rng.randbytes(rng.choice((0, 1, 512, 5000)))
                info.size = len(payload)
            try:
                tar.addfile(info, io.BytesIO(payload) if payload else None)
            except (ValueError, OverflowError, tarfile.TarError):
                continue  # this format cannot hold it
    archive = buf.getvalue()
    r = rng.random()
    if r < 0.2 and archive:
        archive = archive[: rng.randrange(len(archive))]
    elif r < 0.4 and archive:
        i = rng.randrange(len(archive))
        archive = archive[:i] + bytes([archive[i] ^ 0xFF]) + archive[i + 1:]
    return archive


# Which calls name another tenant's container, and which never may -----------

def _ids_named(call: Call) -> list[str]:
    found = []
    for msg in call.messages:
        holders: tuple[Any, ...] = (msg, getattr(msg, "start", None))
        for holder in holders:
            if holder is None or (holder is not msg and not msg.HasField("start")):
                continue
            if "container_id" in holder.DESCRIPTOR.fields_by_name:
                found.append(holder.container_id)
    return found


def _aim_rules(call: Call, aim: Aim, rng: random.Random) -> None:
    """The fuzzer never deletes its own long-lived containers (every later call
    would then stop at NOT_FOUND), and marks calls aimed at another tenant's."""
    if call.method == "DeleteContainer":
        for msg in call.messages:
            if getattr(msg, "container_id", "") in aim.own:
                msg.container_id = "cnt-000000000000"  # type: ignore[attr-defined]
    if call.method == "SignalProcess":
        for msg in call.messages:  # keep the live process alive for attach
            if getattr(msg, "process_id", "") == LIVE_PROCESS and msg.signal in (  # type: ignore[attr-defined]
                    xpb.SIGNAL_SIGKILL, xpb.SIGNAL_SIGTERM, xpb.SIGNAL_SIGINT, xpb.SIGNAL_SIGHUP, xpb.SIGNAL_SIGQUIT,
                    xpb.SIGNAL_SIGUSR1, xpb.SIGNAL_SIGUSR2, xpb.SIGNAL_SIGSTOP):
                msg.process_id = DONE_PROCESS  # type: ignore[attr-defined]
    call.foreign = any(i in aim.foreign for i in _ids_named(call))
    if call.method == "GetFiles" and rng.random() < 0.2:
        call.cancel_after_responses = rng.randint(1, 3)
    if call.method == "WatchContainers" or (call.method == "AttachProcess" and call.messages[0].follow):  # type: ignore[attr-defined]
        call.may_wait, call.cancel_after_s = True, STREAM_WAIT_S
