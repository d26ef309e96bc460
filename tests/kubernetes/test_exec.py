"""The Kubernetes exec driver against the REAL kube-apiserver: v5 websocket
exec through the API server to KWOK's kubelet server, which runs the command
on this host as nobody (KWOK is built with tools/k8s/kwok/overlay/exec.go so
that stdin EOF and exit codes behave as with a real kubelet)."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator

import pytest

from orchestrator_service.backends.exec_base import CommandSpec, ExitInfo, ProcessInfo, PtySize, RunningProcess
from orchestrator_service.backends.kubernetes import exec_scripts
from orchestrator_service.backends.kubernetes.backend import KubernetesBackend
from orchestrator_service.backends.kubernetes.exec_driver import KubernetesExecDriver
from orchestrator_service.model import State
from sandhub.errors import ContainerNotFound, ContainerNotRunning, InvalidField, ProcessNotFound
from tests.kubernetes.control_plane import ControlPlane
from tests.kubernetes.helpers import AGENT_KEY, Recorder, eventually, k8s_config, make_spec, state_is, wait_for

pytestmark = pytest.mark.kubernetes
CID = "cnt-exec00000001"


@pytest.fixture
async def driver(control_plane: ControlPlane, namespace: str) -> AsyncIterator[KubernetesExecDriver]:
    config = k8s_config(control_plane.kubeconfig, namespace)
    backend = KubernetesBackend(config, notify=Recorder(), agent_key=AGENT_KEY)
    await backend.start()
    await backend.create(spec=make_spec(), container_id=CID)
    await wait_for(backend, CID, state_is(State.RUNNING))
    d = KubernetesExecDriver(config)
    await d.start()
    yield d
    await d.close()
    await backend.close()


async def collect(proc: RunningProcess) -> tuple[bytes, bytes, ExitInfo]:
    out, err = bytearray(), bytearray()
    while (chunk := await proc.read()) is not None:
        (out if chunk.stream == "stdout" else err).extend(chunk.data)
    return bytes(out), bytes(err), await proc.wait()


def sh(script: str, **kw: object) -> CommandSpec:
    return CommandSpec(argv=("/bin/sh", "-c", script), **kw)  # type: ignore[arg-type]


async def test_stdin_eof_and_exit_code(driver: KubernetesExecDriver) -> None:
    proc = await driver.spawn(container_id=CID, command=sh("cat; echo done >&2; exit 7"))
    assert proc.pid > 1
    await proc.write_stdin(b"hello\n" * 20000)  # 120 KB: several frames
    await proc.close_stdin()
    out, err, info = await collect(proc)
    assert out == b"hello\n" * 20000 and err == b"done\n"
    assert info == ExitInfo(exit_code=7)
    with pytest.raises(BrokenPipeError):
        await proc.write_stdin(b"more")


async def test_env_cwd_and_refusals(driver: KubernetesExecDriver) -> None:
    proc = await driver.spawn(container_id=CID, command=sh('echo "$GREETING $0"; pwd', env={"GREETING": "hi"},
                                                              cwd="/"))
    out, _, info = await collect(proc)
    assert out.decode().splitlines() == ["hi /bin/sh", "/"]
    assert info.exit_code == 0
    with pytest.raises(InvalidField) as e:  # the same rule as the Hub's: absolute or empty
        await driver.spawn(container_id=CID, command=sh("pwd", cwd="tmp"))
    assert e.value.field == "command.cwd"
    with pytest.raises(InvalidField) as e:
        await driver.spawn(container_id=CID, command=CommandSpec(argv=("no-such-program-x",)))
    assert e.value.field == "command.argv"
    with pytest.raises(InvalidField) as e:
        await driver.spawn(container_id=CID, command=CommandSpec(argv=("true",), cwd="/no/such/dir"))
    assert e.value.field == "command.cwd"
    with pytest.raises(ContainerNotFound):
        await driver.spawn(container_id="cnt-nosuch000000", command=CommandSpec(argv=("true",)))


async def test_signal_and_kill(driver: KubernetesExecDriver) -> None:
    proc = await driver.spawn(container_id=CID, command=CommandSpec(argv=("sleep", "30")))
    await proc.signal(signal.SIGTERM)
    assert (await asyncio.wait_for(collect(proc), 10))[2] == ExitInfo(signal=signal.SIGTERM)
    proc = await driver.spawn(container_id=CID, command=sh("sleep 300 & echo $!; wait"))
    first = await proc.read()
    assert first is not None and first.stream == "stdout"
    child = int(first.data.split()[0])
    await proc.kill()
    await proc.kill()  # idempotent
    assert (await asyncio.wait_for(proc.wait(), 10)).signal == signal.SIGKILL
    # What the command started went with it (its process group was killed):
    # gone once the kill is delivered, which a loaded machine may take a while.
    async def child_state() -> bytes:
        check = await driver.spawn(container_id=CID, command=sh(  # a zombie waiting to be reaped counts as gone
            f"s=$(sed -n 's/^State:[[:space:]]*\\(.\\).*/\\1/p' /proc/{child}/status 2>/dev/null); "
            '[ -n "$s" ] && [ "$s" != Z ] && echo "alive $s" || echo gone'))
        return (await collect(check))[0]

    assert await eventually(child_state, lambda out: out == b"gone\n", timeout_s=10) == b"gone\n"


async def test_pty_and_resize(driver: KubernetesExecDriver) -> None:
    """Waits for the answer while the command still runs: KWOK's PTY copy can
    lose output written just before the command exits (a kubelet drains it).
    The resize travels apart from stdin, so the size is asked for again until
    it shows (a loaded machine may apply it after the first question)."""
    proc = await driver.spawn(container_id=CID, command=sh('while read x && [ "$x" != q ]; do stty size; done'),
                              pty=PtySize(rows=24, cols=80))
    await proc.resize(PtySize(rows=40, cols=100))
    out = bytearray()
    deadline = asyncio.get_running_loop().time() + 30
    while b"40 100" not in out:
        assert asyncio.get_running_loop().time() < deadline, out
        await proc.write_stdin(b"\n")
        answers = out.count(b"24 80") + out.count(b"40 100")
        while out.count(b"24 80") + out.count(b"40 100") == answers:  # one answer per question
            chunk = await asyncio.wait_for(proc.read(), 10)
            assert chunk is not None and chunk.stream == "stdout", out  # a PTY has one stream
            out += chunk.data
    assert set(re.findall(rb"\d+ \d+", bytes(out))) <= {b"24 80", b"40 100"}, out
    await proc.write_stdin(b"q\n")
    assert (await asyncio.wait_for(collect(proc), 10))[2].exit_code == 0


async def test_background_process(driver: KubernetesExecDriver) -> None:
    # Asked for as a shell line, kept as one (the record is read back below).
    cmd = CommandSpec.from_shell("echo one; sleep 0.5; echo two; echo oops >&2; exit 4", env={"A": "1"})
    info, created = await driver.start_background(container_id=CID, process_id="job-1", command=cmd)
    assert created and info.pid > 1 and info.command == cmd and info.exit is None
    again, created = await driver.start_background(container_id=CID, process_id="job-1", command=cmd)
    assert not created and again.pid == info.pid
    info = await eventually(lambda: driver.get_background(container_id=CID, process_id="job-1"),
                            lambda i: i.exit is not None)
    assert info.exit == ExitInfo(exit_code=4) and (info.stdout_bytes, info.stderr_bytes) == (8, 5)
    assert info.command == cmd and info.command.shell == cmd.shell
    read = await driver.read_output(container_id=CID, process_id="job-1", stream="stdout", offset=4, max_bytes=100)
    assert (read.offset, read.data, read.dropped_before) == (4, b"two\n", False)
    read = await driver.read_output(container_id=CID, process_id="job-1", stream="stderr", offset=0, max_bytes=3)
    assert read.data == b"oop"
    assert [(p.process_id, p.command) for p in await driver.list_background(container_id=CID)] == [("job-1", cmd)]
    with pytest.raises(ProcessNotFound):
        await driver.get_background(container_id=CID, process_id="job-2")


async def test_background_signal_and_bounded_output(driver: KubernetesExecDriver) -> None:
    await driver.start_background(container_id=CID, process_id="sleeper", command=CommandSpec(argv=("sleep", "30")))
    await driver.signal_background(container_id=CID, process_id="sleeper", signum=signal.SIGTERM)
    total = 6 * exec_scripts.SEGMENT
    await driver.start_background(container_id=CID, process_id="big",
                                  command=sh(f"head -c {total} /dev/zero"))
    async def both() -> tuple[ProcessInfo, ProcessInfo]:
        return (await driver.get_background(container_id=CID, process_id="sleeper"),
                await driver.get_background(container_id=CID, process_id="big"))

    sleeper, big = await eventually(both, lambda pair: all(i.exit is not None for i in pair))
    assert sleeper.exit == ExitInfo(signal=signal.SIGTERM)
    assert big.stdout_bytes == total
    assert big.stdout_first_offset == total - exec_scripts.KEEP * exec_scripts.SEGMENT  # the newest KEEP kept
    read = await driver.read_output(container_id=CID, process_id="big", stream="stdout", offset=0, max_bytes=10)
    assert (read.offset, read.data, read.dropped_before) == (big.stdout_first_offset, b"\0" * 10, True)


async def test_not_running_container(driver: KubernetesExecDriver, control_plane: ControlPlane,
                                     namespace: str) -> None:
    backend = KubernetesBackend(k8s_config(control_plane.kubeconfig, namespace), notify=Recorder(), agent_key=AGENT_KEY)
    await backend.start()
    try:
        c = await backend.create(spec=make_spec(image="sandhub-test.invalid/no-such-image:1"),
                                 container_id="cnt-execfail0001")
        await wait_for(backend, c.id, state_is(State.FAILED))
        with pytest.raises(ContainerNotRunning):
            await driver.spawn(container_id=c.id, command=CommandSpec(argv=("true",)))
    finally:
        await backend.close()
