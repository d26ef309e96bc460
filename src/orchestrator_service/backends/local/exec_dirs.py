"""The local exec driver's private directories (its fork server's socket), and
removing those of Hubs that are gone.

Each driver makes ``<tmp>/sandhub-exec-XXXXXXXX`` and holds an exclusive
flock on ``owner.lock`` inside for as long as it lives. The kernel drops the
lock when the process ends, however it ends (SIGKILL included), so a starting
driver removes every such directory whose lock it can take: its owner is gone.
The lock file is locked before it gets its name (made under a temporary name,
locked, then renamed), so a sweeper never finds an ``owner.lock`` that is free
only because its owner has not locked it yet.

Directories without ``owner.lock`` come from drivers older than this scheme:
removed once nothing listens on their socket and they are older than
LEGACY_AGE_S (a directory being made is younger).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import structlog

log = structlog.get_logger("sandhub.local.exec")

PREFIX = "sandhub-exec-"
OWNER_LOCK = "owner.lock"
SOCKET = "spawner.sock"
LEGACY_AGE_S = 60.0
"""Age (seconds) past which a directory without owner.lock and without a
listener is a leftover: making a directory and its lock takes microseconds."""


def make_owned(parent: str | None = None) -> tuple[Path, int]:
    """A new private (0700) directory and the fd holding its owner lock; the
    lock lasts until the fd is closed or the process ends."""
    path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    staging = path / f".{OWNER_LOCK}.new"
    fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(staging, path / OWNER_LOCK)
    return path, fd


def sweep(parent: str | None = None, *, keep: Path | None = None) -> list[Path]:
    """Removes the directories of drivers that are gone; returns them."""
    root = Path(parent or tempfile.gettempdir())
    removed = []
    for d in root.glob(f"{PREFIX}*"):
        if d == keep or d.is_symlink() or not d.is_dir():
            continue
        try:
            if _remove_if_abandoned(d):
                removed.append(d)
        except OSError as e:  # another sweeper got there first, or not ours to read
            log.debug("exec.sweep_skipped", path=str(d), error=str(e))
    if removed:
        log.info("exec.stale_dirs_removed", count=len(removed), paths=[str(d) for d in removed[:10]])
    return removed


def _remove_if_abandoned(d: Path) -> bool:
    try:
        fd = os.open(d / OWNER_LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        if time.time() - d.stat().st_mtime < LEGACY_AGE_S or _listening(d / SOCKET):
            return False
        shutil.rmtree(d)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its owner is alive
        shutil.rmtree(d)  # while holding the lock: no one else takes it meanwhile
        return True
    finally:
        os.close(fd)


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:
            return True  # e.g. its backlog is full: someone is there
        return True


def release(path: Path, fd: int) -> None:
    """Removes a driver's own directory, then lets go of its lock."""
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(fd)
