"""Building, starting and ending one bubblewrap sandbox.

A container is a bwrap process tree whose pid 1 is sandhub-agent (bwrap
``--as-pid-1``): the container's init, which reaps its orphans and serves
ExecService inside it on a unix socket the Orchestrator bound on the host and
handed over as an open fd, so the socket's path is out of the container's
reach. Every command the agent starts is in the container's cgroup, uid,
namespaces and seccomp filter by construction. Its root is a tmpfs holding
read-only binds of the image (and of the agent and a static busybox under
/.sandhub), made read-only itself once built; the work directory and /tmp are
size-capped tmpfs mounts, so the container's writes vanish with it.

Nothing of the host is handed to the container by way of bwrap: bwrap starts
with an environment of one variable (the container id, which the container
knows anyway) and reads its arguments from a sealed memfd (``--args``), so
neither the servers' environment (API keys) nor host paths nor the
container's own env values appear in ``/proc/1/environ``, ``/proc/1/cmdline``
or in ``ps`` on the host. The agent gets its credential and the container's
environment through sealed memfds too (``--token-fd``, ``--env-fd``), which
it closes once read; its own environment is bwrap's one variable, so a
container's env (GODEBUG, say) never tunes the agent itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator_service.backends.local.images import Image
from orchestrator_service.backends.local.linux import is_same_process, start_ticks
from orchestrator_service.backends.local.pipes import read_pipe

WORK_DIR = "/work"
AGENT_DIR = "/.sandhub"
AGENT = f"{AGENT_DIR}/sandhub-agent"
AGENT_STATE_DIR = "/tmp/.sandhub"
"""The agent's background-process output rings: in the container's /tmp, so
they count against its own disk (and memory, a tmpfs), never the host's."""
READY_BYTE = b"R"
SANDBOX_UID = 1000
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV_CONTAINER_ID = "SANDHUB_CONTAINER_ID"


class SpawnError(Exception):
    """bwrap could not start the sandbox; ``detail`` is its stderr, for the log."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class SandboxSpec:
    container_id: str
    image: Image
    env: dict[str, str]
    disk_mib: int
    busybox: str
    """Host path of a static busybox to bind in at /.sandhub/busybox (a shell
    for images without one), or ""."""
    agent: str = ""
    """Host path of the static sandhub-agent, bound in read-only and run as pid 1."""
    agent_token: str = ""
    """The agent's credential (internal_auth.agent_token): every call to it must carry it."""
    host_uid: int = 0
    """Unprivileged host uid the whole container runs as (through a user
    namespace, inside uid SANDBOX_UID); 0 keeps bwrap's own uid (non-root hosts)."""
    seccomp: bool = False
    """Load the deny-list seccomp filter (seccomp.py)."""
    open_files: int = 0
    """RLIMIT_NOFILE (soft and hard) of the agent and every command it starts,
    set by the agent once it took over its inherited fds; 0 leaves it alone.
    Not set on bwrap itself: the fds handed to it may be numbered above the
    limit (the orchestrator holds one fd per container)."""
    setpriv: str = ""
    """util-linux setpriv, which drops to host_uid before it execs bwrap."""


@dataclass(frozen=True)
class Started:
    bwrap_pid: int
    init_pid: int
    init_start_ticks: int
    namespaces: dict[str, int]


@dataclass(frozen=True)
class AgentFds:
    """The fds the agent inherits (numbers as bwrap's child sees them)."""

    listen: int
    token: int
    env: int
    ready: int


def bwrap_argv(
    spec: SandboxSpec, *, info_fd: int, agent: AgentFds, block_fd: int = -1, seccomp_fd: int = -1
) -> list[str]:
    """bwrap's arguments for ``spec``, then ``--`` and the agent's command
    line. Pure: no I/O. The options reach bwrap through ``--args``
    (args_memfd); the command line holds no secret and no caller's value."""
    half = max(spec.disk_mib // 2, 1) * 1024 * 1024
    argv = [
        "--unshare-pid", "--as-pid-1", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-cgroup-try",
        "--new-session",
        "--cap-drop", "ALL",
        "--hostname", spec.container_id,
    ]
    if spec.host_uid:
        # bwrap itself runs as host_uid (see spawn), so the user namespace maps
        # the sandbox user to that unprivileged uid, never to host root.
        argv += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--disable-userns"]
    root = spec.image.root
    for entry in spec.image.entries:
        dest = f"/{entry.name}"
        if entry.kind == "symlink":
            argv += ["--symlink", entry.target, dest]
        else:
            argv += ["--ro-bind", str(root / entry.name), dest]
    for path in spec.image.masked:
        if os.path.exists(path):
            argv += ["--ro-bind", "/dev/null", path]
    argv += [
        "--dev", "/dev",
        "--proc", "/proc",
        "--perms", "1777", "--size", str(half), "--tmpfs", "/tmp",
        "--perms", "0755", "--size", str(half), "--tmpfs", WORK_DIR,
    ]
    if spec.busybox:
        argv += ["--ro-bind", spec.busybox, f"{AGENT_DIR}/busybox"]
    argv += ["--ro-bind", spec.agent, AGENT]
    argv += ["--remount-ro", "/", "--chdir", WORK_DIR, "--clearenv"]
    for key, value in launcher_env(spec.container_id).items():
        argv += ["--setenv", key, value]
    argv += ["--info-fd", str(info_fd)]
    if block_fd >= 0:
        argv += ["--block-fd", str(block_fd)]
    if seccomp_fd >= 0:
        argv += ["--seccomp", str(seccomp_fd)]
    argv += [
        "--", AGENT, "--listen", f"fd:{agent.listen}", "--token-fd", str(agent.token), "--env-fd", str(agent.env),
        "--ready-fd", str(agent.ready), "--container-id", spec.container_id, "--workdir", WORK_DIR,
        "--state-dir", AGENT_STATE_DIR,
    ]
    if spec.open_files:
        argv += ["--open-files", str(spec.open_files)]
    return argv


def args_memfd(args: list[str], name: str = "sandhub-bwrap-args") -> int:
    """A sealed memfd holding ``args`` NUL-separated, for bwrap's ``--args``
    (and the agent's ``--env-fd``): a pipe would need a writer thread once
    they pass 64 KiB (env values)."""
    return sealed_memfd(b"".join(os.fsencode(a) + b"\0" for a in args), name)


def sealed_memfd(data: bytes, name: str) -> int:
    """A memfd holding ``data``, sealed against any change."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def launcher_env(container_id: str) -> dict[str, str]:
    """bwrap's whole environment, which its forked init (pid 1 inside) keeps:
    the container id alone, which find_bwrap_for looks for after a crash."""
    return {ENV_CONTAINER_ID: container_id}


def container_env(container_id: str, env: dict[str, str]) -> dict[str, str]:
    """The environment every process in the container starts with."""
    full = {"PATH": DEFAULT_PATH, "HOME": WORK_DIR, "HOSTNAME": container_id}
    full.update(env)
    full[ENV_CONTAINER_ID] = container_id
    return full


def launcher(spec: SandboxSpec) -> list[str]:
    """What runs before bwrap: setpriv for the uid. Exec wrappers, not Popen(user=...)/preexec_fn: those make Python
    fork() instead of vfork(), and fork() in a process running gRPC threads
    crashes the child now and then (seen here as SIGSEGV)."""
    prefix: list[str] = []
    if spec.host_uid:
        if not spec.setpriv:
            raise SpawnError("setpriv (util-linux) is needed to run containers as their own uid")
        uid = str(spec.host_uid)
        prefix += [spec.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    return prefix


async def _read_pipe(fd: int, *, first_byte_only: bool) -> bytes:
    """bwrap's info (to EOF) or its ready byte (the first byte only)."""
    if first_byte_only:
        return await read_pipe(fd, chunk=1, enough=bool)
    return await read_pipe(fd)


Hold = Callable[[int], Awaitable[None]]
"""Called with the sandbox's pid-1: while bwrap holds it before running
anything inside (the moment to put it in cgroups), or alongside its start
(the moment to give it a network)."""


async def spawn(
    bwrap: str, spec: SandboxSpec, *, listen_fd: int, hold: Hold | None = None, alongside: Hold | None = None,
    on_ready: Hold | None = None, timeout_s: float = 10.0,
) -> tuple[subprocess.Popen[bytes], Started]:
    """Starts bwrap; returns once the agent serves inside the finished
    sandbox. ``listen_fd``: the listening unix socket the agent serves on
    (the caller keeps and closes its own copy). ``hold`` runs while nothing
    inside has started; ``alongside`` runs while the sandbox makes its mounts
    and the agent starts (the sandbox is not ready before it is done: what
    needs no holding, such as the network, costs no time there); ``on_ready``
    is called with the sandbox's pid-1 once its mounts are made and the agent
    runs (they may not be made yet during ``hold``). If any of them fails,
    the sandbox is killed."""
    info_r, info_w = os.pipe()
    ready_r, ready_w = os.pipe()
    block_r, block_w = os.pipe()
    err_r, err_w = os.pipe()
    mine = [info_r, ready_r, block_w, err_r]
    # err_w goes in as bwrap's stderr only (fd 2), never in pass_fds: an extra
    # copy would be kept open by the agent and every command in the container.
    theirs = [info_w, ready_w, block_r]
    try:
        token_fd = sealed_memfd(spec.agent_token.encode(), "sandhub-agent-token")
        theirs.append(token_fd)
        env_fd = args_memfd([f"{k}={v}" for k, v in container_env(spec.container_id, spec.env).items()],
                            "sandhub-agent-env")
        theirs.append(env_fd)
        seccomp_fd = -1
        if spec.seccomp:
            from orchestrator_service.backends.local.seccomp import write_filter_to_memfd

            seccomp_fd = write_filter_to_memfd()
            theirs.append(seccomp_fd)
    except BaseException:
        for fd in mine + theirs + [err_w]:
            os.close(fd)
        raise
    args = bwrap_argv(
        spec, info_fd=info_w, agent=AgentFds(listen=listen_fd, token=token_fd, env=env_fd, ready=ready_w),
        block_fd=block_r, seccomp_fd=seccomp_fd,
    )
    # The options through the memfd; the init command (no host path, no
    # value of the caller's) stays on the command line: bwrap takes it from there only.
    split = args.index("--")
    theirs.append(args_memfd(args[:split]))
    argv = [*launcher(spec), bwrap, "--args", str(theirs[-1]), *args[split:]]
    try:
        proc = subprocess.Popen(
            argv,
            env=launcher_env(spec.container_id),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err_w,
            pass_fds=(*theirs, listen_fd),
            start_new_session=True,
        )
    except OSError as e:
        for fd in mine + theirs + [err_w]:
            os.close(fd)
        raise SpawnError(f"cannot run bwrap: {e.strerror}") from e
    for fd in theirs + [err_w]:
        os.close(fd)
    child_pid = 0
    beside: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(timeout_s):
            info_raw = await _read_pipe(info_r, first_byte_only=False)
            if info_raw:
                child_pid = int(json.loads(info_raw)["child-pid"])
            if child_pid and hold is not None:
                try:
                    await hold(child_pid)
                except Exception as e:
                    # Most often bwrap itself gave up meanwhile: its stderr says why.
                    await asyncio.sleep(0.05)
                    if proc.poll() is not None:
                        raise SpawnError(f"the sandbox did not start (bwrap exit {proc.returncode})",
                                         await asyncio.to_thread(_read_stderr, err_r)) from e
                    raise
            try:
                os.write(block_w, b"G")
            except BrokenPipeError:
                pass  # bwrap already failed; its stderr says why
            if child_pid and alongside is not None:
                beside = asyncio.ensure_future(alongside(child_pid))
            ready = await _read_pipe(ready_r, first_byte_only=True)
            if beside is not None and ready == READY_BYTE:
                await beside  # else bwrap's failure is the error (below), and beside is cancelled
        if ready != READY_BYTE or not info_raw:
            await asyncio.to_thread(proc.wait, timeout_s)
            detail = await asyncio.to_thread(_read_stderr, err_r) or "no message from bwrap"
            raise SpawnError(f"the sandbox did not start (bwrap exit {proc.returncode})",
                             f"{detail} (ready byte {ready!r}, sandbox pid {child_pid})")
        info: dict[str, Any] = json.loads(info_raw)
        if on_ready is not None:
            async with asyncio.timeout(timeout_s):
                await on_ready(child_pid)
    except BaseException as e:
        # Whatever went wrong (timeout, a hold step failed, we were cancelled),
        # leave no sandbox behind: the held pid-1 would otherwise run on.
        if beside is not None:
            beside.cancel()  # a no-op once done; its own error (if any) is retrieved here
            with contextlib.suppress(BaseException):
                await beside
        if child_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)
        proc.kill()
        await asyncio.to_thread(proc.wait)
        if isinstance(e, TimeoutError):
            raise SpawnError(f"the sandbox did not start within {timeout_s:g}s") from None
        raise
    finally:
        for fd in mine:
            os.close(fd)
    init_pid = int(info["child-pid"])
    namespaces = {k.removesuffix("-namespace"): int(v) for k, v in info.items() if k.endswith("-namespace")}
    return proc, Started(proc.pid, init_pid, start_ticks(init_pid), namespaces)


def _read_stderr(fd: int, *, wait_s: float = 0.5) -> str:
    """What bwrap wrote to stderr, once it has exited: read until end of file
    (or ``wait_s`` without more), at most 64 KiB."""
    os.set_blocking(fd, False)
    data = bytearray()
    poller = select.poll()  # not select(): the orchestrator holds far more than 1,024 fds
    poller.register(fd, select.POLLIN)
    while len(data) < 65536:
        if not poller.poll(wait_s * 1000):
            break
        try:
            chunk = os.read(fd, 65536 - len(data))
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def kill_tree(init_pid: int, ticks: int) -> bool:
    """SIGKILLs the sandbox's pid-1; the kernel then kills every process in
    its pid namespace. Returns False if it was already gone."""
    if not is_same_process(init_pid, ticks):
        return False
    try:
        os.kill(init_pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def pids_in_namespace(pid_ns: int) -> list[int]:
    """Host pids of every process in the pid namespace with inode ``pid_ns``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}/ns/pid").st_ino == pid_ns:
                found.append(int(name))
        except OSError:
            continue
    return found


def signal_namespace(pid_ns: int, sig: int) -> None:
    for pid in pids_in_namespace(pid_ns):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def find_bwrap_for(container_id: str) -> list[int]:
    """Pids of bwrap processes started for ``container_id`` (after a crash
    mid-create): their environment is launcher_env's, exactly. The container's
    own processes carry the id among other variables and are never matched."""
    marker = b"".join(f"{k}={v}".encode() + b"\x00" for k, v in launcher_env(container_id).items())
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if environ == marker:
            found.append(int(name))
    return found
