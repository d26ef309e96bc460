"""The local exec driver against real sandboxes (root needed).

Runs a real orchestrator in this process (grpc.aio on loopback port 0, the
local backend, as tests/conftest.py configures it); containers are created
through it, and commands run through LocalExecDriver directly, as the Hub
runs them: a real fork server, real namespaces, cgroups and seccomp.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from orchestrator_service.backends.exec_base import CommandSpec, ExitInfo, PtySize
from orchestrator_service.backends.local import cgroups, exec_driver
from orchestrator_service.backends.local.attached import LocalProcess
from orchestrator_service.backends.local.exec_driver import LocalExecDriver
from orchestrator_service.model import State
from orchestrator_service.server import RunningOrchestrator, start_orchestrator
from orchestrator_service.validation import RawCreate
from sandhub.config import LocalBackendConfig
from sandhub.errors import (
    BackendUnavailable,
    ContainerNotFound,
    ContainerNotRunning,
    InvalidField,
    ProcessNotFound,
    QuotaExceeded,
)
from tests.conftest import orchestrator_config

pytestmark = pytest.mark.root
T = TypeVar("T")


@dataclass
class Env:
    orch: RunningOrchestrator
    config: LocalBackendConfig
    driver: LocalExecDriver
    drivers: list[LocalExecDriver] = field(default_factory=list)

    async def container(self, env: dict[str, str] | None = None) -> str:
        raw = RawCreate(image="", cpu_millicores=0, memory_mib=0, pids=0, disk_mib=0, open_files=0,
                        env=env or {}, labels={}, ttl_s=0, ports=(), placement="", request_id="")
        c = await self.orch.containers.create(raw, tenant="t", wait_until_running=True)
        assert c.state is State.RUNNING
        return c.id

    async def delete(self, container_id: str) -> None:
        await self.orch.containers.delete(container_id, tenant=None, grace_period_s=0)
        await eventually(lambda: self.state(container_id), lambda s: s is State.TERMINATED)

    async def state(self, container_id: str) -> State:
        return (await self.orch.containers.get(container_id, tenant=None)).state

    async def new_driver(self, **kw: int) -> LocalExecDriver:
        driver = LocalExecDriver(self.config, **kw)
        await driver.start()
        self.drivers.append(driver)
        return driver

    def runtime(self, container_id: str) -> dict[str, int]:
        path = self.config.state_dir / "containers" / f"{container_id}.json"
        runtime: dict[str, int] = json.loads(path.read_text())["runtime"]
        return runtime


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    if os.geteuid() != 0:
        pytest.fail("these tests enter namespaces and need root (CI runs as root)")
    config = orchestrator_config(tmp_path)
    orch = await start_orchestrator(config)
    e = Env(orch, config.local, LocalExecDriver(config.local))
    await e.driver.start()
    try:
        yield e
    finally:
        for d in (e.driver, *e.drivers):
            await d.close()
        for c in await orch.containers.backend.list():  # type: ignore[union-attr]
            if c.state.alive:
                await orch.containers.delete(c.id, tenant=None, grace_period_s=0)
        for _ in range(200):
            if all(c.state in (State.TERMINATED, State.FAILED) for c in await orch.containers.backend.list()):  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.02)
        await orch.stop(0)


async def eventually(get: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if ok(value) or time.monotonic() > deadline:
            assert ok(value), f"still {value!r} after {timeout}s"
            return value
        await asyncio.sleep(0.02)


async def drain(proc: LocalProcess) -> tuple[bytes, bytes]:
    out = {"stdout": b"", "stderr": b""}
    while (chunk := await proc.read()) is not None:
        out[chunk.stream] += chunk.data
    return out["stdout"], out["stderr"]


async def run(driver: LocalExecDriver, container_id: str, *argv: str, stdin: bytes | None = None,
              env: dict[str, str] | None = None, cwd: str = "") -> tuple[ExitInfo, bytes, bytes]:
    proc = await driver.spawn(container_id=container_id, command=CommandSpec(argv, env or {}, cwd))
    try:
        if stdin is not None:
            await proc.write_stdin(stdin)
            await proc.close_stdin()
        out, err = await drain(proc)
        return await proc.wait(), out, err
    finally:
        await proc.kill()


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def group_members(pgid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2 :].split()[2]) == pgid:
                found.append(int(name))
    return found


def rss_kib() -> int:
    return int(status(os.getpid())["VmRSS"].split()[0])


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().split(b")")[-1].split()[0] != b"Z"
    except OSError:
        return False


# -- attached ------------------------------------------------------------------------


async def test_runs_commands_with_exit_codes_streams_env_and_cwd(env: Env) -> None:
    cid = await env.container(env={"GREETING": "hi"})
    exit_, out, err = await run(env.driver, cid, "ls", "/")
    assert exit_ == ExitInfo(0, 0) and err == b""
    assert {"work", "tmp", "usr", "proc"} <= set(out.decode().split())
    assert (await run(env.driver, cid, "sh", "-c", "exit 7"))[0] == ExitInfo(exit_code=7)
    assert (await run(env.driver, cid, "sh", "-c", "kill -TERM $$"))[0] == ExitInfo(signal=signal.SIGTERM)
    exit_, out, err = await run(env.driver, cid, "sh", "-c", "echo out; echo err >&2")
    assert (out, err) == (b"out\n", b"err\n")
    exit_, out, _ = await run(env.driver, cid, "sh", "-c", 'echo "$GREETING $EXTRA $SANDHUB_CONTAINER_ID $HOME"; pwd',
                              env={"EXTRA": "x"}, cwd="/tmp")
    assert out.decode().split("\n")[:2] == [f"hi x {cid} /work", "/tmp"]
    assert (await run(env.driver, cid, "pwd"))[1] == b"/work\n"


async def test_stdin_round_trip_with_flow_control_and_eof(env: Env) -> None:
    cid = await env.container()
    data = os.urandom(1 << 20)  # far more than a pipe holds: writes must wait for cat
    proc = await env.driver.spawn(container_id=cid, command=CommandSpec(("cat",)))

    async def feed() -> None:
        await proc.write_stdin(data)
        await proc.close_stdin()

    writer = asyncio.ensure_future(feed())
    out, err = await drain(proc)
    await writer
    assert out == data and err == b""
    assert await proc.wait() == ExitInfo(0, 0)
    with pytest.raises(BrokenPipeError):
        await proc.write_stdin(b"late")
    await proc.kill()
    await proc.kill()  # idempotent


async def test_pty_size_tty_and_resize(env: Env) -> None:
    cid = await env.container()
    proc = await env.driver.spawn(container_id=cid, command=CommandSpec(("sh", "-c", "tty; stty size")),
                                  pty=PtySize(rows=30, cols=100))
    out, err = await drain(proc)
    assert err == b""
    assert re.fullmatch(rb"/dev/pts/\d+\r\n30 100\r\n", out), out
    assert await proc.wait() == ExitInfo(0, 0)
    await proc.kill()

    shell = await env.driver.spawn(container_id=cid, command=CommandSpec(("sh",)), pty=PtySize(rows=24, cols=80))
    seen = b""

    async def until(text: bytes) -> None:
        nonlocal seen
        async with asyncio.timeout(10):
            while text not in seen:
                chunk = await shell.read()
                assert chunk is not None and chunk.stream == "stdout"
                seen += chunk.data

    await shell.write_stdin(b"stty size\n")
    await until(b"24 80")
    await shell.resize(PtySize(rows=40, cols=120))
    await shell.write_stdin(b"stty size\n")
    await until(b"40 120")
    await shell.close_stdin()  # ^D at a line start: the shell exits
    async with asyncio.timeout(10):
        assert await shell.wait() == ExitInfo(0, 0)
    await shell.kill()


async def test_entered_process_is_confined_like_the_sandbox(env: Env) -> None:
    cid = await env.container()
    rt = env.runtime(cid)
    init = rt["init_pid"]
    proc = await env.driver.spawn(container_id=cid, command=CommandSpec(("sleep", "30")))
    try:
        hp = proc.host_pid
        st = status(hp)
        assert 1 < proc.pid < 50  # a pid of the container's namespace
        assert st["NSpid"].split() == [str(hp), str(proc.pid)]
        assert st["Uid"].split() == [str(rt["host_uid"])] * 4 and rt["host_uid"] >= 200000
        assert st["Gid"].split() == [str(rt["host_uid"])] * 4 and st["Groups"] == ""
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[cap], 16) == 0, cap
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        assert status(init)["Seccomp"] == "2"  # the very confinement bwrap gave the sandbox
        joined = Path(f"/proc/{hp}/cgroup").read_text()
        parent = cgroups.parent_for(env.config.state_dir)
        for controller in ("cpu", "memory", "pids"):
            assert re.search(rf"^\d+:[\w,]*\b{controller}\b[\w,]*:/{parent}/{cid}$", joined, re.M), controller
        for ns in ("cgroup", "ipc", "mnt", "net", "pid", "user", "uts"):
            assert os.stat(f"/proc/{hp}/ns/{ns}").st_ino == os.stat(f"/proc/{init}/ns/{ns}").st_ino, ns
        root, init_root = os.stat(f"/proc/{hp}/root"), os.stat(f"/proc/{init}/root")
        assert (root.st_dev, root.st_ino) == (init_root.st_dev, init_root.st_ino)
        assert "Max open files            1024                 1024" in Path(f"/proc/{hp}/limits").read_text()
    finally:
        await proc.kill()

    script = (
        "id -u; id -G; echo $$; cat /proc/sys/kernel/hostname; "
        "touch /work/ok && ! touch /etc/nope 2>/dev/null && test -d /.sandhub && echo root-ok; "
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done"
    )
    exit_, out, err = await run(env.driver, cid, "sh", "-c", script)
    lines = out.decode().splitlines()
    assert exit_ == ExitInfo(0, 0), err
    assert lines[0:2] == ["1000", "1000"] and int(lines[2]) < 50 and lines[3] == cid and lines[4] == "root-ok"
    processes = [line for line in lines[5:] if line.strip()]
    # The container's init (the agent), this sh and its tr: no host process,
    # not the test, not the fork server or this command's supervisor.
    assert len(processes) <= 5 and not any("pytest" in p or "spawner" in p for p in processes), processes
    # The init shows none of bwrap's options (they came through a memfd) and no host path.
    assert any(p.startswith("/.sandhub/sandhub-agent --listen fd:") for p in processes), processes
    assert not any("--hostname" in p or "--ro-bind" in p for p in processes), processes


async def test_kill_ends_the_process_and_its_children(env: Env) -> None:
    cid = await env.container()
    proc = await env.driver.spawn(container_id=cid, command=CommandSpec(("sh", "-c", "sleep 100 & sleep 100; true")))
    await eventually(lambda: asyncio.sleep(0, group_members(proc.host_pid)), lambda m: len(m) == 3)
    await proc.kill()
    assert await proc.wait() == ExitInfo(signal=signal.SIGKILL)
    await eventually(lambda: asyncio.sleep(0, group_members(proc.host_pid)), lambda m: m == [], timeout=5)
    assert await proc.read() is None

    # A driver that closes (the Hub stopping) takes its callers' processes along.
    other = await env.new_driver()
    sleeper = await other.spawn(container_id=cid, command=CommandSpec(("sleep", "100")))
    await other.close()
    await eventually(lambda: asyncio.sleep(0, alive(sleeper.host_pid)), lambda a: not a, timeout=5)


async def test_a_reader_that_stops_reading_makes_the_process_wait(env: Env) -> None:
    cid = await env.container()
    rss_before = rss_kib()
    proc = await env.driver.spawn(container_id=cid, command=CommandSpec(("yes",)))
    try:
        first = await proc.read(1000)
        assert first is not None and 0 < len(first.data) <= 1000
        def wchar() -> int:
            return int(dict(line.split(": ") for line in Path(f"/proc/{proc.host_pid}/io").read_text().splitlines())["wchar"])

        # Until the pipe is full `yes` still writes (longer on a loaded
        # machine): waited for until it stops, then it must stay stopped.
        written, again = -1, wchar()
        deadline = asyncio.get_running_loop().time() + 15
        while written != again and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.3)
            written, again = again, wchar()
        assert written == again < 4 << 20  # blocked on a full pipe, not streaming into a buffer
        assert status(proc.host_pid)["State"].startswith("S")
        assert rss_kib() - rss_before < 16 << 10  # nothing piles up on our side either
    finally:
        await proc.kill()


async def test_errors_name_the_cause(env: Env) -> None:
    cid = await env.container()
    with pytest.raises(InvalidField) as e:
        await env.driver.spawn(container_id=cid, command=CommandSpec(("no-such-program",)))
    assert e.value.field == "command.argv" and "not found" in e.value.message
    with pytest.raises(InvalidField) as e:
        await env.driver.spawn(container_id=cid, command=CommandSpec(("/etc",)))
    assert e.value.field == "command.argv" and "ermission denied" in e.value.message
    with pytest.raises(InvalidField) as e:
        await env.driver.spawn(container_id=cid, command=CommandSpec(("ls",), cwd="/nowhere"))
    assert e.value.field == "command.cwd"
    with pytest.raises(InvalidField):
        await env.driver.spawn(container_id=cid, command=CommandSpec(()))
    with pytest.raises(ContainerNotFound):
        await env.driver.spawn(container_id="cnt-000000000000", command=CommandSpec(("ls",)))
    with pytest.raises(ContainerNotFound):
        await env.driver.list_background(container_id="../../etc")
    await env.delete(cid)
    with pytest.raises(ContainerNotRunning):
        await env.driver.spawn(container_id=cid, command=CommandSpec(("ls",)))
    with pytest.raises(ContainerNotRunning):
        await env.driver.start_background(container_id=cid, process_id="p", command=CommandSpec(("ls",)))


async def test_fork_server_that_died_is_started_again(env: Env) -> None:
    cid = await env.container()
    old = env.driver.spawner_pid
    os.kill(old, signal.SIGKILL)
    await eventually(lambda: asyncio.sleep(0, env.driver.spawner_pid), lambda pid: pid == 0)
    assert (await run(env.driver, cid, "true"))[0] == ExitInfo(0, 0)
    assert env.driver.spawner_pid not in (0, old)


async def test_a_start_that_takes_too_long_is_unavailable_not_internal(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overloaded host is a reason to retry (UNAVAILABLE), not a fault."""
    cid = await env.container()
    monkeypatch.setattr(exec_driver, "START_TIMEOUT_S", 0.5)
    server = env.driver.spawner_pid
    frozen = [server, *(int(p) for p in Path(f"/proc/{server}/task/{server}/children").read_text().split())]
    for pid in frozen:  # the fork server and its idle supervisors: nobody answers
        os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(BackendUnavailable, match=r"took over 0\.5s \(the host is overloaded\)"):
            await env.driver.spawn(container_id=cid, command=CommandSpec(("true",)))
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert (await run(env.driver, cid, "true"))[0] == ExitInfo(0, 0)


# -- background ---------------------------------------------------------------------


async def test_background_start_is_idempotent_and_output_is_kept(env: Env) -> None:
    cid = await env.container()
    cmd = CommandSpec(("sh", "-c", "echo hello; echo oops >&2; exit 3"), {"K": "v"}, "/tmp")
    info, created = await env.driver.start_background(container_id=cid, process_id="job-1", command=cmd)
    assert created and info.pid > 1 and info.command == cmd and info.start_time <= time.time()
    again, created = await env.driver.start_background(container_id=cid, process_id="job-1", command=cmd)
    assert not created and again.pid == info.pid and again.start_time == info.start_time

    async def get() -> object:
        return await env.driver.get_background(container_id=cid, process_id="job-1")

    done = await eventually(get, lambda p: p.exit is not None)  # type: ignore[attr-defined]
    assert done.exit == ExitInfo(exit_code=3) and done.end_time >= done.start_time  # type: ignore[attr-defined]
    assert (done.stdout_bytes, done.stderr_bytes, done.stdout_first_offset) == (6, 5, 0)  # type: ignore[attr-defined]
    read = env.driver.read_output
    got = await read(container_id=cid, process_id="job-1", stream="stdout", offset=0, max_bytes=100)
    assert (got.offset, got.data, got.dropped_before) == (0, b"hello\n", False)
    got = await read(container_id=cid, process_id="job-1", stream="stdout", offset=2, max_bytes=2)
    assert (got.offset, got.data) == (2, b"ll")
    got = await read(container_id=cid, process_id="job-1", stream="stdout", offset=6, max_bytes=100)
    assert (got.offset, got.data, got.dropped_before) == (6, b"", False)
    assert (await read(container_id=cid, process_id="job-1", stream="stderr", offset=0, max_bytes=100)).data == b"oops\n"
    with pytest.raises(InvalidField):
        await env.driver.start_background(container_id=cid, process_id="../x", command=cmd)
    with pytest.raises(InvalidField) as e:  # a failed start leaves nothing: the id is free
        await env.driver.start_background(container_id=cid, process_id="bad", command=CommandSpec(("nope",)))
    assert e.value.field == "command.argv"
    assert [p.process_id for p in await env.driver.list_background(container_id=cid)] == ["job-1"]
    for call in (env.driver.get_background(container_id=cid, process_id="nope"),
                 env.driver.get_background(container_id=cid, process_id="../../x"),
                 env.driver.signal_background(container_id=cid, process_id="nope", signum=9),
                 read(container_id=cid, process_id="nope", stream="stdout", offset=0, max_bytes=1)):
        with pytest.raises(ProcessNotFound):
            await call


async def test_background_ring_drops_the_oldest_output(env: Env) -> None:
    cid = await env.container()
    small = await env.new_driver(ring_capacity=4096)
    expected = "".join(f"{i}\n" for i in range(1, 3001)).encode()
    await small.start_background(container_id=cid, process_id="seq", command=CommandSpec(("seq", "1", "3000")))

    async def get() -> object:
        return await small.get_background(container_id=cid, process_id="seq")

    info = await eventually(get, lambda p: p.exit is not None)  # type: ignore[attr-defined]
    total = len(expected)
    assert (info.stdout_bytes, info.stdout_first_offset) == (total, total - 4096)  # type: ignore[attr-defined]
    got = await small.read_output(container_id=cid, process_id="seq", stream="stdout", offset=0, max_bytes=1 << 20)
    assert (got.offset, got.data, got.dropped_before) == (total - 4096, expected[-4096:], True)
    got = await small.read_output(container_id=cid, process_id="seq", stream="stdout", offset=total - 100, max_bytes=10)
    assert (got.offset, got.data, got.dropped_before) == (total - 100, expected[-100:-90], False)


async def test_background_signal_list_and_lost_supervisor(env: Env) -> None:
    cid = await env.container()
    for name in ("b-second", "a-first", "c-third"):  # started in this order: listed in this order
        await env.driver.start_background(container_id=cid, process_id=name, command=CommandSpec(("sleep", "100")))
    listed = await env.driver.list_background(container_id=cid)
    assert [p.process_id for p in listed] == ["b-second", "a-first", "c-third"]
    assert all(p.exit is None for p in listed)

    await env.driver.signal_background(container_id=cid, process_id="b-second", signum=signal.SIGTERM)

    async def get(pid: str) -> object:
        return await env.driver.get_background(container_id=cid, process_id=pid)

    ended = await eventually(lambda: get("b-second"), lambda p: p.exit is not None)  # type: ignore[attr-defined]
    assert ended.exit == ExitInfo(signal=signal.SIGTERM)  # type: ignore[attr-defined]
    same = await env.driver.signal_background(container_id=cid, process_id="b-second", signum=signal.SIGKILL)
    assert same == ended  # a finished process is left alone

    # Its supervisor killed, the process is reported killed (9) once it is gone.
    meta = json.loads((env.config.state_dir / "exec" / cid / "a-first" / "meta.json").read_text())
    os.kill(meta["supervisor_pid"], signal.SIGKILL)
    await asyncio.sleep(0.1)
    assert (await env.driver.get_background(container_id=cid, process_id="a-first")).exit is None  # still runs
    os.kill(meta["host_pid"], signal.SIGKILL)
    lost = await eventually(lambda: get("a-first"), lambda p: p.exit is not None)  # type: ignore[attr-defined]
    assert lost.exit == ExitInfo(signal=signal.SIGKILL)  # type: ignore[attr-defined]


async def test_background_cap_evicts_finished_processes_only(env: Env) -> None:
    cid = await env.container()
    capped = await env.new_driver(max_background=2)
    for name in ("one", "two"):
        await capped.start_background(container_id=cid, process_id=name, command=CommandSpec(("sleep", "100")))
    with pytest.raises(QuotaExceeded):
        await capped.start_background(container_id=cid, process_id="three", command=CommandSpec(("true",)))
    await capped.signal_background(container_id=cid, process_id="one", signum=signal.SIGKILL)
    await eventually(lambda: capped.get_background(container_id=cid, process_id="one"), lambda p: p.exit is not None)
    _, created = await capped.start_background(container_id=cid, process_id="three", command=CommandSpec(("true",)))
    assert created
    assert [p.process_id for p in await capped.list_background(container_id=cid)] == ["two", "three"]


async def test_background_outlives_the_driver_and_fork_server_but_not_its_container(env: Env) -> None:
    cid = await env.container()
    ticker = CommandSpec(("sh", "-c", "while :; do echo tick; sleep 0.05; done"))
    info, _ = await env.driver.start_background(container_id=cid, process_id="ticker", command=ticker)
    meta = json.loads((env.config.state_dir / "exec" / cid / "ticker" / "meta.json").read_text())
    os.kill(env.driver.spawner_pid, signal.SIGKILL)
    await env.driver.close()

    later = await env.new_driver()
    before = await later.get_background(container_id=cid, process_id="ticker")
    assert before.exit is None and before.pid == info.pid and alive(meta["host_pid"])

    async def grown() -> int:
        return (await later.get_background(container_id=cid, process_id="ticker")).stdout_bytes

    await eventually(grown, lambda n: n > before.stdout_bytes + 20)  # still running, still logged
    got = await later.read_output(container_id=cid, process_id="ticker", stream="stdout", offset=0, max_bytes=10)
    assert got.data == b"tick\ntick\n"

    await env.delete(cid)
    await eventually(lambda: asyncio.sleep(0, alive(meta["host_pid"]) or alive(meta["supervisor_pid"])), lambda a: not a)
    # The backend's teardown removes the exec state (after the supervisor wrote its last).
    await eventually(lambda: asyncio.sleep(0, (env.config.state_dir / "exec" / cid).exists()), lambda e: not e)
    assert await later.list_background(container_id=cid) == []
    with pytest.raises(ProcessNotFound):
        await later.get_background(container_id=cid, process_id="ticker")
