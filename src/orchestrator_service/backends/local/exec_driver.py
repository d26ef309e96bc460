"""LocalExecDriver: the Hub's way into local sandboxes (ExecDriver, exec_base.py).

The Hub never forks (it runs gRPC threads): commands are started by a fork
server (spawner.py) that the driver launches once with posix_spawn. For an
attached command the driver receives the command's pipe (or PTY) fds
themselves, so output goes from the command to the caller with nothing
buffered in between: a caller that stops reading makes the command block on
a full pipe. Background processes outlive the Hub; what they are and what
they printed is in files under ``<state_dir>/exec/<container_id>/<process_id>/``,
read here directly, without the fork server.

Which container to enter comes from the local backend's records (store.py),
read on every call: the Hub keeps no container state of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import posixpath
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from orchestrator_service.backends.exec_base import (
    CommandSpec, ExecDriver, OutputRead, ProcessInfo, PtySize, Stream,
)
from orchestrator_service.backends.local import cgroups, exec_dirs
from orchestrator_service.backends.local.attached import Channel, LocalProcess
from orchestrator_service.backends.local.exec_state import SAFE_NAME as _SAFE_NAME
from orchestrator_service.backends.local.exec_state import exec_dir, read_process
from orchestrator_service.backends.local.ring import DEFAULT_CAPACITY, RingError, read_ring
from orchestrator_service.backends.local.sandbox import AGENT_DIR, SANDBOX_UID, WORK_DIR, container_env
from orchestrator_service.backends.local.linux import is_same_process
from orchestrator_service.backends.local.pipes import read_pipe
from orchestrator_service.backends.local.spawner import META, STREAMS
from orchestrator_service.backends.local.store import Record, Store, from_json
from orchestrator_service.model import State
from sandhub.config import LocalBackendConfig
from sandhub.errors import (
    BackendError, BackendUnavailable, ContainerNotFound, ContainerNotRunning, InvalidField, InvalidStream,
    ProcessNotFound, QuotaExceeded, SandhubError,
)

log = structlog.get_logger("sandhub.local.exec")

PROCESS_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_BACKGROUND = 64
"""Background processes kept per container (running or finished; the oldest
finished one makes room for a new one). Each keeps two rings on disk."""
START_TIMEOUT_S = 10.0
"""How long starting a command (or the fork server) may take; it takes
milliseconds, so this only catches a stuck host."""
SPAWNER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
"""The fork server's whole environment: nothing of the Hub's."""
ABANDONED_S = 10.0
"""A process directory still without meta.json after this long belongs to a
start that died half-way; it is removed so the id can be used again."""
KILL_WAIT_S = 5.0
TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EINTR})
"""Why entering a container may fail for a moment (the host short of processes
or memory): UNAVAILABLE, where any other failure to enter is a fault of ours."""


class LocalExecDriver:
    def __init__(
        self, config: LocalBackendConfig, *, ring_capacity: int = DEFAULT_CAPACITY, max_background: int = MAX_BACKGROUND
    ) -> None:
        self._config = config
        self._store = Store(config.state_dir)
        self._exec_dir = exec_dir(config.state_dir)
        self._capacity = ring_capacity
        self._max_background = max_background
        self._cgroups = cgroups.Cgroups("")
        self._seccomp = config.seccomp
        self._nofile_max = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self._dir: Path | None = None
        self._dir_lock = -1
        self._proc: subprocess.Popen[bytes] | None = None
        self._launch_lock = asyncio.Lock()
        self._live: set[LocalProcess] = set()
        self._toolbox = ""

    @property
    def spawner_pid(self) -> int:
        """The fork server's pid (0 when not running); for tests and `doctor`."""
        return self._proc.pid if self._proc and self._proc.poll() is None else 0

    @property
    def toolbox(self) -> str:
        """The static busybox the backend binds into every container, or ""."""
        return self._toolbox

    async def start(self) -> None:
        if os.geteuid() != 0:
            raise BackendUnavailable("running commands in local containers needs root (setns into their namespaces)")
        from orchestrator_service.backends.local.backend import _is_static  # the backend's own rule

        if await asyncio.to_thread(_is_static, self._config.busybox_path):
            self._toolbox = f"{AGENT_DIR}/busybox"
        self._cgroups = cgroups.Cgroups(cgroups.detect(), parent=cgroups.parent_for(self._config.state_dir))
        if self._seccomp:
            try:
                from orchestrator_service.backends.local.seccomp import build_filter

                build_filter()
            except Exception as e:  # as the backend does: no table, no filter in containers either
                log.warning("exec.seccomp_unavailable", error=str(e))
                self._seccomp = False
        self._exec_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self._launch()

    async def close(self) -> None:
        for proc in list(self._live):
            await proc.kill()
        proc_, self._proc = self._proc, None
        if proc_ is not None:
            if proc_.stdin:
                proc_.stdin.close()  # EOF: the fork server leaves
            try:
                await asyncio.to_thread(proc_.wait, 5.0)
            except subprocess.TimeoutExpired:
                proc_.kill()
                await asyncio.to_thread(proc_.wait)
        if self._dir is not None:
            exec_dirs.release(self._dir, self._dir_lock)
            self._dir, self._dir_lock = None, -1

    # -- the fork server ----------------------------------------------------------

    async def _launch(self) -> None:
        if self._dir is None:
            # Those of Hubs killed before they could remove theirs go first.
            await asyncio.to_thread(exec_dirs.sweep)
            self._dir, self._dir_lock = exec_dirs.make_owned()  # 0700, locked while we live
        path = self._dir / "spawner.sock"
        path.unlink(missing_ok=True)
        # posix_spawn/vfork: no preexec_fn, so no fork() in this threaded process.
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator_service.backends.local.spawner", "--socket", str(path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                # Not the Hub's environment (API keys): every command is forked
                # from this process and holds its memory until it execs.
                env=SPAWNER_ENV,
            )
        except OSError as e:
            raise BackendUnavailable(f"cannot start the local exec fork server: {e.strerror}") from e
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                ready = await read_pipe(proc.stdout.fileno(), chunk=256, enough=lambda data: b"\n" in data)
        except TimeoutError:
            ready = b""
        proc.stdout.close()
        if ready != b"ready\n":
            proc.kill()
            await asyncio.to_thread(proc.wait)
            raise BackendUnavailable("the local exec fork server did not start; see its log")
        self._proc = proc
        log.info("exec.spawner_started", pid=proc.pid, socket=str(path))

    async def _connect(self) -> socket.socket:
        if self._dir is not None and self.spawner_pid == 0:
            # Gone: start it again before connecting. Its idle pre-forked
            # supervisors may still listen on the old socket and would take
            # the connection, then end with their parent; the new one listens
            # on a fresh socket at the same path.
            await self._relaunch()
        for attempt in range(2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                if self._dir is None:
                    raise FileNotFoundError("driver not started")
                await asyncio.get_running_loop().sock_connect(sock, str(self._dir / "spawner.sock"))
                return sock
            except OSError as e:  # gone, refused, its backlog full: it is restarting or overloaded
                sock.close()
                if attempt or self._dir is None:
                    raise BackendUnavailable(f"the local exec fork server is not reachable ({e.strerror or e}); "
                                             "it is being restarted, retry") from e
                await self._relaunch()
        raise AssertionError("unreachable")

    async def _relaunch(self) -> None:
        async with self._launch_lock:
            if self.spawner_pid == 0:
                log.warning("exec.spawner_restarting")
                if self._proc is not None and self._proc.stdin:
                    self._proc.stdin.close()
                await self._launch()

    async def _call(self, request: dict[str, Any], *, container_id: str, command: CommandSpec) -> tuple[Channel, dict[str, Any], list[int]]:
        """Sends one request to a new supervisor; returns its first reply."""
        for attempt in range(2):
            channel = Channel(await self._connect())
            try:
                async with asyncio.timeout(START_TIMEOUT_S):
                    try:
                        await channel.send(request)
                    except OSError:  # its supervisor is gone before it read anything: nothing started
                        message, sent = None, False
                    else:
                        message, sent = await channel.recv(), True
            except BaseException as e:
                channel.close()  # the supervisor, seeing EOF, kills what it started
                if isinstance(e, TimeoutError):  # the host is overloaded: worth a retry later
                    raise BackendUnavailable(
                        f"starting a command in {container_id} took over {START_TIMEOUT_S:g}s (the host is "
                        "overloaded); it was stopped if it had started") from None
                raise
            if message is not None:
                break
            channel.close()
            # The supervisor ended without a reply: an idle pre-forked one of a
            # fork server that just died (it ends with its parent), or one
            # killed. Once more, through a fork server started again if it
            # died, or when the request never reached it.
            if attempt or (sent and self.spawner_pid != 0):
                raise self._no_reply(container_id, sent=sent, background=request["mode"] == "background")
        assert message is not None  # the loop ends by break or raise
        reply, fds = message
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            channel.close()
            self._raise_for(reply, container_id=container_id, command=command)
        return channel, reply, fds

    @staticmethod
    def _no_reply(container_id: str, *, sent: bool, background: bool) -> BackendUnavailable:
        """A transient fault of the way into the container (its fork server
        restarting, a supervisor killed): UNAVAILABLE, saying whether the
        command may have started (a Run is not idempotent: no blind 'retry')."""
        what = (f"the command's supervisor for {container_id} ended before it answered (the exec fork server "
                "restarting, or the host out of processes)")
        if not sent:
            return BackendUnavailable(f"{what}; the command was not started, retry")
        if background:
            return BackendUnavailable(f"{what}; the process may have started: start it again with the same "
                                      "process_id, which returns it if it did")
        return BackendUnavailable(f"{what}; the command was stopped if it had started")

    def _raise_for(self, reply: dict[str, Any], *, container_id: str, command: CommandSpec) -> None:
        kind, step, message = reply["error"], reply.get("step", ""), reply.get("message", "")
        if kind == "exec" and step == "chdir":
            raise InvalidField("command.cwd", f"{command.cwd!r}: {os.strerror(reply['errno'])} in the container")
        if kind == "exec":
            what = "not found in the container" if reply["errno"] == errno.ENOENT else os.strerror(reply["errno"])
            raise InvalidField("command.argv", f"{command.argv[0]!r}: {what}")
        if kind == "enter" and step == "stdio" and reply.get("errno") == errno.ENOSPC:
            raise QuotaExceeded(f"container {container_id} holds all the pseudo-terminals it may "
                                "(a per-container limit); close some or run without a PTY", limit="max_ptys")
        self._running(container_id)  # gone meanwhile: ContainerNotRunning
        if kind == "not_running":
            raise ContainerNotRunning(container_id, "FAILED")
        if reply.get("errno") in TRANSIENT_ERRNOS:  # nothing ran: the command never got to exec
            log.warning("exec.enter_short_of_resources", container_id=container_id, step=step, error=message)
            raise BackendUnavailable(f"entering container {container_id} failed for now ({step}: "
                                     f"{os.strerror(reply['errno'])}); the command was not started, retry")
        log.error("exec.enter_failed", container_id=container_id, step=step, error=message)
        raise BackendError(f"entering container {container_id} failed at {step}: {message}")

    async def out_of_pids(self, *, container_id: str) -> bool:
        try:
            record = self._record(container_id)
        except ContainerNotFound:
            return False
        for d in self._cgroups.dirs(record.container.id):
            try:
                limit = (d / "pids.max").read_text().strip()
                current = int((d / "pids.current").read_text())
            except (OSError, ValueError):
                continue  # not the pids controller's directory, or gone
            return limit != "max" and current >= int(limit)
        return False

    # -- records and requests -----------------------------------------------------------

    def _record(self, container_id: str) -> Record:
        if not _SAFE_NAME.match(container_id):
            raise ContainerNotFound(container_id)
        try:
            return from_json(json.loads(self._store.path(container_id).read_text()))
        except FileNotFoundError:
            raise ContainerNotFound(container_id) from None

    def _running(self, container_id: str) -> Record:
        record = self._record(container_id)
        state = record.container.state
        if state is not State.RUNNING:
            raise ContainerNotRunning(container_id, state.value)
        if not is_same_process(record.runtime.init_pid, record.runtime.init_start_ticks):
            raise ContainerNotRunning(container_id, "FAILED")
        return record

    def _request(self, container_id: str, command: CommandSpec) -> dict[str, Any]:
        command.check()
        record = self._running(container_id)
        c, rt = record.container, record.runtime
        if not rt.host_uid:
            raise BackendUnavailable("this container has no user namespace of its own; commands can't enter it safely")
        env = container_env(c.id, c.env)
        env.update(command.env)
        return {
            "init_pid": rt.init_pid,
            "init_start_ticks": rt.init_start_ticks,
            "cgroups": [str(d) for d in self._cgroups.dirs(c.id)],
            "nofile": min(c.resources.open_files, self._nofile_max),
            "seccomp": self._seccomp,
            "uid": SANDBOX_UID,
            "gid": SANDBOX_UID,
            "argv": list(command.argv),
            "env": env,
            "cwd": posixpath.join(WORK_DIR, command.cwd) if command.cwd else WORK_DIR,
        }

    # -- attached ---------------------------------------------------------------------

    async def spawn(self, *, container_id: str, command: CommandSpec, pty: PtySize | None = None) -> LocalProcess:
        if pty is not None and not (0 < pty.rows < 65536 and 0 < pty.cols < 65536):
            raise InvalidField("pty", "rows and cols must be between 1 and 65535")
        request = {"mode": "attached", **self._request(container_id, command),
                   "pty": [pty.rows, pty.cols] if pty else None}
        channel, reply, fds = await self._call(request, container_id=container_id, command=command)
        proc = LocalProcess(channel, reply, fds, pty=pty is not None, on_close=self._live.discard)
        self._live.add(proc)
        return proc

    # -- background ---------------------------------------------------------------------

    async def start_background(self, *, container_id: str, process_id: str, command: CommandSpec) -> tuple[ProcessInfo, bool]:
        if not PROCESS_ID.match(process_id):
            raise InvalidField("process_id", "1-63 characters of [a-z0-9-], starting with a lower-case letter or digit")
        request = self._request(container_id, command)
        cdir = self._exec_dir / container_id
        cdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pdir = cdir / process_id
        while True:
            try:
                pdir.mkdir(mode=0o700)  # atomic: of two concurrent starts, one creates
                break
            except FileExistsError:
                existing = await self._wait_started(pdir, process_id)
                if existing is not None:
                    return existing, False
        try:
            self._make_room(cdir, keep=process_id)
        except BaseException:
            shutil.rmtree(pdir, ignore_errors=True)
            raise
        request.update(mode="background", dir=str(pdir), capacity=self._capacity, process_id=process_id,
                       command=command.to_record())
        try:
            channel, _, _ = await self._call(request, container_id=container_id, command=command)
        except (SandhubError, BackendError):
            if not (pdir / META).exists():  # nothing started: the id is free again
                shutil.rmtree(pdir, ignore_errors=True)
            raise
        channel.close()
        info = read_process(pdir, process_id)
        if info is None:
            raise BackendError("the background process started but its record is missing")
        log.info("exec.background_started", container_id=container_id, process_id=process_id, pid=info.pid)
        return info, True

    async def _wait_started(self, pdir: Path, process_id: str) -> ProcessInfo | None:
        """The process made by another start of the same id; None if that start failed."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            info = read_process(pdir, process_id)
            if info is not None:
                return info
            try:
                age = time.time() - pdir.stat().st_mtime
            except FileNotFoundError:
                return None
            if age > ABANDONED_S:
                shutil.rmtree(pdir, ignore_errors=True)
                return None
            await asyncio.sleep(0.01)
        raise BackendUnavailable(f"background process {process_id!r} is still starting; retry")

    def _make_room(self, cdir: Path, *, keep: str) -> None:
        """Evicts the oldest finished processes when the container is at its cap."""
        others = [d for d in cdir.iterdir() if d.name != keep]
        excess = len(others) - self._max_background + 1
        if excess <= 0:
            return
        finished = sorted(
            (info.end_time, d.name) for d in others if (info := read_process(d, d.name)) is not None and info.exit is not None
        )
        if len(finished) < excess:
            raise QuotaExceeded(
                f"the container already has {len(others)} background processes running; end some first",
                limit="max_background_processes",
            )
        for _, name in finished[:excess]:
            shutil.rmtree(cdir / name, ignore_errors=True)

    def _process_dir(self, container_id: str, process_id: str) -> tuple[Path, ProcessInfo]:
        self._record(container_id)
        pdir = self._exec_dir / container_id / process_id
        info = read_process(pdir, process_id) if PROCESS_ID.match(process_id) else None
        if info is None:
            raise ProcessNotFound(container_id, process_id)
        return pdir, info

    async def get_background(self, *, container_id: str, process_id: str) -> ProcessInfo:
        return self._process_dir(container_id, process_id)[1]

    async def list_background(self, *, container_id: str) -> list[ProcessInfo]:
        self._record(container_id)
        cdir = self._exec_dir / container_id
        if not cdir.is_dir():
            return []
        found = [info for d in cdir.iterdir() if (info := read_process(d, d.name)) is not None]
        return sorted(found, key=lambda p: (p.start_time, p.process_id))

    async def signal_background(self, *, container_id: str, process_id: str, signum: int) -> ProcessInfo:
        if not 1 <= signum < signal.NSIG:
            raise InvalidField("signal", f"{signum} is not a signal number")
        pdir, info = self._process_dir(container_id, process_id)
        if info.exit is not None:
            return info
        meta = json.loads((pdir / META).read_text())
        if is_same_process(meta["host_pid"], meta["host_start_ticks"]):  # not a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(meta["host_pid"], signum)
        return self._process_dir(container_id, process_id)[1]

    async def read_output(
        self, *, container_id: str, process_id: str, stream: Stream, offset: int, max_bytes: int
    ) -> OutputRead:
        if stream not in STREAMS:
            raise InvalidStream(f"stream must be one of {', '.join(STREAMS)}")
        if offset < 0:
            raise InvalidField("offset", "must not be negative")
        if max_bytes <= 0:
            raise InvalidField("max_bytes", "must be positive")
        pdir, _ = self._process_dir(container_id, process_id)
        try:
            got = read_ring(pdir / stream, offset, max_bytes)
        except (FileNotFoundError, RingError):
            raise ProcessNotFound(container_id, process_id) from None
        return OutputRead(offset=got.offset, data=got.data, dropped_before=got.dropped_before)


if TYPE_CHECKING:  # mypy checks that the classes fulfil the contract

    def _is_driver(driver: LocalExecDriver) -> ExecDriver:
        return driver

