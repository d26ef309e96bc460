"""The server does what the contract says (issue 13): SIGNAL_UNSPECIFIED is
SIGTERM, a tar download's size is -1, process ids are [a-z0-9-], a process's
command comes back as it was asked for (`shell` stays `shell`), a Run reply
fits a default client's 4 MiB receive limit, half-closing an Exec stream ends
the command's stdin, and a caller without a key hears UNAUTHENTICATED before
anything about its request.

Real Hub and Orchestrator on loopback, local backend (root), generated stubs.
"""

from __future__ import annotations

import asyncio
import io
import tarfile

import grpc
import pytest
from google.protobuf import duration_pb2

from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import Services
from tests.integration.test_exec import A, Session, expect_error, get, run
from tests.integration.test_lifecycle import create, reason_of

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]
DEFAULT_RECEIVE_LIMIT = 4 << 20
"""What every gRPC client accepts in one message unless told otherwise."""


@pytest.fixture
def ex(services: Services) -> xpb_grpc.ExecServiceStub:
    return xpb_grpc.ExecServiceStub(services.hub_channel)


async def _exited(ex: xpb_grpc.ExecServiceStub, cid: str, process_id: str) -> xpb.Process:
    for _ in range(200):
        p: xpb.Process = (await ex.GetProcess(xpb.GetProcessRequest(container_id=cid, process_id=process_id),
                                 metadata=A)).process
        if p.state == xpb.PROCESS_STATE_EXITED:
            return p
        await asyncio.sleep(0.05)
    raise AssertionError(f"{process_id} did not exit")


async def test_signal_unspecified_means_sigterm(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    await ex.StartProcess(xpb.StartProcessRequest(container_id=c.container_id, process_id="sleeper",
                                                  command=xpb.Command(argv=["sleep", "60"])), metadata=A)
    await ex.SignalProcess(xpb.SignalProcessRequest(container_id=c.container_id, process_id="sleeper"), metadata=A)
    p = await _exited(ex, c.container_id, "sleeper")
    assert p.exit_status.signal == xpb.SIGNAL_SIGTERM and p.exit_status.signal_number == 15

    s = Session(ex, xpb.ExecStart(container_id=c.container_id, command=xpb.Command(argv=["sleep", "60"])))
    s.send(signal=xpb.SIGNAL_UNSPECIFIED)  # the oneof's signal case, left at its zero value
    status = await s.exit()
    assert status.signal == xpb.SIGNAL_SIGTERM and not status.timed_out


async def test_get_files_size_is_minus_one_for_a_tar_stream(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    await run(ex, c.container_id, shell="mkdir -p /work/d && printf hello > /work/d/f.txt")
    raw, data = await get(ex, c.container_id, "/work/d/f.txt")
    assert (raw.size, data) == (5, b"hello")
    as_tar, data = await get(ex, c.container_id, "/work/d/f.txt", xpb.ARCHIVE_FORMAT_TAR)
    assert as_tar.size == -1 and not as_tar.is_dir
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        assert [m.name for m in t.getmembers()] == ["./f.txt"]
    for fmt in (xpb.ARCHIVE_FORMAT_UNSPECIFIED, xpb.ARCHIVE_FORMAT_TAR):
        directory, data = await get(ex, c.container_id, "/work/d", fmt)
        assert directory.size == -1 and directory.is_dir and data


async def test_process_ids_are_lower_case_alphanumerics_and_dashes(services: Services,
                                                                  ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    for bad in ("Upper_Case.x", "UPPER", "under_score", "dot.ted", "-leading-dash", "a" * 64, ""):
        e = await expect_error(
            ex.StartProcess(xpb.StartProcessRequest(container_id=c.container_id, process_id=bad,
                                                    command=xpb.Command(argv=["true"])), metadata=A),
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
        assert reason_of(e)[1].get("field") == "process_id", bad
        await expect_error(ex.GetProcess(xpb.GetProcessRequest(container_id=c.container_id, process_id=bad), metadata=A),
                           grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    for good in ("job-1", "0", "a" * 63):
        started = await ex.StartProcess(xpb.StartProcessRequest(container_id=c.container_id, process_id=good,
                                                                command=xpb.Command(argv=["true"])), metadata=A)
        assert started.process.process_id == good


async def test_a_process_command_comes_back_as_it_was_asked_for(services: Services,
                                                                ex: xpb_grpc.ExecServiceStub) -> None:
    """A `shell` command stays `shell` (it came back as ["/bin/sh", "-c", ...]);
    an argv stays that argv. Read back from the agent's record each time."""
    c = await create(services)
    shell = xpb.Command(shell="echo $((6 * 7)); sleep 60", env={"A": "1"}, cwd="/tmp")
    argv = xpb.Command(argv=["sh", "-c", "sleep 60"])
    for process_id, command in (("by-shell", shell), ("by-argv", argv)):
        started = await ex.StartProcess(xpb.StartProcessRequest(container_id=c.container_id, process_id=process_id,
                                                                command=command), metadata=A)
        assert started.created and started.process.command == command
        again = await ex.StartProcess(xpb.StartProcessRequest(container_id=c.container_id, process_id=process_id,
                                                              command=command), metadata=A)
        assert not again.created and again.process.command == command
        got = await ex.GetProcess(xpb.GetProcessRequest(container_id=c.container_id, process_id=process_id),
                                  metadata=A)
        assert got.process.command == command
    listed = await ex.ListProcesses(xpb.ListProcessesRequest(container_id=c.container_id), metadata=A)
    assert {p.process_id: p.command for p in listed.processes} == {"by-shell": shell, "by-argv": argv}
    await ex.SignalProcess(xpb.SignalProcessRequest(container_id=c.container_id, process_id="by-shell",
                                                    signal=xpb.SIGNAL_SIGKILL), metadata=A)
    ended = await _exited(ex, c.container_id, "by-shell")
    assert ended.command == shell  # an exited process keeps it too


async def test_the_largest_run_reply_fits_a_default_clients_receive_limit(services: Services) -> None:
    limits = services.hub.config.exec
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{services.hub.port}")  # no options: the 4 MiB default
    try:
        ex = xpb_grpc.ExecServiceStub(channel)
        c = await create(services)
        over = limits.max_output_bytes + 1
        shell = f"head -c {over} /dev/zero; head -c {over} /dev/zero >&2"
        r = await run(ex, c.container_id, shell=shell, max_output_bytes=limits.max_output_bytes)
        assert len(r.stdout) == len(r.stderr) == limits.max_output_bytes
        assert r.stdout_truncated and r.stderr_truncated and r.exit_status.exit_code == 0
        assert r.ByteSize() < DEFAULT_RECEIVE_LIMIT
        # Whatever the output, the caps leave 64 KiB of the 4 MiB for the rest of the reply.
        assert 2 * limits.max_output_bytes + (64 << 10) <= DEFAULT_RECEIVE_LIMIT
        assert limits.default_output_bytes <= limits.max_output_bytes
        r = await run(ex, c.container_id, shell=shell)  # no cap asked: the default per stream
        assert len(r.stdout) == len(r.stderr) == limits.default_output_bytes
        assert r.stdout_truncated and r.stderr_truncated
        exact = await run(ex, c.container_id, shell="head -c 1000 /dev/zero", max_output_bytes=1000)
        assert len(exact.stdout) == 1000 and not exact.stdout_truncated  # the flag says only what was dropped
        await expect_error(run(ex, c.container_id, "true", max_output_bytes=limits.max_output_bytes + 1),
                           grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    finally:
        await channel.close()


async def test_half_closing_an_exec_stream_closes_stdin(services: Services, ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    s = Session(ex, xpb.ExecStart(container_id=c.container_id, command=xpb.Command(argv=["cat"])))
    s.send(stdin=b"last words\n")
    s.queue.put_nowait(None)  # the request stream ends: the client's done_writing
    assert b"last words" in await s.read_until(b"last words")
    status = await s.exit(timeout=10)
    assert status.exit_code == 0 and not status.timed_out

    explicit = Session(ex, xpb.ExecStart(container_id=c.container_id, command=xpb.Command(argv=["cat"])))
    explicit.send(stdin=b"x")
    explicit.send(close_stdin=xpb.CloseStdin())
    assert (await explicit.exit()).exit_code == 0
    explicit.queue.put_nowait(None)


async def test_an_unauthenticated_malformed_request_is_unauthenticated(services: Services,
                                                                       ex: xpb_grpc.ExecServiceStub) -> None:
    c = await create(services)
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    for md in ((), (("authorization", "Bearer wrong-key"),)):
        await expect_error(ex.Run(xpb.RunRequest(container_id=c.container_id), metadata=md), unauthenticated)
        await expect_error(ex.Run(xpb.RunRequest(container_id=c.container_id, command=xpb.Command(argv=["true"]),
                                                 max_output_bytes=-1), metadata=md), unauthenticated)
        await expect_error(ex.StartProcess(xpb.StartProcessRequest(container_id=c.container_id, process_id="Bad_Id"),
                                           metadata=md), unauthenticated)
        await expect_error(ex.GetProcess(xpb.GetProcessRequest(container_id=c.container_id, process_id="../x"), metadata=md),
                           unauthenticated)
        await expect_error(ex.SignalProcess(xpb.SignalProcessRequest(container_id=c.container_id, process_id="../x",
                                                                     signal=999), metadata=md), unauthenticated)  # type: ignore[arg-type]
        await expect_error(ex.ListProcesses(xpb.ListProcessesRequest(container_id=c.container_id, page_size=-1),
                                            metadata=md), unauthenticated)
        await expect_error(ex.ListProcesses(xpb.ListProcessesRequest(container_id=c.container_id, page_token="junk"),
                                            metadata=md), unauthenticated)
        await expect_error(ex.AttachProcess(xpb.AttachProcessRequest(container_id=c.container_id, process_id="../x",
                                                                     stdout_offset=-1), metadata=md).read(),
                           unauthenticated)
        await expect_error(ex.GetFiles(xpb.GetFilesRequest(container_id=c.container_id, path="../../etc"),
                                       metadata=md).read(), unauthenticated)
        await expect_error(ex.Exec(iter([xpb.ExecRequest(stdin=b"not a start")]), metadata=md).read(),
                           unauthenticated)
        await expect_error(services.hub_stub.CreateContainer(
            pb.CreateContainerRequest(ttl=duration_pb2.Duration(seconds=-5)), metadata=md),
            unauthenticated)
        await expect_error(services.hub_stub.GetContainer(pb.GetContainerRequest(container_id="not an id"), metadata=md),
                           unauthenticated)
