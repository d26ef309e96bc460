"""A seccomp deny-list for local sandboxes, compiled to classic BPF by hand.

bubblewrap's ``--seccomp FD`` reads a ready-made program (an array of
``struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}``) from FD and loads it
into the sandboxed process after building the sandbox, so bwrap's own mount
and namespace setup is not affected; bwrap sets ``no_new_privs`` itself. We
build the program here with the standard library, without libseccomp.

Why a deny-list and not an allow-list: containers run arbitrary images, and
an allow-list breaks them in surprising ways whenever a new libc or runtime
starts using a new syscall. The denied calls are the ones a container never
needs and that are attack surface: kernel modules, mounting (including the
fd-based mount API), swap, reboot, kexec, ptrace and cross-process memory
access, the kernel keyring, bpf, perf events, userfaultfd, new namespaces
(``unshare``, ``setns``), process accounting, quotas, raw I/O ports, the
kernel log, setting the clock, and file-handle lookups (``open_by_handle_at``
is the classic container escape), and io_uring (its requests run in kernel
workers that no seccomp filter sees, and it has been a steady source of
kernel exploits; a runtime that finds it refused with EPERM falls back to
plain syscalls, as when ``kernel.io_uring_disabled`` is set). Most of these need capabilities that
``--cap-drop ALL`` already removes; the filter is the second wall, and also
covers the ones an unprivileged process may call (``bpf``, ``perf_event_open``,
``userfaultfd``, ``keyctl``, ``unshare`` of a user namespace, ...).
``personality`` is deliberately allowed: some runtimes need it.

Namespaces are also reachable through ``clone``: ``clone`` is allowed unless
its flags (``args[0]``) carry a ``CLONE_NEW*`` bit, so plain fork, vfork and
threads keep working. ``clone3`` passes its flags in a struct that seccomp
cannot read, so it fails with ENOSYS, not EPERM: glibc (and others) take
ENOSYS to mean "old kernel" and fall back to ``clone``, which we can check.

The program, in order:

1. Load ``seccomp_data.arch``; kill the process for any other ABI than the
   one the table is for. On x86_64 that kills i386 (``int 0x80``) calls, whose
   different numbers would otherwise slip past the list.
2. Load ``seccomp_data.nr``. On x86_64, kill x32 ABI calls (``nr`` with bit
   0x40000000 set), which share the x86_64 arch value; ``nr == -1`` is let
   through (the kernel answers ENOSYS), as libseccomp does.
3. One ``JEQ nr, 0, 1; RET ERRNO`` pair per denied syscall. Every jump is
   0 or 1 forward, far below the 255 limit of the 8-bit ``jt``/``jf``, however
   long the list.
4. ``clone3`` returns ENOSYS.
5. ``clone``: load the low 32 bits of ``args[0]`` (both supported arches are
   little-endian; the kernel ignores the high bits of clone's flags) and
   return the errno if any namespace bit is set.
6. Allow.

x86_64 and aarch64 are supported (numbers from the kernel's
``asm/unistd_64.h`` and ``asm-generic/unistd.h``); a syscall that does not
exist on an arch (``iopl``, ``ioperm`` on aarch64) is simply not checked.
Other arches raise :class:`UnsupportedArchitecture`.
"""

from __future__ import annotations

import errno as errno_mod
import fcntl
import os
import struct
from collections.abc import Iterable

from orchestrator_service.backends.local.linux import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
)

__all__ = [
    "DENIED_SYSCALLS",
    "CLONE_NAMESPACE_FLAGS",
    "UnsupportedArchitecture",
    "build_filter",
    "syscall_number",
    "write_filter_to_memfd",
]


class UnsupportedArchitecture(RuntimeError):
    """No syscall table for this machine; the filter cannot be built."""


# --- classic BPF and seccomp constants (linux/filter.h, linux/seccomp.h) ---

BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JSET_K = 0x05 | 0x40 | 0x00  # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
BPF_MAXINSNS = 4096

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
MAX_ERRNO = 4095

# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
OFFSET_NR = 0
OFFSET_ARCH = 4
OFFSET_ARG0_LOW = 16  # little-endian: the low half of args[0] comes first

X32_SYSCALL_BIT = 0x40000000

CLONE_NAMESPACE_FLAGS = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
)
"""``clone`` with any of these in its flags is denied. (CLONE_NEWTIME, 0x80,
is not usable with ``clone``: that bit belongs to the exit signal there.)"""

DENIED_SYSCALLS: tuple[str, ...] = (
    # kernel modules
    "init_module", "finit_module", "delete_module",
    # mounting, old and fd-based API
    "mount", "umount2", "pivot_root",
    "open_tree", "open_tree_attr", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # swap, reboot, kexec
    "swapon", "swapoff", "reboot", "kexec_load", "kexec_file_load",
    # other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev",
    # kernel keyring
    "keyctl", "add_key", "request_key",
    # kernel attack surface reachable without privileges
    "bpf", "perf_event_open", "userfaultfd",
    # new namespaces (clone with CLONE_NEW* is handled separately)
    "unshare", "setns",
    # accounting, quotas, raw I/O ports, kernel log
    "acct", "quotactl", "quotactl_fd", "iopl", "ioperm", "syslog",
    # the clock is the host's
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    # file handles (open_by_handle_at escapes a bind mount)
    "lookup_dcookie", "name_to_handle_at", "open_by_handle_at",
    # io_uring: a large, often-exploited kernel surface, and its operations run
    # in kernel workers that seccomp never sees (Docker and ChromeOS deny it too)
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)  # fmt: skip

# name: (x86_64, aarch64); None where the arch has no such syscall.
_SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "open_tree_attr": (467, 467),  # Linux 6.15
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "unshare": (272, 97),
    "setns": (308, 268),
    "acct": (163, 89),
    "quotactl": (179, 60),
    "quotactl_fd": (443, 443),
    "iopl": (172, None),
    "ioperm": (173, None),
    "syslog": (103, 116),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "clock_adjtime": (305, 266),
    "adjtimex": (159, 171),
    "lookup_dcookie": (212, 18),
    "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "personality": (135, 92),
    "clone": (56, 220),
    "clone3": (435, 435),
    "getpid": (39, 172),
}

# machine name (os.uname) -> (index into _SYSCALLS, AUDIT_ARCH_*)
_ARCHES: dict[str, tuple[int, int]] = {
    "x86_64": (0, 0xC000003E),  # AUDIT_ARCH_X86_64
    "aarch64": (1, 0xC00000B7),  # AUDIT_ARCH_AARCH64
    "arm64": (1, 0xC00000B7),
}


def _arch(arch: str | None) -> tuple[str, int, int]:
    machine = arch if arch is not None else os.uname().machine
    try:
        index, audit = _ARCHES[machine]
    except KeyError:
        raise UnsupportedArchitecture(
            f"no seccomp syscall table for {machine!r}; supported: {', '.join(sorted(_ARCHES))}"
        ) from None
    return ("aarch64" if index == 1 else "x86_64"), index, audit


def syscall_number(name: str, *, arch: str | None = None) -> int | None:
    """The syscall's number on ``arch`` (default: this machine), or None if
    the arch has no such call. Raises ValueError for a name not in the table."""
    _, index, _ = _arch(arch)
    try:
        return _SYSCALLS[name][index]
    except KeyError:
        raise ValueError(f"unknown syscall {name!r}: not in the seccomp table") from None


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def build_filter(
    denied: Iterable[str] = DENIED_SYSCALLS, *, errno: int = errno_mod.EPERM, arch: str | None = None
) -> bytes:
    """The compiled seccomp program for bwrap's ``--seccomp``.

    ``denied`` syscalls (and ``clone`` with a namespace flag) fail with
    ``errno``; ``clone3`` fails with ENOSYS; a foreign ABI kills the process;
    everything else is allowed. ``arch`` is an ``os.uname().machine`` value,
    this machine's by default.

    Raises ValueError for an unknown syscall name or an errno out of range,
    and UnsupportedArchitecture for a machine without a table.
    """
    name, index, audit_arch = _arch(arch)
    if not 1 <= errno <= MAX_ERRNO:
        raise ValueError(f"errno must be within 1..{MAX_ERRNO}, not {errno}")
    numbers: list[int] = []
    for syscall in dict.fromkeys(denied):  # dedupe, keep order
        nr = syscall_number(syscall, arch=name)
        if nr is not None:
            numbers.append(nr)

    deny = SECCOMP_RET_ERRNO | errno
    kill = SECCOMP_RET_KILL_PROCESS
    prog = [
        _insn(BPF_LD_W_ABS, OFFSET_ARCH),
        _insn(BPF_JEQ_K, audit_arch, jt=1, jf=0),
        _insn(BPF_RET_K, kill),
        _insn(BPF_LD_W_ABS, OFFSET_NR),
    ]
    if name == "x86_64":
        prog += [
            _insn(BPF_JSET_K, X32_SYSCALL_BIT, jt=0, jf=2),  # bit clear: on to the list
            _insn(BPF_JEQ_K, 0xFFFFFFFF, jt=1, jf=0),  # nr == -1: on to the list
            _insn(BPF_RET_K, kill),
        ]
    for nr in numbers:
        prog += [_insn(BPF_JEQ_K, nr, jt=0, jf=1), _insn(BPF_RET_K, deny)]
    clone3 = _SYSCALLS["clone3"][index]
    clone = _SYSCALLS["clone"][index]
    assert clone3 is not None and clone is not None
    prog += [
        _insn(BPF_JEQ_K, clone3, jt=0, jf=1),
        _insn(BPF_RET_K, SECCOMP_RET_ERRNO | errno_mod.ENOSYS),
        _insn(BPF_JEQ_K, clone, jt=0, jf=3),  # not clone: allow
        _insn(BPF_LD_W_ABS, OFFSET_ARG0_LOW),
        _insn(BPF_JSET_K, CLONE_NAMESPACE_FLAGS, jt=0, jf=1),
        _insn(BPF_RET_K, deny),
        _insn(BPF_RET_K, SECCOMP_RET_ALLOW),
    ]
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"seccomp program too long: {len(prog)} instructions (max {BPF_MAXINSNS})")
    return b"".join(prog)


def write_filter_to_memfd(program: bytes | None = None) -> int:
    """A sealed memfd holding ``program`` (default: :func:`build_filter`),
    positioned at its start, for ``bwrap --seccomp FD`` with ``pass_fds``.

    The caller owns the fd and closes it once bwrap has started. Use one fd
    per bwrap: bwrap reads it to the end, and the child shares the file
    offset, so a reused fd would hand the next bwrap an empty program (or
    ``os.lseek(fd, 0, os.SEEK_SET)`` it first). The fd is close-on-exec;
    ``pass_fds`` makes it inheritable in the child only.
    """
    data = build_filter() if program is None else program
    fd = os.memfd_create("sandhub-seccomp", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
