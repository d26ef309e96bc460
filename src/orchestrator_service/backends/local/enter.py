"""Entering a running sandbox from the host: bwrap's confinement, replayed.

bwrap confines the sandbox's own processes when it builds the sandbox; a
process we add later gets none of that by inheritance. ``nsenter`` alone gives
a process that is in the namespaces but outside the cgroups, still host root
with every capability in the bounding set, without no_new_privs and without
the seccomp filter. So a process entering a sandbox does all of it itself,
in this order (each step needs a privilege that a later step gives up):

1. join the container's cgroups (a host path, written while still host root);
2. set RLIMIT_NOFILE (raising a hard limit needs host CAP_SYS_RESOURCE);
3. drop supplementary groups (the sandbox's user namespace denies setgroups);
4. setns into cgroup, ipc, uts, net and mount namespaces, then the user
   namespace last: once in it, we have no privilege left in the namespaces
   above it (nsenter orders them the same way);
5. fchdir to the sandbox's root (opened before step 4) and chroot there:
   bwrap pivoted into that root, which is not its mount namespace's root;
6. empty the capability bounding set, become uid/gid 1000 inside, clear the
   ambient, permitted, effective and inheritable sets (the kernel does not
   clear them for us: we entered the user namespace as an unmapped uid, not
   as its root);
7. chdir to the working directory, as the sandbox user;
8. set no_new_privs, then load the seccomp program (the very bytes bwrap got).

The pid namespace is entered by the caller's parent: setns(CLONE_NEWPID) only
applies to children. Runs in a freshly forked, single-threaded child, after
which it only execs; all of libc's functions are looked up beforehand
(``Libc``), as nothing can be loaded from the host once chrooted.
"""

from __future__ import annotations

import ctypes
import os
import errno
import resource
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator_service.backends.local.linux import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
)

NAMESPACES: dict[str, int] = {
    # Order matters: user last (see the module docstring).
    "cgroup": CLONE_NEWCGROUP,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "net": CLONE_NEWNET,
    "mnt": CLONE_NEWNS,
    "user": CLONE_NEWUSER,
}

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
MAX_CAPABILITY = 63


class EnterError(Exception):
    """A step failed; ``step`` names it for the log, ``errno`` says why."""

    def __init__(self, step: str, errno: int, detail: str = "") -> None:
        super().__init__(f"{step}: {os.strerror(errno)}{': ' + detail if detail else ''}")
        self.step = step
        self.errno = errno


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Libc:
    """The few libc calls Python's os module lacks, resolved once up front."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._setns = libc.setns
        self._setns.argtypes = [ctypes.c_int, ctypes.c_int]
        self._prctl = libc.prctl  # variadic: arguments passed as c_ulong
        self._capset = libc.capset
        self._capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]

    @staticmethod
    def _check(result: int, step: str) -> None:
        if result != 0:
            raise EnterError(step, ctypes.get_errno())

    def setns(self, fd: int, nstype: int, name: str) -> None:
        self._check(self._setns(fd, nstype), f"setns {name}")

    def _raw_prctl(self, option: int, arg2: int, arg3: object = 0) -> int:
        third = arg3 if not isinstance(arg3, int) else ctypes.c_ulong(arg3)
        result: int = self._prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), third, ctypes.c_ulong(0), ctypes.c_ulong(0))
        return result

    def prctl(self, option: int, arg2: int, step: str) -> None:
        self._check(self._raw_prctl(option, arg2), step)

    def clear_capabilities(self) -> None:
        header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        self._check(self._capset(ctypes.byref(header), data), "capset")

    def drop_bounding_set(self) -> None:
        for cap in range(MAX_CAPABILITY + 1):
            if self._raw_prctl(PR_CAPBSET_DROP, cap) != 0:
                if ctypes.get_errno() == errno.EINVAL:  # past the kernel's last capability
                    return
                raise EnterError("drop bounding set", ctypes.get_errno())

    def load_seccomp(self, program: bytes) -> None:
        buf = ctypes.create_string_buffer(program, len(program))
        prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
        self._check(self._raw_prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog)), "seccomp")


@dataclass(frozen=True)
class Target:
    """A running sandbox, opened from its pid-1 before anything is entered."""

    ns_fds: dict[str, int]
    """Namespace name (as in /proc/PID/ns) -> open fd."""
    root_fd: int
    cgroup_procs: tuple[str, ...]
    """Host paths of the container's cgroup.procs files."""


def open_target(init_pid: int, cgroup_dirs: list[str]) -> Target:
    """Opens what ``enter`` needs from the sandbox's pid-1 (host pid).

    The caller checks afterwards that ``init_pid`` is still the sandbox's
    init: if it is, these fds were opened from the right process."""
    if os.stat(f"/proc/{init_pid}/ns/user").st_ino == os.stat("/proc/self/ns/user").st_ino:
        # Without one, uid 1000 "inside" would be a real host user.
        raise EnterError("open user namespace", errno.EPERM, "the sandbox has no user namespace of its own")
    fds: dict[str, int] = {}
    try:
        for name in (*NAMESPACES, "pid"):
            fds[name] = os.open(f"/proc/{init_pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        root = os.open(f"/proc/{init_pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return Target(fds, root, tuple(f"{d}/cgroup.procs" for d in cgroup_dirs))


def close_target(target: Target) -> None:
    for fd in (*target.ns_fds.values(), target.root_fd):
        os.close(fd)


def enter(libc: Libc, target: Target, *, uid: int, gid: int, nofile: int, cwd: str, seccomp: bytes | None) -> None:
    """Steps 1-8 of the module docstring, in the calling (child) process."""
    for procs in target.cgroup_procs:
        try:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")  # "0" is the writing process itself
            finally:
                os.close(fd)
        except OSError as e:
            raise EnterError("join cgroup", e.errno or 0, procs) from None
    _os_step("set open files limit", lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)) if nofile > 0 else None)
    _os_step("setgroups", lambda: os.setgroups([]))
    for name, nstype in NAMESPACES.items():
        libc.setns(target.ns_fds[name], nstype, name)
    _os_step("chroot", lambda: os.fchdir(target.root_fd))
    _os_step("chroot", lambda: os.chroot("."))
    libc.drop_bounding_set()
    _os_step("setgid", lambda: os.setresgid(gid, gid, gid))
    _os_step("setuid", lambda: os.setresuid(uid, uid, uid))
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
    libc.clear_capabilities()
    _os_step("chdir", lambda: os.chdir(cwd))
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
    if seccomp is not None:
        libc.load_seccomp(seccomp)


def _os_step(step: str, action: Callable[[], object]) -> None:
    try:
        action()
    except OSError as e:
        raise EnterError(step, e.errno or 0) from None
