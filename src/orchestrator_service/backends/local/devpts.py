"""A cap on each container's pseudo-terminals, and enough of them host-wide.

Every container has its own devpts instance (bwrap's ``--dev``), but the
kernel counts all non-initial instances against one pool:
``kernel.pty.max`` (4,096 by default) less ``kernel.pty.reserve`` (1,024,
kept for the host's own instance). One container opening ptys in a loop took
3,071 of the 3,072 in four processes, and every other tenant's PTY exec then
failed. So each container's devpts is remounted with ``max=`` (the kernel's
per-instance limit), and the host-wide pool is raised so that every container
can reach its own cap.

The remount happens while bwrap holds the sandbox (its mounts are made, nothing
runs inside yet), from a throwaway thread: a thread that leaves the process's
shared filesystem context (``unshare(CLONE_FS)``) may join another mount
namespace, which a multithreaded process may not; no process is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import threading
from pathlib import Path

CLONE_FS = 0x00000200
CLONE_NEWNS = 0x00020000
MS_REMOUNT = 32
PTY_MAX = Path("/proc/sys/kernel/pty/max")
PTY_RESERVE = Path("/proc/sys/kernel/pty/reserve")
KERNEL_PTY_LIMIT = 1 << 20
"""NR_UNIX98_PTY_MAX: the most kernel.pty.max may be set to."""
BWRAP_OPTIONS = "newinstance,ptmxmode=0666,mode=620"
"""What bwrap mounts /dev/pts with; a remount resets what it does not name."""


class DevptsError(OSError):
    """The container's devpts could not be capped."""


def raise_host_pool(containers: int, per_container: int) -> int:
    """Raises kernel.pty.max (never lowers it) so that ``containers`` each
    holding ``per_container`` ptys fit beside the host's reserve. Returns the
    value in force."""
    current = int(PTY_MAX.read_text())
    reserve = int(PTY_RESERVE.read_text())
    wanted = min(KERNEL_PTY_LIMIT, reserve + containers * per_container)
    if wanted > current:
        PTY_MAX.write_text(str(wanted))
        current = int(PTY_MAX.read_text())
    return current


def _remount(init_pid: int, max_ptys: int, result: list[BaseException]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        root = os.open(f"/proc/{init_pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        mnt = os.open(f"/proc/{init_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.unshare(CLONE_FS) != 0:
                raise DevptsError(ctypes.get_errno(), "unshare(CLONE_FS)")
            if libc.setns(mnt, CLONE_NEWNS) != 0:
                raise DevptsError(ctypes.get_errno(), "setns to the container's mount namespace")
            os.fchdir(root)  # the container's root, wherever the namespace's own is
            options = f"{BWRAP_OPTIONS},max={max_ptys}".encode()
            if libc.mount(None, b"dev/pts", None, ctypes.c_ulong(MS_REMOUNT), options) != 0:
                raise DevptsError(ctypes.get_errno(), "remount of /dev/pts")
        finally:
            os.close(mnt)
            os.close(root)
    except BaseException as e:  # handed to the waiting coroutine
        result.append(e)


async def cap_ptys(init_pid: int, max_ptys: int) -> None:
    """Limits the container whose pid-1 is ``init_pid`` to ``max_ptys`` ptys.
    The thread joined the container's mount namespace and ends with it: it is
    never reused for anything else."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    result: list[BaseException] = []

    def finish() -> None:
        if not done.done():  # cancelled meanwhile
            done.set_result(None)

    def work() -> None:
        _remount(init_pid, max_ptys, result)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(finish)

    threading.Thread(target=work, name="sandhub-devpts", daemon=True).start()
    await done
    if result:
        raise result[0]
