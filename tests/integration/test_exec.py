"""ExecService end to end through the Hub, on the real local backend (root).

Real grpc.aio servers on loopback port 0, called through the generated stubs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import duration_pb2

from hub_service.server import start_hub
from sandhub.config import ExecLimits, HubConfig
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import KEYS, Services, auth
from tests.integration.test_lifecycle import create, reason_of

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]
A = auth("key-a")
B = auth("key-b")
MiB = 1 << 20


@pytest.fixture
def ex(services: Services) -> xpb_grpc.ExecServiceStub:
    return xpb_grpc.ExecServiceStub(services.hub_channel)


def seconds(s: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(s * 1e9))
    return d


async def run(ex: xpb_grpc.ExecServiceStub, cid: str, *argv: str, shell: str = "", md=A, **kw) -> xpb.RunResponse:  # type: ignore[no-untyped-def]
    cmd = xpb.Command(shell=shell) if shell else xpb.Command(argv=list(argv))
    return await ex.Run(xpb.RunRequest(container_id=cid, command=cmd, **kw), metadata=md)


async def put(ex: xpb_grpc.ExecServiceStub, cid: str, files: dict[str, bytes], *, destination: str = "",
              chunk: int = MiB, mode: int = 0, announce: bool = True) -> xpb.PutFilesResponse:
    async def requests() -> AsyncIterator[xpb.PutFilesRequest]:
        yield xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=cid, destination=destination))
        for path, data in files.items():
            yield xpb.PutFilesRequest(file=xpb.FileHeader(path=path, mode=mode,
                                                                     size=len(data) if announce else 0))
            for i in range(0, len(data), chunk):
                yield xpb.PutFilesRequest(data=data[i:i + chunk])

    return await ex.PutFiles(requests(), metadata=A)


async def get(ex: xpb_grpc.ExecServiceStub, cid: str, path: str, fmt: int = 0) -> tuple[xpb.FileInfo, bytes]:
    info, data = None, bytearray()
    async for r in ex.GetFiles(xpb.GetFilesRequest(container_id=cid, path=path, format=fmt), metadata=A):
        if r.HasField("info"):
            info = r.info
        else:
            data += r.data
    assert info is not None
    return info, bytes(data)


async def expect_error(coro, code: grpc.StatusCode, reason: str = "") -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    assert e.value.code() is code, e.value.details()
    if reason:
        assert reason_of(e.value)[0] == reason
    return e.value


# -- files ---------------------------------------------------------------------------


async def test_the_seed_flow_put_a_file_then_cat_it(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    got = await put(ex, c.container_id, {"hello.txt": b"hello, student\n"}, mode=0o600)
    assert [(f.path, f.size, f.mode) for f in got.files] == [("/work/hello.txt", 15, 0o600)]
    assert got.files[0].sha256 == hashlib.sha256(b"hello, student\n").hexdigest()
    r = await run(ex, c.container_id, "cat", "hello.txt")
    assert (r.exit_status.exit_code, r.stdout) == (0, b"hello, student\n")
    r = await run(ex, c.container_id, shell="stat -c '%a %u' /work/hello.txt")
    assert r.stdout.split() == [b"600", b"1000"]


async def test_upload_100_mib_and_download_it_identical(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services, resources=pb.Resources(disk_mib=512))
    blob = os.urandom(MiB) * 100
    got = await put(ex, c.container_id, {"big/blob.bin": blob})
    assert got.total_bytes == len(blob) and got.files[0].sha256 == hashlib.sha256(blob).hexdigest()
    info, data = await get(ex, c.container_id, "/work/big/blob.bin")
    assert info.size == len(blob) and not info.is_dir
    assert hashlib.sha256(data).digest() == hashlib.sha256(blob).digest()
    # A directory comes back as tar.
    info, tar = await get(ex, c.container_id, "/work/big")
    assert info.is_dir and len(tar) > len(blob)


async def test_tar_upload_and_many_files(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    import io
    import tarfile

    c = await create(services)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        for name, body in {"app/main.py": b"print('hi')\n", "app/static/x.css": b"body{}"}.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(body), 0o640
            t.addfile(ti, io.BytesIO(body))

    async def requests() -> AsyncIterator[xpb.PutFilesRequest]:
        yield xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=c.container_id, format=xpb.ARCHIVE_FORMAT_TAR))
        yield xpb.PutFilesRequest(data=raw.getvalue())

    got = await ex.PutFiles(requests(), metadata=A)
    assert sorted(f.path for f in got.files) == ["/work/app/main.py", "/work/app/static/x.css"]

    async def upload(data: bytes) -> xpb.PutFilesResponse:
        async def reqs() -> AsyncIterator[xpb.PutFilesRequest]:
            yield xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=c.container_id,
                                                                      format=xpb.ARCHIVE_FORMAT_TAR))
            yield xpb.PutFilesRequest(data=data)
        return await ex.PutFiles(reqs(), metadata=A)

    # A bad member anywhere refuses the whole archive before anything is written.
    bad = io.BytesIO()
    with tarfile.open(fileobj=bad, mode="w") as t:
        for name in ("first.txt", "../escape.txt"):
            ti = tarfile.TarInfo(name)
            ti.size = 1
            t.addfile(ti, io.BytesIO(b"x"))
    await expect_error(upload(bad.getvalue()), grpc.StatusCode.INVALID_ARGUMENT, "PATH_NOT_ALLOWED")
    assert (await run(ex, c.container_id, "ls", "/work")).stdout.split() == [b"app"]
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w:gz") as t:
        t.addfile(tarfile.TarInfo("empty"), io.BytesIO(b""))
    await expect_error(upload(gz.getvalue()), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    r = await run(ex, c.container_id, "python3", "/work/app/main.py")
    assert r.stdout == b"hi\n"


async def test_path_escapes_are_refused(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    for bad in ("../etc/passwd", "a/../../x", "/proc/1/root/etc/x", "/sys/x"):
        await expect_error(put(ex, c.container_id, {bad: b"x"}), grpc.StatusCode.INVALID_ARGUMENT, "PATH_NOT_ALLOWED")
    # A symlink planted by the container, pointing out of the work dir, is not followed.
    await run(ex, c.container_id, "ln", "-s", "/etc", "/work/evil")
    await expect_error(put(ex, c.container_id, {"evil/passwd": b"owned"}), grpc.StatusCode.INVALID_ARGUMENT, "PATH_NOT_ALLOWED")
    # Read-only places stay read-only.
    err = await expect_error(put(ex, c.container_id, {"/etc/sandhub-x": b"x"}), grpc.StatusCode.INVALID_ARGUMENT,
                             "PATH_NOT_ALLOWED")
    assert "read-only" in err.details()
    # A symlink at the target itself is replaced, not followed into the directory it names.
    await run(ex, c.container_id, shell="mkdir /work/dir && ln -s /work/dir /work/link")
    await put(ex, c.container_id, {"link": b"plain file now"})
    listing = await run(ex, c.container_id, shell="ls -A /work/dir; cat /work/link; test -L /work/link || echo not-a-link")
    assert listing.stdout == b"plain file nownot-a-link\n"
    assert not os.path.exists("/etc/sandhub-x")
    await expect_error(get(ex, c.container_id, "/work/nope"), grpc.StatusCode.NOT_FOUND, "PATH_NOT_FOUND")


async def test_oversized_and_aborted_uploads_leave_nothing(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services, resources=pb.Resources(disk_mib=64))
    # Announced too big: refused before a byte is written.
    huge = xpb.FileHeader(path="huge.bin", size=(1 << 30) + 1)  # the agent's bound: 1 GiB per call

    async def announce() -> AsyncIterator[xpb.PutFilesRequest]:
        yield xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=c.container_id))
        yield xpb.PutFilesRequest(file=huge)

    await expect_error(ex.PutFiles(announce(), metadata=A), grpc.StatusCode.RESOURCE_EXHAUSTED, "PAYLOAD_TOO_LARGE")
    # Bigger than the container's disk (32 MiB of /work): the disk is the limit.
    await expect_error(put(ex, c.container_id, {"fill.bin": b"\0" * (40 * MiB)}, announce=False),
                       grpc.StatusCode.RESOURCE_EXHAUSTED, "PAYLOAD_TOO_LARGE")
    # A stream that breaks off midway.
    async def broken() -> AsyncIterator[xpb.PutFilesRequest]:
        yield xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=c.container_id))
        yield xpb.PutFilesRequest(file=xpb.FileHeader(path="half.bin", size=4 * MiB))
        yield xpb.PutFilesRequest(data=b"x" * MiB)
        raise RuntimeError("client crashed")

    with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
        await ex.PutFiles(broken(), metadata=A)
    # The Hub notices the broken stream on its own time (a loaded machine):
    # waited for, up to a deadline, rather than a fixed sleep.
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        listing = (await run(ex, c.container_id, "ls", "-a", "/work")).stdout.split()
        if sorted(listing) == [b".", b".."] or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert sorted(listing) == [b".", b".."], listing


async def test_malformed_streams_are_invalid(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)

    async def data_first() -> AsyncIterator[xpb.PutFilesRequest]:
        yield xpb.PutFilesRequest(data=b"x")

    async def two_starts() -> AsyncIterator[xpb.PutFilesRequest]:
        yield xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=c.container_id))
        yield xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=c.container_id))

    async def data_before_file() -> AsyncIterator[xpb.PutFilesRequest]:
        yield xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=c.container_id))
        yield xpb.PutFilesRequest(data=b"x")

    for gen in (data_first, two_starts, data_before_file):
        await expect_error(ex.PutFiles(gen(), metadata=A), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_STREAM")

    async def exec_stdin_first() -> AsyncIterator[xpb.ExecRequest]:
        yield xpb.ExecRequest(stdin=b"x")

    async def exec_two_starts() -> AsyncIterator[xpb.ExecRequest]:
        start = xpb.ExecStart(container_id=c.container_id, command=xpb.Command(argv=["cat"]))
        yield xpb.ExecRequest(start=start)
        yield xpb.ExecRequest(start=start)

    for egen in (exec_stdin_first, exec_two_starts):
        call = ex.Exec(egen(), metadata=A)
        err = await expect_error(_drain(call), grpc.StatusCode.INVALID_ARGUMENT)
        assert reason_of(err)[0] == "INVALID_STREAM"


async def _drain(call) -> list[xpb.ExecResponse]:  # type: ignore[no-untyped-def]
    return [r async for r in call]


# -- Run -----------------------------------------------------------------------------


async def test_run_exit_codes_signals_timeouts_and_streams(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    r = await run(ex, c.container_id, "ls", "/")
    assert r.exit_status.exit_code == 0 and b"work" in r.stdout.split() and r.duration.ToNanoseconds() > 0
    r = await run(ex, c.container_id, shell="echo out; echo err >&2; exit 3")
    assert (r.exit_status.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    r = await run(ex, c.container_id, shell="kill -TERM $$")
    assert r.exit_status.signal == xpb.SIGNAL_SIGTERM and r.exit_status.signal_number == 15
    r = await run(ex, c.container_id, "cat", stdin=b"from stdin")
    assert r.stdout == b"from stdin"
    r = await run(ex, c.container_id, shell="sleep 30 & sleep 30; echo never", timeout=seconds(0.5))
    assert r.exit_status.timed_out and r.exit_status.signal == xpb.SIGNAL_SIGKILL and b"never" not in r.stdout
    ps = await run(ex, c.container_id, "ps", "-eo", "args")
    assert b"sleep 30" not in ps.stdout  # the timed-out group is gone
    r = await run(ex, c.container_id, "yes", timeout=seconds(1), max_output_bytes=1000)
    assert r.stdout_truncated and len(r.stdout) == 1000 and r.exit_status.timed_out
    r = await run(ex, c.container_id, "env")
    assert f"SANDHUB_CONTAINER_ID={c.container_id}".encode() in r.stdout
    r = await ex.Run(xpb.RunRequest(container_id=c.container_id, command=xpb.Command(argv=["pwd"], cwd="/tmp",
                                                                           env={"X": "1"})), metadata=A)
    assert r.stdout == b"/tmp\n"
    await expect_error(run(ex, c.container_id, "no-such-program"), grpc.StatusCode.INVALID_ARGUMENT)


async def test_run_bad_input_and_tenancy(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    await expect_error(run(ex, "cnt-000000000000", "ls"), grpc.StatusCode.NOT_FOUND, "CONTAINER_NOT_FOUND")
    await expect_error(run(ex, c.container_id, "ls", md=B), grpc.StatusCode.NOT_FOUND, "CONTAINER_NOT_FOUND")
    await expect_error(run(ex, c.container_id, "ls", md=()), grpc.StatusCode.UNAUTHENTICATED)
    await expect_error(ex.Run(xpb.RunRequest(container_id=c.container_id), metadata=A), grpc.StatusCode.INVALID_ARGUMENT)
    await expect_error(run(ex, c.container_id, "ls", timeout=seconds(10**6)), grpc.StatusCode.INVALID_ARGUMENT)
    await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id), metadata=A)
    for _ in range(100):
        got = (await services.hub_stub.GetContainer(pb.GetContainerRequest(container_id=c.container_id), metadata=A)).container
        if got.state == pb.CONTAINER_STATE_TERMINATED:
            break
        await asyncio.sleep(0.02)
    await expect_error(run(ex, c.container_id, "ls"), grpc.StatusCode.FAILED_PRECONDITION, "CONTAINER_NOT_RUNNING")


# -- Exec ----------------------------------------------------------------------------


class Session:
    """Drives an Exec stream from the test: send requests, read responses."""

    def __init__(self, ex: xpb_grpc.ExecServiceStub, start: xpb.ExecStart) -> None:
        self.queue: asyncio.Queue[xpb.ExecRequest | None] = asyncio.Queue()
        self.queue.put_nowait(xpb.ExecRequest(start=start))
        self.call = ex.Exec(self._requests(), metadata=A)

    async def _requests(self) -> AsyncIterator[xpb.ExecRequest]:
        while (r := await self.queue.get()) is not None:
            yield r

    def send(self, **kw) -> None:  # type: ignore[no-untyped-def]
        self.queue.put_nowait(xpb.ExecRequest(**kw))

    async def read_until(self, needle: bytes, timeout: float = 10) -> bytes:
        seen = bytearray()
        async with asyncio.timeout(timeout):
            while needle not in seen:
                r = await self.call.read()
                assert r is not grpc.aio.EOF, bytes(seen)
                seen += r.stdout + r.stderr
        return bytes(seen)

    async def exit(self, timeout: float = 10) -> xpb.ExitStatus:
        async with asyncio.timeout(timeout):
            while True:
                r = await self.call.read()
                assert r is not grpc.aio.EOF
                if r.HasField("exit_status"):
                    return r.exit_status


async def test_interactive_shell_with_stdin_eof_and_pty(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    s = Session(ex, xpb.ExecStart(container_id=c.container_id, command=xpb.Command(argv=["sh"])))
    first = await s.call.read()
    assert first.started.pid > 1
    s.send(stdin=b"echo $((6*7))\n")
    assert b"42" in await s.read_until(b"42")
    s.send(stdin=b"echo err >&2\n")
    await s.read_until(b"err")
    s.send(close_stdin=xpb.CloseStdin())
    assert (await s.exit()).exit_code == 0

    pty = Session(ex, xpb.ExecStart(container_id=c.container_id, command=xpb.Command(argv=["sh", "-i"]),
                                            pty=xpb.PtySize(rows=24, cols=80)))
    await pty.call.read()
    pty.send(stdin=b"stty size\n")
    await pty.read_until(b"24 80")
    pty.send(resize=xpb.PtySize(rows=50, cols=132))
    pty.send(stdin=b"stty size; tty\n")
    out = await pty.read_until(b"50 132")
    pty.send(stdin=b"exit 5\n")
    assert (await pty.exit()).exit_code == 5, out

    sig = Session(ex, xpb.ExecStart(container_id=c.container_id, command=xpb.Command(argv=["sleep", "60"])))
    await sig.call.read()
    sig.send(signal=xpb.SIGNAL_SIGINT)
    assert (await sig.exit()).signal == xpb.SIGNAL_SIGINT


async def test_a_command_that_ends_while_its_caller_still_writes_keeps_its_status(
        services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    """`sandhub exec -- sh` with `exit 4` on stdin: the command may end while
    the Hub still relays the caller's half-close. The caller must get exit 4
    and an OK status, every time, never INTERNAL: grpc.aio turns a write that
    loses that race into INTERNAL (grpc/grpc#36066), so the Hub stops writing
    once it sees exit_status and the agent waits for the half-close; and the
    caller's own writes lose it if the Hub ends the call under them, so the
    Hub waits for the caller's half-close too. Seen in a private-clone `make
    test` run (exit code 6), then in CI (the caller's write)."""
    c = await create(services)

    async def requests() -> AsyncIterator[xpb.ExecRequest]:
        yield xpb.ExecRequest(start=xpb.ExecStart(container_id=c.container_id, command=xpb.Command(argv=["sh"])))
        yield xpb.ExecRequest(stdin=b"echo $((2+3))\nexit 4\n")
        for _ in range(300):  # still writing while sh exits, and after
            yield xpb.ExecRequest(stdin=b"\n")

    for _ in range(20):
        out, status = b"", None
        async for r in ex.Exec(requests(), metadata=A):
            if r.WhichOneof("msg") == "stdout":
                out += r.stdout
            elif r.WhichOneof("msg") == "exit_status":
                status = r.exit_status
        assert status is not None and status.exit_code == 4 and out == b"5\n", (status, out)


async def test_a_call_refused_while_its_caller_still_sends_gets_its_error(
        services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    """An upload or an Exec refused (an unknown container, a deleted one)
    while the caller still streams must end with that error, not with the
    INTERNAL that grpc.aio makes of the caller's write losing the race with
    the end of the call (grpc/grpc#36066): the Hub drops what the caller still
    sends until it half-closes. Seen in the chaos test: `PutFiles: INTERNAL`."""
    c = await create(services)
    gone = await create(services)
    await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=gone.container_id), metadata=A)

    def upload(cid: str) -> AsyncIterator[xpb.PutFilesRequest]:
        async def requests() -> AsyncIterator[xpb.PutFilesRequest]:
            yield xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=cid, destination="/work/in"))
            yield xpb.PutFilesRequest(file=xpb.FileHeader(path="big.bin", size=400 * 64 * 1024))
            for _ in range(400):
                yield xpb.PutFilesRequest(data=b"x" * 64 * 1024)
        return requests()

    def typing(cid: str) -> AsyncIterator[xpb.ExecRequest]:
        async def requests() -> AsyncIterator[xpb.ExecRequest]:
            yield xpb.ExecRequest(start=xpb.ExecStart(container_id=cid, command=xpb.Command(argv=["cat"])))
            for _ in range(400):
                yield xpb.ExecRequest(stdin=b"y" * 16 * 1024)
        return requests()

    for cid in ("cnt-doesnotexist", gone.container_id):
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as put:
                await ex.PutFiles(upload(cid), metadata=A)
            assert put.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), put.value
            with pytest.raises(grpc.aio.AioRpcError) as run:
                async for _ in ex.Exec(typing(cid), metadata=A):
                    pass
            assert run.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), run.value
    assert (await ex.PutFiles(upload(c.container_id), metadata=A)).files[0].size == 400 * 64 * 1024

    # The agent going away in the middle: its status (or the command's end), never INTERNAL.
    async def slow_typing() -> AsyncIterator[xpb.ExecRequest]:
        yield xpb.ExecRequest(start=xpb.ExecStart(container_id=c.container_id, command=xpb.Command(argv=["cat"])))
        for i in range(2000):
            if i == 20:
                await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id),
                                                        metadata=A)
            yield xpb.ExecRequest(stdin=b"z\n")
            if i < 20:
                await asyncio.sleep(0.002)

    try:
        async for _ in ex.Exec(slow_typing(), metadata=A):
            pass
    except grpc.aio.AioRpcError as e:
        assert e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE), e


async def test_exec_caller_going_away_kills_the_process(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    s = Session(ex, xpb.ExecStart(container_id=c.container_id, command=xpb.Command(shell="sleep 77 & sleep 78")))
    await s.call.read()
    assert b"sleep 77" in (await run(ex, c.container_id, "ps", "-eo", "args")).stdout
    s.call.cancel()
    for _ in range(100):
        if b"sleep 7" not in (await run(ex, c.container_id, "ps", "-eo", "args")).stdout:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the process outlived its caller")


async def test_slow_reader_does_not_make_the_hub_buffer(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    s = Session(ex, xpb.ExecStart(container_id=c.container_id, command=xpb.Command(shell="yes | head -c 200000000; echo done")))
    await s.call.read()
    await asyncio.sleep(2)  # read nothing: the pipe and gRPC's windows fill, then yes waits
    written = (await run(ex, c.container_id, shell="cat /proc/$(pidof yes)/io | grep wchar")).stdout
    assert int(written.split()[1]) < 50 * MiB, written  # far from all 200 MB
    got = 0
    async with asyncio.timeout(60):
        while True:
            r = await s.call.read()
            if r.HasField("exit_status"):
                break
            got += len(r.stdout)
    assert got == 200000000 + len(b"done\n")


# -- background processes ---------------------------------------------------------


async def test_background_web_server_survives_a_hub_restart(services: Services) -> None:
    c = await create(services, ports=[pb.Port(port=8000)])
    ex = xpb_grpc.ExecServiceStub(services.hub_channel)
    await put(ex, c.container_id, {"site/index.html": b"<p>hello</p>\n"})
    cmd = xpb.Command(shell="echo starting; exec /.sandhub/busybox httpd -f -vv -p 8000 -h /work/site")
    started = await ex.StartProcess(xpb.StartProcessRequest(container_id=c.container_id, process_id="web", command=cmd), metadata=A)
    assert started.created and started.process.state == xpb.PROCESS_STATE_RUNNING
    again = await ex.StartProcess(xpb.StartProcessRequest(container_id=c.container_id, process_id="web", command=cmd), metadata=A)
    assert not again.created and again.process.pid == started.process.pid

    url = f"http://{c.network.ip_address}:8000/index.html"
    body = b""
    for _ in range(100):
        try:
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=2).read())
            break
        except OSError:
            await asyncio.sleep(0.05)
    assert body == b"<p>hello</p>\n"

    # The Hub goes away and a new one comes up: the process belongs to the container.
    await services.hub.stop(0)
    hub = await start_hub(HubConfig(listen="127.0.0.1:0", orchestrator=f"127.0.0.1:{services.orchestrator.port}",
                                    api_keys=KEYS,
                                    orchestrator_token=services.orchestrator.config.token))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}")
    ex = xpb_grpc.ExecServiceStub(channel)
    try:
        listed = await ex.ListProcesses(xpb.ListProcessesRequest(container_id=c.container_id), metadata=A)
        assert [p.process_id for p in listed.processes] == ["web"]
        assert listed.processes[0].state == xpb.PROCESS_STATE_RUNNING
        assert listed.processes[0].stdout_bytes == len(b"starting\n")
        out = bytearray()
        async for r in ex.AttachProcess(xpb.AttachProcessRequest(container_id=c.container_id, process_id="web",
                                                                 stdout_offset=2), metadata=A):
            out += r.stdout.data
            assert not r.HasField("exit_status")
        assert out == b"arting\n"
        await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=2).read())
        killed = await ex.SignalProcess(xpb.SignalProcessRequest(container_id=c.container_id, process_id="web",
                                                                 signal=xpb.SIGNAL_SIGTERM), metadata=A)
        assert killed.process.process_id == "web"
        follow = ex.AttachProcess(xpb.AttachProcessRequest(container_id=c.container_id, process_id="web", follow=True,
                                                           stdout_offset=0, stderr_offset=0), metadata=A)
        exited = None
        async with asyncio.timeout(10):
            async for r in follow:
                if r.HasField("exit_status"):
                    exited = r.exit_status
        assert exited is not None and exited.signal == xpb.SIGNAL_SIGTERM
        got = await ex.GetProcess(xpb.GetProcessRequest(container_id=c.container_id, process_id="web"), metadata=A)
        assert got.process.state == xpb.PROCESS_STATE_EXITED
        await expect_error(ex.GetProcess(xpb.GetProcessRequest(container_id=c.container_id, process_id="nope"), metadata=A),
                           grpc.StatusCode.NOT_FOUND, "PROCESS_NOT_FOUND")
        await expect_error(ex.GetProcess(xpb.GetProcessRequest(container_id=c.container_id, process_id="web"), metadata=B),
                           grpc.StatusCode.NOT_FOUND, "CONTAINER_NOT_FOUND")
    finally:
        await channel.close()
        await hub.stop(0)


async def test_output_is_batched_and_idle_streams_get_keepalives(services: Services) -> None:
    limits = ExecLimits(keepalive_s=0.2)
    hub = await start_hub(HubConfig(listen="127.0.0.1:0", orchestrator=f"127.0.0.1:{services.orchestrator.port}",
                                    api_keys=KEYS,
                                    orchestrator_token=services.orchestrator.config.token, exec=limits))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}")
    try:
        ex = xpb_grpc.ExecServiceStub(channel)
        c = await create(services)
        start = xpb.ExecStart(container_id=c.container_id, command=xpb.Command(
            shell="i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done; sleep 1; echo end"))

        async def requests() -> AsyncIterator[xpb.ExecRequest]:
            yield xpb.ExecRequest(start=start)
            await asyncio.sleep(30)  # keep the request side open: never half-closes

        kinds: list[str] = []
        out = bytearray()
        async with asyncio.timeout(30):
            # To the end of the stream: the Hub waits (2 s) for a half-close
            # that never comes, and sends no keepalive after exit_status.
            async for r in ex.Exec(requests(), metadata=A):
                kinds.append(r.WhichOneof("msg"))
                out += r.stdout
        assert out.splitlines()[:2] == [b"line0", b"line1"] and out.endswith(b"line1999\nend\n")
        assert kinds.count("stdout") < 200, kinds.count("stdout")  # 2,001 writes, far fewer messages
        assert "keepalive" in kinds  # the idle second in the middle
        assert kinds[0] == "started" and kinds[-1] == "exit_status"
    finally:
        await channel.close()
        await hub.stop(0)


async def test_list_processes_pages_and_filters(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    for pid, shell in (("a", "sleep 60"), ("b", "true"), ("c", "sleep 60")):
        await ex.StartProcess(xpb.StartProcessRequest(container_id=c.container_id, process_id=pid,
                                                      command=xpb.Command(shell=shell)), metadata=A)
    for _ in range(100):
        b = (await ex.GetProcess(xpb.GetProcessRequest(container_id=c.container_id, process_id="b"), metadata=A)).process
        if b.state == xpb.PROCESS_STATE_EXITED:
            break
        await asyncio.sleep(0.05)
    assert b.exit_status.exit_code == 0 and b.end_time.seconds > 0
    first = await ex.ListProcesses(xpb.ListProcessesRequest(container_id=c.container_id, page_size=2), metadata=A)
    second = await ex.ListProcesses(xpb.ListProcessesRequest(container_id=c.container_id, page_size=2,
                                                             page_token=first.next_page_token), metadata=A)
    assert [p.process_id for p in first.processes] + [p.process_id for p in second.processes] == ["a", "b", "c"]
    assert second.next_page_token == ""
    running = await ex.ListProcesses(xpb.ListProcessesRequest(container_id=c.container_id, state=xpb.PROCESS_STATE_RUNNING),
                                     metadata=A)
    assert [p.process_id for p in running.processes] == ["a", "c"]
    await expect_error(ex.ListProcesses(xpb.ListProcessesRequest(container_id=c.container_id, page_token="junk"), metadata=A),
                       grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    await expect_error(ex.StartProcess(xpb.StartProcessRequest(container_id=c.container_id, process_id="../x",
                                                               command=xpb.Command(argv=["true"])), metadata=A),
                       grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")


async def test_open_exec_calls_are_bounded_per_tenant(services: Services) -> None:
    hub = await start_hub(HubConfig(listen="127.0.0.1:0", orchestrator=f"127.0.0.1:{services.orchestrator.port}",
                                    api_keys=KEYS,
                                    orchestrator_token=services.orchestrator.config.token,
                                    exec=ExecLimits(max_calls_per_tenant=2)))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}")
    try:
        ex = xpb_grpc.ExecServiceStub(channel)
        c = await create(services)
        sessions = [Session(ex, xpb.ExecStart(container_id=c.container_id, command=xpb.Command(argv=["sleep", "60"])))
                    for _ in range(2)]
        for s in sessions:
            assert (await s.call.read()).HasField("started")
        await expect_error(run(ex, c.container_id, "true"), grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
        # Another tenant is not held back by this one's calls.
        await expect_error(run(ex, c.container_id, "true", md=B), grpc.StatusCode.NOT_FOUND)
        sessions[0].call.cancel()
        for _ in range(100):
            try:
                assert (await run(ex, c.container_id, "true")).exit_status.exit_code == 0
                break
            except grpc.aio.AioRpcError as e:
                assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the slot of a finished call was not given back")
        sessions[1].call.cancel()
    finally:
        await channel.close()
        await hub.stop(0)


async def test_run_and_exec_end_with_the_command_not_with_what_it_left_running(
    services: Services, ex: xpb_grpc.ExecServiceStub
) -> None:
    c = await create(services)
    r = await run(ex, c.container_id, shell="sleep 100 & echo hi", timeout=seconds(30))
    assert (r.exit_status.exit_code, r.stdout, r.exit_status.timed_out) == (0, b"hi\n", False)
    assert r.duration.ToNanoseconds() < 10e9  # not the 30 s timeout: the shell ended at once
    assert b"sleep 100" not in (await run(ex, c.container_id, "ps", "-o", "args")).stdout  # its leftovers are gone
    s = Session(ex, xpb.ExecStart(container_id=c.container_id, command=xpb.Command(shell="sleep 100 & echo hey; exit 3")))
    await s.read_until(b"hey")
    assert (await s.exit()).exit_code == 3
    r = await run(ex, c.container_id, shell="kill -9 $$")
    assert r.exit_status.exit_code == -1 and r.exit_status.signal == xpb.SIGNAL_SIGKILL


async def test_a_bad_resize_ends_the_exec_stream_with_its_error(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    s = Session(ex, xpb.ExecStart(container_id=c.container_id, command=xpb.Command(argv=["cat"])))
    await s.call.read()
    s.send(resize=xpb.PtySize(rows=0, cols=0))
    err = await expect_error(s.exit(), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert "resize" in err.details()
