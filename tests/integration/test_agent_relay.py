"""The Hub relays every ExecService call to the container's real sandhub-agent.

Runs against the real agent binary ($SANDHUB_AGENT, built by `make agent`) as
a local process on a unix socket, a fake AgentDirectoryService standing in for
the Orchestrator, and the real Hub (start_hub).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from sandhub import rpc
from sandhub.config import ExecLimits
from sandhub.exec.v1 import exec_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tests.integration.agent_harness import A, B, Entry, RelayHub, agent_sends_proof, start_relay_hub

CID = "cnt-relay0000001"
OTHER = "cnt-relay0000002"


@pytest.fixture
async def relay() -> AsyncIterator[RelayHub]:
    if not agent_sends_proof():
        pytest.fail("agent/ does not send x-sandhub-agent-proof yet (agents.proto's scheme); the Hub relays "
                    "only to an agent that proves it holds the container's credential")
    root = Path(tempfile.mkdtemp(prefix="shr-", dir="/tmp"))  # unix socket paths must stay short
    async for hub in start_relay_hub(root):
        await hub.agent(CID)
        yield hub


def _put(*requests: pb.PutFilesRequest) -> AsyncIterator[pb.PutFilesRequest]:
    async def gen() -> AsyncIterator[pb.PutFilesRequest]:
        for r in requests:
            yield r
    return gen()


async def test_put_and_get_raw_file(relay: RelayHub) -> None:
    data = os.urandom(3 << 20)
    reply = await relay.stub.PutFiles(_put(
        pb.PutFilesRequest(start=pb.PutFilesStart(container_id=CID, destination="up")),
        pb.PutFilesRequest(file=pb.FileHeader(path="a.bin", size=len(data))),
        *[pb.PutFilesRequest(data=data[i:i + (1 << 20)]) for i in range(0, len(data), 1 << 20)],
    ), metadata=A)
    assert reply.total_bytes == len(data)
    assert reply.files[0].sha256 == hashlib.sha256(data).hexdigest()
    assert (relay.agents[0].work / "up" / "a.bin").read_bytes() == data
    got = [m async for m in relay.stub.GetFiles(pb.GetFilesRequest(container_id=CID, path="up/a.bin"), metadata=A)]
    assert got[0].WhichOneof("msg") == "info" and got[0].info.size == len(data)
    assert b"".join(m.data for m in got[1:]) == data


async def test_put_tar_and_get_directory_as_tar(relay: RelayHub) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body in (("d/x.txt", b"x" * 10), ("d/y.txt", b"y" * 20)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    reply = await relay.stub.PutFiles(_put(
        pb.PutFilesRequest(start=pb.PutFilesStart(container_id=CID, format=pb.ARCHIVE_FORMAT_TAR)),
        pb.PutFilesRequest(data=buf.getvalue()),
    ), metadata=A)
    assert sorted(f.path.rsplit("/", 1)[-1] for f in reply.files) == ["x.txt", "y.txt"]
    got = [m async for m in relay.stub.GetFiles(pb.GetFilesRequest(container_id=CID, path="d"), metadata=A)]
    with tarfile.open(fileobj=io.BytesIO(b"".join(m.data for m in got[1:]))) as tar:
        names = sorted(m.name.rstrip("/") for m in tar.getmembers())
    assert any(n.endswith("x.txt") for n in names) and any(n.endswith("y.txt") for n in names)


async def test_run_passes_output_exit_and_stdin(relay: RelayHub) -> None:
    call = relay.stub.Run(pb.RunRequest(
        container_id=CID, command=pb.Command(shell="cat; echo err >&2; exit 3"), stdin=b"hello"),
        metadata=(*A, ("x-request-id", "relay-test-1")))
    reply = await call
    assert (reply.stdout, reply.stderr, reply.exit_status.exit_code) == (b"hello", b"err\n", 3)
    assert ("x-request-id", "relay-test-1") in tuple(await call.trailing_metadata() or ())


async def test_agent_errors_reach_the_caller_with_their_reason(relay: RelayHub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await relay.stub.Run(pb.RunRequest(container_id=CID, command=pb.Command()), metadata=A)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and rpc.error_reason(e.value) == "INVALID_FIELD"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in relay.stub.GetFiles(pb.GetFilesRequest(container_id=CID, path="nope"), metadata=A):
            pass
    assert e.value.code() is grpc.StatusCode.NOT_FOUND and rpc.error_reason(e.value) == "PATH_NOT_FOUND"


async def test_streams_the_agent_ends_at_once_keep_their_error(relay: RelayHub) -> None:
    """grpc.aio can lose the header of a stream whose status is handled first;
    such a stream's error still reaches the caller (was UNAVAILABLE ~40% of the time)."""
    for _ in range(50):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _m in relay.stub.GetFiles(pb.GetFilesRequest(container_id=CID, path="missing"), metadata=A):
                pass
        assert rpc.error_reason(e.value) == "PATH_NOT_FOUND"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _a in relay.stub.AttachProcess(pb.AttachProcessRequest(container_id=CID, process_id="none"),
                                                     metadata=A):
                pass
        assert rpc.error_reason(e.value) == "PROCESS_NOT_FOUND"


async def test_exec_stdin_eof_and_half_close(relay: RelayHub) -> None:
    async def requests() -> AsyncIterator[pb.ExecRequest]:
        yield pb.ExecRequest(start=pb.ExecStart(container_id=CID, command=pb.Command(argv=["cat"])))
        yield pb.ExecRequest(stdin=b"one ")
        yield pb.ExecRequest(stdin=b"two")
        yield pb.ExecRequest(close_stdin=pb.CloseStdin())

    out = [m async for m in relay.stub.Exec(requests(), metadata=A)]
    assert out[0].WhichOneof("msg") == "started" and out[0].started.pid > 0
    assert b"".join(m.stdout for m in out) == b"one two"
    assert out[-1].exit_status.exit_code == 0

    async def half_close() -> AsyncIterator[pb.ExecRequest]:  # no close_stdin: the half-close is the EOF
        yield pb.ExecRequest(start=pb.ExecStart(container_id=CID, command=pb.Command(argv=["wc", "-c"])))
        yield pb.ExecRequest(stdin=b"12345")

    out = [m async for m in relay.stub.Exec(half_close(), metadata=A)]
    assert b"".join(m.stdout for m in out).strip() == b"5"


async def test_exec_output_reaches_a_slow_reader_whole(relay: RelayHub) -> None:
    async def requests() -> AsyncIterator[pb.ExecRequest]:
        yield pb.ExecRequest(start=pb.ExecStart(container_id=CID, command=pb.Command(argv=["seq", "1", "400000"])))

    out, n = [], 0
    async for m in relay.stub.Exec(requests(), metadata=A):
        out.append(m)
        n += 1
        if n % 8 == 0:
            await asyncio.sleep(0.01)  # a reader slower than the command
    assert b"".join(m.stdout for m in out) == b"".join(b"%d\n" % i for i in range(1, 400001))
    assert out[-1].exit_status.exit_code == 0


async def test_exec_with_a_pty(relay: RelayHub) -> None:
    async def requests() -> AsyncIterator[pb.ExecRequest]:
        yield pb.ExecRequest(start=pb.ExecStart(container_id=CID, command=pb.Command(shell="stty size; tty"),
                                                pty=pb.PtySize(rows=33, cols=77)))

    out = [m async for m in relay.stub.Exec(requests(), metadata=A)]
    text = b"".join(m.stdout for m in out)
    assert b"33 77" in text and b"/dev/pts/" in text
    assert out[-1].exit_status.exit_code == 0


async def test_background_process_lifecycle_and_attach(relay: RelayHub) -> None:
    started = await relay.stub.StartProcess(pb.StartProcessRequest(
        container_id=CID, process_id="p1", command=pb.Command(shell="echo hi; sleep 0.3; echo bye")), metadata=A)
    assert started.created and started.process.process_id == "p1"
    again = await relay.stub.StartProcess(pb.StartProcessRequest(
        container_id=CID, process_id="p1", command=pb.Command(shell="true")), metadata=A)
    assert not again.created
    chunks = [m async for m in relay.stub.AttachProcess(pb.AttachProcessRequest(
        container_id=CID, process_id="p1", follow=True), metadata=A)]
    assert b"".join(m.stdout.data for m in chunks if m.WhichOneof("msg") == "stdout") == b"hi\nbye\n"
    assert chunks[-1].WhichOneof("msg") == "exit_status"
    got = await relay.stub.GetProcess(pb.GetProcessRequest(container_id=CID, process_id="p1"), metadata=A)
    assert got.process.state == pb.PROCESS_STATE_EXITED
    listed = await relay.stub.ListProcesses(pb.ListProcessesRequest(container_id=CID), metadata=A)
    assert [p.process_id for p in listed.processes] == ["p1"]
    await relay.stub.StartProcess(pb.StartProcessRequest(
        container_id=CID, process_id="p2", command=pb.Command(argv=["sleep", "100"])), metadata=A)
    signalled = await relay.stub.SignalProcess(pb.SignalProcessRequest(
        container_id=CID, process_id="p2", signal=pb.SIGNAL_SIGKILL), metadata=A)
    assert signalled.process.process_id == "p2"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await relay.stub.GetProcess(pb.GetProcessRequest(container_id=CID, process_id="nope"), metadata=A)
    assert rpc.error_reason(e.value) == "PROCESS_NOT_FOUND"


async def test_the_hub_still_authenticates_and_scopes_by_tenant(relay: RelayHub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await relay.stub.Run(pb.RunRequest(container_id=CID, command=pb.Command(argv=["true"])))
    assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as e:  # tenant-b asks for tenant-a's container
        await relay.stub.Run(pb.RunRequest(container_id=CID, command=pb.Command(argv=["true"])), metadata=B)
    assert rpc.error_reason(e.value) == "CONTAINER_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await relay.stub.Run(pb.RunRequest(container_id="cnt-NOPE", command=pb.Command(argv=["true"])), metadata=A)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # tenant-a used it (cached now); tenant-b still gets NOT_FOUND, never a's agent.
    await relay.stub.Run(pb.RunRequest(container_id=CID, command=pb.Command(argv=["true"])), metadata=A)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await relay.stub.GetProcess(pb.GetProcessRequest(container_id=CID, process_id="x"), metadata=B)
    assert rpc.error_reason(e.value) == "CONTAINER_NOT_FOUND"


async def test_a_deleted_container_answers_not_found_or_not_running(relay: RelayHub) -> None:
    await relay.stub.Run(pb.RunRequest(container_id=CID, command=pb.Command(argv=["true"])), metadata=A)  # cached
    await relay.agents[0].stop()
    relay.directory.entries[CID].state = orchestrator_pb2.CONTAINER_STATE_TERMINATED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await relay.stub.Run(pb.RunRequest(container_id=CID, command=pb.Command(argv=["true"])), metadata=A)
    assert (e.value.code(), rpc.error_reason(e.value)) == (grpc.StatusCode.FAILED_PRECONDITION, "CONTAINER_NOT_RUNNING")
    del relay.directory.entries[CID]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in relay.stub.GetFiles(pb.GetFilesRequest(container_id=CID, path="x"), metadata=A):
            pass
    assert rpc.error_reason(e.value) == "CONTAINER_NOT_FOUND"


async def test_deleting_through_the_hub_forgets_the_cached_agent(relay: RelayHub) -> None:
    run = pb.RunRequest(container_id=CID, command=pb.Command(argv=["true"]))
    await relay.stub.Run(run, metadata=A)
    await relay.stub.Run(run, metadata=A)
    assert relay.directory.asked == 1  # cached
    orchestrator = orchestrator_pb2_grpc.OrchestratorServiceStub(relay.channel)
    await orchestrator.DeleteContainer(orchestrator_pb2.DeleteContainerRequest(container_id=CID), metadata=A)
    # The agent still answers (a pod's address handed on would too): the Hub must ask again.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await relay.stub.Run(run, metadata=A)
    assert rpc.error_reason(e.value) == "CONTAINER_NOT_RUNNING"
    assert relay.directory.asked == 2


async def test_an_unreachable_agent_is_unavailable(relay: RelayHub) -> None:
    relay.directory.entries[OTHER] = Entry("tenant-a", f"unix:{relay.root}/nobody.sock")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await relay.stub.Run(pb.RunRequest(container_id=OTHER, command=pb.Command(argv=["true"])), metadata=A)
    assert (e.value.code(), rpc.error_reason(e.value)) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
    assert "agent" in (e.value.details() or "")


async def test_a_wrong_agent_on_the_target_gets_no_payload(relay: RelayHub) -> None:
    """OTHER's agent (OTHER's credential) answers at CID's address: nothing of
    CID's calls reaches it, and the caller gets UNAVAILABLE, not its data."""
    other = await relay.agent(OTHER, register=False)
    (other.work / "secret.txt").write_text("other's data")
    relay.directory.entries[CID].target = other.target
    upload = _put(pb.PutFilesRequest(start=pb.PutFilesStart(container_id=CID)),
                  pb.PutFilesRequest(file=pb.FileHeader(path="leak.txt")), pb.PutFilesRequest(data=b"cid's data"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await relay.stub.PutFiles(upload, metadata=A)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    assert not (other.work / "leak.txt").exists()
    for call in (relay.stub.GetFiles(pb.GetFilesRequest(container_id=CID, path="secret.txt"), metadata=A),):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for m in call:
                assert b"other's data" not in m.data
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await relay.stub.Run(pb.RunRequest(container_id=CID, command=pb.Command(shell="cat secret.txt")), metadata=A)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped by the agent) is as good as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


async def _gone(pid: int) -> bool:
    for _ in range(500):
        if not _alive(pid):
            return True
        await asyncio.sleep(0.01)
    return False


async def test_a_caller_going_away_kills_its_exec_command(relay: RelayHub) -> None:
    async def requests() -> AsyncIterator[pb.ExecRequest]:
        yield pb.ExecRequest(start=pb.ExecStart(container_id=CID, command=pb.Command(argv=["sleep", "1000"])))
        await asyncio.sleep(1000)

    call = relay.stub.Exec(requests(), metadata=A)
    first = await call.read()
    pid = first.started.pid
    assert _alive(pid)
    call.cancel()
    assert await _gone(pid), "the command outlived its cancelled Exec call"


async def test_a_caller_going_away_kills_its_run_command(relay: RelayHub) -> None:
    pidfile = relay.agents[0].work / "run.pid"
    call = relay.stub.Run(pb.RunRequest(container_id=CID, command=pb.Command(
        shell=f"echo $$ > {pidfile}; exec sleep 1000")), metadata=A)
    for _ in range(500):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.01)
    pid = int(pidfile.read_text())
    assert _alive(pid)
    call.cancel()
    assert await _gone(pid), "the command outlived its cancelled Run call"


async def test_run_output_held_by_the_hub_stays_within_the_tenants_budget() -> None:
    """The Hub asks the agent to keep no more Run output than the tenant's
    budget has room for: the reply comes back truncated, not refused."""
    if not agent_sends_proof():
        pytest.fail("agent/ does not send x-sandhub-agent-proof yet")
    root = Path(tempfile.mkdtemp(prefix="shr-", dir="/tmp"))
    limits = ExecLimits(max_held_output_bytes_per_tenant=200 << 10)
    async for hub in start_relay_hub(root, exec=limits):
        await hub.agent(CID)
        reply = await hub.stub.Run(pb.RunRequest(container_id=CID, command=pb.Command(
            shell="head -c 1000000 /dev/zero; head -c 1000000 /dev/zero >&2")), metadata=A)
        assert reply.stdout_truncated and reply.stderr_truncated
        assert len(reply.stdout) + len(reply.stderr) <= 200 << 10
        assert len(reply.stdout) >= 64 << 10
        for _ in range(100):
            if hub.hub.budgets.output.used("tenant-a") == 0:
                break
            await asyncio.sleep(0.01)
        assert hub.hub.budgets.output.used("tenant-a") == 0


async def test_concurrent_calls_of_two_tenants_reach_their_own_agents(relay: RelayHub) -> None:
    await relay.agent(OTHER, tenant="tenant-b")

    async def run(cid: str, key: tuple[tuple[str, str], ...], i: int) -> bytes:
        reply = await relay.stub.Run(pb.RunRequest(container_id=cid, command=pb.Command(
            shell=f"echo {i} $(basename $(pwd))")), metadata=key)
        return bytes(reply.stdout)

    calls = [run(CID, A, i) for i in range(30)] + [run(OTHER, B, i) for i in range(30)]
    outputs = await asyncio.gather(*calls)
    assert outputs[:30] == [f"{i} work\n".encode() for i in range(30)]
    assert outputs[30:] == [f"{i} work\n".encode() for i in range(30)]
    assert relay.directory.asked == 2  # one look-up per container, then the cache
