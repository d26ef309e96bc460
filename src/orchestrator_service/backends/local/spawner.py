"""The local exec driver's fork server, and the supervisor of each exec.

Why a separate process: entering a sandbox needs a fork whose child runs
Python code (setns, chroot, seccomp: enter.py) before it execs, and fork() in
the Hub, which runs gRPC threads, crashes children now and then. So the Hub
starts this module once with posix_spawn (``python -m
orchestrator_service.backends.local.spawner --socket PATH``); being
single-threaded, it may fork freely. Three kinds of process:

- F, the fork server: keeps POOL supervisors forked ahead of time, each
  waiting in accept() on a unix socket in a private directory, and forks a
  new one whenever one takes a connection. F reads no request itself, so a
  slow client never holds up the others. SIGCHLD is ignored, so supervisors
  never linger as zombies. F leaves when its stdin (a pipe from the Hub)
  reaches EOF, and idle supervisors go with it (PR_SET_PDEATHSIG): nothing of
  it outlives the Hub but background processes.
- S, the supervisor of one exec: reads one JSON request line, joins the
  container's pid namespace (which only affects its children), forks C and
  learns from a close-on-exec pipe whether C's exec succeeded.
- C, the command: enters everything else (enter.py), sets up its stdio and
  execs. It calls setsid(), so its host pid is its process group.

Attached mode (``spawn``): S sends ``{"pid": <pid inside>, ...}`` with the
parent ends of C's pipes (stdin, stdout, stderr) or the PTY's master over
the connection (SCM_RIGHTS), so output flows from C straight to the Hub and
S never copies or buffers any of it. Then S watches C (pidfd) and the
connection: ``{"signal": N}`` lines signal C's process group; C's exit is sent
as ``{"exit_code": .., "signal": ..}``; EOF on the connection (the caller is
done, or the Hub died) SIGKILLs the group and ends S. S reaps C only then:
until it does, C's pid (its group's id) can't be reused, so that last
SIGKILL can't reach a stranger.

Background mode: S keeps C's output pipes itself and copies them into two
ring files (ring.py) in the process's directory, writes ``meta.json`` before
it replies and ``exit.json`` (atomically) when C ends. It has its own session
and closes the connection after replying, so it outlives the Hub and F. C
still dies with its container: it is in the container's pid namespace.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator_service.backends.local.enter import EnterError, Libc, Target, close_target, enter, open_target
from orchestrator_service.backends.local.linux import CLONE_NEWPID, is_same_process, start_ticks
from orchestrator_service.backends.local.ring import RingWriter

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

META = "meta.json"
EXIT = "exit.json"
STREAMS = ("stdout", "stderr")
MAX_REQUEST = 16 << 20
"""A request carries argv and env; 256 variables of 32 KiB fit."""
MAX_FD = 1 << 20
CHUNK = 65536
POOL = 2
"""Supervisors forked ahead of time, each waiting in accept(): a request
then costs one fork (S forking C), not two. Forking is the slowest step here
(about a millisecond for this process, which is why it imports little)."""
PR_SET_PDEATHSIG = 1
IGNORED_SIGNALS: list[signal.Signals] = []
"""Signals this process ignores (Python ignores SIGPIPE and SIGXFSZ; the Hub
may have been started with more): C restores them before it execs."""


class NotRunning(Exception):
    """The container's init is gone (or going)."""


def _log() -> FilteringBoundLogger:
    """structlog, imported on first use: it would double the memory that
    every fork of this process copies."""
    import structlog

    from sandhub import logs

    if not structlog.is_configured():
        logs.configure()
    logger: FilteringBoundLogger = structlog.get_logger("sandhub.local.spawner")
    return logger


# -- F: the fork server ---------------------------------------------------------


def serve(socket_path: str, pool: int = POOL) -> int:
    libc = Libc()
    program = _seccomp_program()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    os.chmod(socket_path, 0o600)
    listener.listen(512)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    IGNORED_SIGNALS[:] = [s for s in signal.valid_signals()
                          if s not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(s) == signal.SIG_IGN]
    gc.freeze()  # what exists now is never collected: no collection writes to shared pages
    gc.disable()  # F allocates little; its children enable it when they may run long
    taken_r, taken_w = os.pipe()  # an idle supervisor writes a byte when it takes a connection
    missing = pool
    os.write(1, b"ready\n")
    _to_devnull(1)
    poller = select.poll()
    poller.register(0, select.POLLIN)
    poller.register(taken_r, select.POLLIN)
    while True:
        while missing and _fork_idle(listener, taken_r, taken_w, libc, program):
            missing -= 1
        for fd, _ in poller.poll(100 if missing else None):  # retry failed forks now and then
            if fd == 0 and not os.read(0, 4096):
                return 0  # the Hub closed our stdin: it is gone or closing
            if fd == taken_r:
                missing += len(os.read(taken_r, 4096))


def _seccomp_program() -> bytes | None:
    try:
        from orchestrator_service.backends.local.seccomp import build_filter

        return build_filter()
    except Exception as e:  # an architecture without a table: requests asking for it fail
        _log().warning("spawner.seccomp_unavailable", error=str(e))
        return None


def _fork_idle(listener: socket.socket, taken_r: int, taken_w: int, libc: Libc, program: bytes | None) -> bool:
    """Forks a supervisor that waits for one connection; False if fork failed."""
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError as e:
        _log().error("spawner.fork_failed", error=str(e))
        return False
    if pid:
        return True
    code = 1
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "pdeathsig")  # idle, we go with F
        if os.getppid() != parent:
            os._exit(0)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(taken_r)
        _to_devnull(0)
        conn = _accept(listener)
        os.write(taken_w, b"+")
        os.close(taken_w)
        listener.close()
        libc.prctl(PR_SET_PDEATHSIG, 0, "pdeathsig")  # busy: a background process outlives F
        code = supervise(conn, libc, program)
    except BaseException:
        _log().exception("spawner.supervisor_failed")
    finally:
        os._exit(code)


def _accept(listener: socket.socket) -> socket.socket:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError as e:  # e.g. EMFILE: the client waits in the backlog meanwhile
            _log().error("spawner.accept_failed", error=str(e))
            time.sleep(0.1)
            continue
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        uid = struct.unpack("3i", creds)[1]
        if uid == os.getuid():  # the directory is 0700 already; this is a second wall
            return conn
        _log().warning("spawner.foreign_peer", uid=uid)
        conn.close()


# -- S: one exec's supervisor ---------------------------------------------------------


def supervise(conn: socket.socket, libc: Libc, program: bytes | None) -> int:
    try:
        req = _read_request(conn)
    except (OSError, ValueError) as e:  # the driver went away before it asked anything
        _log().warning("spawner.no_request", error=str(e))
        return 1
    background = req["mode"] == "background"
    if background:
        os.setsid()  # not in F's group or session: signals for them don't reach us
    if req["seccomp"] and program is None:
        _reply(conn, {"error": "enter", "step": "seccomp", "errno": 0,
                      "message": "no seccomp filter for this architecture"})
        return 0
    try:
        target = _open_target(req)
    except NotRunning:
        _reply(conn, {"error": "not_running"})
        return 0
    try:
        libc.setns(target.ns_fds["pid"], CLONE_NEWPID, "pid")
    except EnterError:
        close_target(target)
        _reply(conn, {"error": "not_running"})  # its pid namespace is dying
        return 0
    seccomp = program if req["seccomp"] else None
    if background:
        return _background(conn, req, target, libc, seccomp)
    return _attached(conn, req, target, libc, seccomp)


def _read_request(conn: socket.socket) -> dict[str, Any]:
    buf = b""
    while b"\n" not in buf:
        data = conn.recv(CHUNK)
        if not data or len(buf) > MAX_REQUEST:
            raise ConnectionError("no complete request")
        buf += data
    request: dict[str, Any] = json.loads(buf.partition(b"\n")[0])
    return request


def _reply(conn: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode() + b"\n"
    try:
        if fds:
            socket.send_fds(conn, [data], fds)
        else:
            conn.sendall(data)
    except OSError:
        pass  # the caller went away; it will learn nothing more from us


def _open_target(req: dict[str, Any]) -> Target:
    pid, ticks = int(req["init_pid"]), int(req["init_start_ticks"])
    if not is_same_process(pid, ticks):
        raise NotRunning()
    try:
        target = open_target(pid, list(req["cgroups"]))
    except (OSError, EnterError):
        raise NotRunning() from None
    if not is_same_process(pid, ticks):  # opened from a pid that was reused meanwhile
        close_target(target)
        raise NotRunning()
    return target


@dataclass(frozen=True)
class _Command:
    """Everything C needs, worked out before the fork: each object C touches
    costs it a copy-on-write page fault."""

    candidates: list[bytes]
    """Paths to try, as execvpe would: argv[0] in each PATH directory."""
    argv: list[bytes]
    env: dict[bytes, bytes]
    cwd: str
    uid: int
    gid: int
    nofile: int
    die_with_supervisor: bool
    """Attached commands die with S, even when S itself is killed."""


def _command(req: dict[str, Any], *, die_with_supervisor: bool) -> _Command:
    argv = [os.fsencode(a) for a in req["argv"]]
    env = {os.fsencode(k): os.fsencode(v) for k, v in req["env"].items()}
    if b"/" in argv[0]:
        candidates = [argv[0]]
    else:
        path = env.get(b"PATH", os.fsencode(os.defpath))
        candidates = [os.path.join(d or b".", argv[0]) for d in path.split(b":")]
    return _Command(candidates, argv, env, req["cwd"], int(req["uid"]), int(req["gid"]), int(req["nofile"]),
                    die_with_supervisor)


def _launch(req: dict[str, Any], target: Target, libc: Libc, seccomp: bytes | None,
            stdio: Callable[[], None]) -> tuple[int, dict[str, Any] | None]:
    """Forks C; returns its host pid and, if it could not exec, why."""
    command = _command(req, die_with_supervisor=req["mode"] == "attached")
    err_r, err_w = os.pipe()  # close-on-exec: EOF means the exec happened
    pid = os.fork()
    if pid == 0:
        _child(command, target, libc, seccomp, stdio, err_w)
    os.close(err_w)
    with os.fdopen(err_r, "rb") as f:
        raw = f.read()
    return pid, (json.loads(raw) if raw else None)


def _child(command: _Command, target: Target, libc: Libc, seccomp: bytes | None,
           stdio: Callable[[], None], err_w: int) -> None:
    """C: never returns. Reports why it could not exec through ``err_w``."""
    try:
        os.setsid()
        for sig in IGNORED_SIGNALS:  # an ignored signal would stay ignored after exec
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        enter(libc, target, uid=command.uid, gid=command.gid, nofile=command.nofile, cwd=command.cwd, seccomp=seccomp)
        if command.die_with_supervisor:  # after the uid change, which clears it
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "pdeathsig")
        try:
            stdio()
        except OSError as e:  # e.g. ENOSPC: the container's ptys are all taken
            raise EnterError("stdio", e.errno or 0, e.strerror or "") from None
        os.closerange(3, err_w)
        os.closerange(err_w + 1, MAX_FD)
        _exec(command)
    except EnterError as e:
        failure = {"step": e.step, "errno": e.errno, "message": str(e)}
    except OSError as e:
        failure = {"step": "exec", "errno": e.errno or 0, "message": e.strerror or str(e)}
    except BaseException as e:
        failure = {"step": "internal", "errno": 0, "message": repr(e)}
    try:
        os.write(err_w, json.dumps(failure).encode())
    finally:
        os._exit(127)


def _exec(command: _Command) -> None:
    """os.execvpe, with the PATH search worked out beforehand: the error of
    the first candidate that exists but can't run, else ENOENT."""
    first: OSError | None = None
    for path in command.candidates:
        try:
            os.execve(path, command.argv, command.env)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR) and first is None:
                first = e
    raise first or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))


def _pid_inside(host_pid: int) -> int:
    """The last NSpid field: the pid as the container sees it."""
    try:
        with open(f"/proc/{host_pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except OSError:
        pass
    return 0


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:  # gone already, or not a signal number
        pass


def _exit_info(status: os.waitid_result) -> dict[str, int]:
    if status.si_code == os.CLD_EXITED:
        return {"exit_code": status.si_status, "signal": 0}
    return {"exit_code": 0, "signal": status.si_status}


def _to_devnull(fd: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, fd)
    os.close(null)


# -- attached mode ------------------------------------------------------------------


def _attached(conn: socket.socket, req: dict[str, Any], target: Target, libc: Libc, seccomp: bytes | None) -> int:
    pty = req.get("pty")
    if pty:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def stdio() -> None:
            # Opened inside: the PTY belongs to the container's own devpts,
            # so `tty` names it and the container's pty limit counts it.
            master, slave = os.openpty()
            socket.send_fds(theirs, [b"M"], [master])
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", int(pty[0]), int(pty[1]), 0, 0))
            for fd in (0, 1, 2):
                os.dup2(slave, fd)

        pid, failure = _launch(req, target, libc, seccomp, stdio)
        theirs.close()
        parent_fds: list[int] = []
        if failure is None:
            _, parent_fds, _, _ = socket.recv_fds(mine, 16, 1)
        mine.close()
    else:
        pipes = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr: (read, write)
        child_fds = [pipes[0][0], pipes[1][1], pipes[2][1]]
        parent_fds = [pipes[0][1], pipes[1][0], pipes[2][0]]

        def stdio() -> None:
            for fd, child_fd in enumerate(child_fds):
                os.dup2(child_fd, fd)

        pid, failure = _launch(req, target, libc, seccomp, stdio)
        for fd in child_fds:
            os.close(fd)
    close_target(target)
    if failure is None and not parent_fds:
        failure = {"step": "internal", "errno": 0, "message": "the command's terminal was not passed back"}
    if failure is not None:
        _reply(conn, {"error": _failure_kind(failure), **failure})
        os.waitpid(pid, 0)
        return 0
    _reply(conn, {"pid": _pid_inside(pid), "host_pid": pid}, parent_fds)
    for fd in parent_fds:
        os.close(fd)
    _watch_attached(conn, pid)
    return 0


def _failure_kind(failure: dict[str, Any]) -> str:
    return "exec" if failure.get("step") in ("exec", "chdir") else "enter"


def _watch_attached(conn: socket.socket, pid: int) -> None:
    gc.enable()  # C runs: we may live long now
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    buf = b""
    while True:
        for fd, _ in poller.poll():
            if fd == pidfd:
                # WNOWAIT: C stays a zombie, so its pid and group id stay ours.
                status = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOWAIT)
                if status is not None:
                    _reply(conn, _exit_info(status))
                poller.unregister(pidfd)
                continue
            try:
                data = conn.recv(4096)
            except OSError:
                data = b""
            buf += data
            if not data or len(buf) > 4096:  # EOF (or garbage): the caller is gone
                _killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(pidfd)
                return
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                try:
                    _killpg(pid, int(json.loads(line)["signal"]))
                except (ValueError, KeyError, TypeError):
                    _log().warning("spawner.bad_message", message=line[:100].decode(errors="replace"))


# -- background mode ----------------------------------------------------------------


def _background(conn: socket.socket, req: dict[str, Any], target: Target, libc: Libc, seccomp: bytes | None) -> int:
    pdir = Path(req["dir"])
    rings = [RingWriter(pdir / name, int(req["capacity"])) for name in STREAMS]
    pipes = [os.pipe() for _ in STREAMS]
    null = os.open(os.devnull, os.O_RDONLY)
    child_fds = [null, pipes[0][1], pipes[1][1]]

    def stdio() -> None:
        for fd, child_fd in enumerate(child_fds):
            os.dup2(child_fd, fd)

    started = time.time()
    pid, failure = _launch(req, target, libc, seccomp, stdio)
    for fd in child_fds:
        os.close(fd)
    close_target(target)
    if failure is not None:
        _reply(conn, {"error": _failure_kind(failure), **failure})
        os.waitpid(pid, 0)
        return 0
    meta = {
        "process_id": req["process_id"],
        "command": req["command"],
        "pid": _pid_inside(pid),
        "host_pid": pid,
        "host_start_ticks": start_ticks(pid),
        "supervisor_pid": os.getpid(),
        "supervisor_start_ticks": start_ticks(os.getpid()),
        "start_time": started,
    }
    try:
        write_json(pdir / META, meta)
    except OSError as e:  # the directory was removed (container deleted) meanwhile
        _killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        _reply(conn, {"error": "enter", "step": "record", "errno": e.errno or 0, "message": str(e)})
        return 0
    _reply(conn, {"pid": meta["pid"], "host_pid": pid})
    conn.close()
    for fd in (0, 1, 2):
        _to_devnull(fd)  # hold nothing of the Hub's (its log pipe) once detached
    os.chdir("/")
    _copy_output(pid, {r: ring for (r, _), ring in zip(pipes, rings)}, pdir)
    return 0


def _copy_output(pid: int, streams: dict[int, RingWriter], pdir: Path) -> None:
    """Copies C's output into its rings until C has exited and every writer
    of its pipes (C's children too) has closed them."""
    gc.enable()  # C runs: we may live long now
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    for fd in (*streams, pidfd):
        poller.register(fd, select.POLLIN)
    exited = False
    while streams or not exited:
        for fd, _ in poller.poll():
            if fd == pidfd:
                _, status = os.waitpid(pid, 0)
                poller.unregister(pidfd)
                os.close(pidfd)
                for r in list(streams):  # what C wrote just before it ended
                    os.set_blocking(r, False)
                    while r in streams and _pump(r, streams, poller):
                        pass
                code = os.waitstatus_to_exitcode(status)
                info = {"exit_code": max(code, 0), "signal": max(-code, 0), "end_time": time.time()}
                try:
                    write_json(pdir / EXIT, info)
                except OSError:
                    pass  # the container's state was removed already
                exited = True
            elif fd in streams:
                _pump(fd, streams, poller)


def _pump(fd: int, streams: dict[int, RingWriter], poller: select.poll) -> bool:
    """Moves one chunk; False when there was nothing (or the stream ended)."""
    try:
        data = os.read(fd, CHUNK)
    except BlockingIOError:
        return False
    if data:
        try:
            streams[fd].write(data)
        except OSError:
            pass  # disk full or state removed: keep draining so C never blocks on us
        return True
    poller.unregister(fd)
    os.close(fd)
    streams.pop(fd).close()
    return False


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--socket", required=True, help="unix socket path to listen on (in a 0700 directory)")
    args = parser.parse_args(argv)
    return serve(args.socket)


if __name__ == "__main__":
    sys.exit(main())
