"""Host uids for local containers, claimed host-wide.

Every orchestrator on a host (each with its own state directory) hands out
container uids from the same range, so a uid is claimed by creating the file
``<claims_dir>/<uid>`` with O_EXCL: whoever creates it owns the uid. The file
names its owner (state directory and container id) and is removed when the
container's processes are gone. Claims are files, not locks held by a live
process, because a container outlives an orchestrator crash: its uid stays
taken while its owner is down, and the restarted owner adopts (or frees) it.

A claim whose owner no longer holds the uid is stale: the owner's record of
the container is gone or terminal, names another uid, or says RUNNING while
its init is dead. Stale claims are taken over only when no free uid is left,
and every change that can remove another owner's claim happens under a
host-wide ``flock`` on ``<claims_dir>/.lock``, so two takeovers never race.
``claims_dir`` is on /run: a reboot ends every container and every claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import structlog

from orchestrator_service.backends.local import linux
from orchestrator_service.backends.local.store import Store, from_json
from orchestrator_service.model import State
from sandhub.errors import QuotaExceeded

log = structlog.get_logger("sandhub.local.uids")

LOCK_NAME = ".lock"
FRESH_S = 60.0
"""A claim younger than this is never stale: its owner may not have written
the container's record yet."""


class UidClaims:
    def __init__(self, claims_dir: Path, *, base: int, count: int, owner: Path) -> None:
        self.dir = claims_dir
        self.base = base
        self.count = count
        self.owner = str(owner.resolve())
        """This orchestrator's state directory: what its claims name."""
        self._next = base

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, uid: int) -> Path:
        return self.dir / str(uid)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # also unlocks

    # -- claim and release ----------------------------------------------------

    def claim(self, container_id: str) -> int:
        """Takes a free uid for ``container_id``; QuotaExceeded when the range is used up."""
        with self._locked():
            uid = self._first_free(container_id)
            if uid is None and self._sweep_stale():
                uid = self._first_free(container_id)
        if uid is None:
            raise QuotaExceeded(f"all {self.count} container uids of this host are taken", limit="uid_count")
        return uid

    def _first_free(self, container_id: str) -> int | None:
        """Tries uids from where the last claim stopped, wrapping around once."""
        for i in range(self.count):
            uid = self.base + (self._next - self.base + i) % self.count
            if self._create(uid, container_id):
                self._next = self.base + (uid - self.base + 1) % self.count
                return uid
        return None

    def _create(self, uid: int, container_id: str) -> bool:
        try:
            fd = os.open(self.path(uid), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"state_dir": self.owner, "container_id": container_id}, f)
        return True

    def release(self, uid: int, container_id: str) -> None:
        """Frees ``uid`` if this orchestrator's ``container_id`` holds it (a
        stale claim another orchestrator took over is left alone)."""
        with self._locked():
            if self._read(uid) == (self.owner, container_id):
                self.path(uid).unlink(missing_ok=True)

    def _read(self, uid: int) -> tuple[str, str] | None:
        try:
            data = json.loads(self.path(uid).read_text())
            return str(data["state_dir"]), str(data["container_id"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return ("", "")  # torn or foreign: treated as held by someone unknown

    # -- adoption and stale claims ---------------------------------------------

    def adopt(self, held: Mapping[int, str]) -> None:
        """At start: makes sure every uid our live containers use (uid ->
        container id) is claimed by us, and drops our claims for anything
        else (left by a crash between claim and record, or before release)."""
        with self._locked():
            for uid, container_id in held.items():
                claim = self._read(uid)
                if claim is None:
                    self._create(uid, container_id)
                elif claim != (self.owner, container_id):
                    # Only possible for containers started before claims existed.
                    log.error("uids.shared_with_another_owner", uid=uid, container_id=container_id,
                              claimed_by=claim[0], claimed_for=claim[1])
            for uid, (owner, container_id) in self._claims():
                if owner == self.owner and held.get(uid) != container_id:
                    self.path(uid).unlink(missing_ok=True)
                    log.info("uids.released_leftover", uid=uid, container_id=container_id)

    def _claims(self) -> Iterator[tuple[int, tuple[str, str]]]:
        for entry in os.scandir(self.dir):
            if entry.name.isdigit():
                claim = self._read(int(entry.name))
                if claim is not None:
                    yield int(entry.name), claim

    def _sweep_stale(self) -> int:
        """Removes claims whose owner no longer holds their uid; returns how many."""
        removed = 0
        running = uids_running()
        for uid, (owner, container_id) in list(self._claims()):
            # Whatever its record says, a uid some process still runs as is held:
            # a teardown that left processes behind keeps it (TeardownIncomplete).
            if uid not in running and is_stale(self.path(uid), uid, owner, container_id):
                self.path(uid).unlink(missing_ok=True)
                removed += 1
                log.warning("uids.stale_claim_removed", uid=uid, owner=owner, container_id=container_id)
        return removed


def uids_running(proc: Path = Path("/proc")) -> set[int]:
    """Real uids of every process on the host (one pass over /proc)."""
    found: set[int] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        found.add(int(line.split()[1]))
                        break
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def is_stale(path: Path, uid: int, owner: str, container_id: str) -> bool:
    """True when the claim's owner no longer holds ``uid`` for ``container_id``."""
    try:
        if time.time() - path.stat().st_mtime < FRESH_S or not owner:
            return False
    except FileNotFoundError:
        return True
    record_path = Store(Path(owner)).path(container_id)
    try:
        record = from_json(json.loads(record_path.read_text()))
    except FileNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False  # can't tell: keep it
    c, rt = record.container, record.runtime
    if rt.host_uid != uid or c.state in (State.TERMINATED, State.FAILED):
        return True
    # A running container whose init is gone (its owner is down): nothing runs as uid.
    return c.state is not State.PENDING and rt.init_pid > 0 and not linux.is_same_process(rt.init_pid, rt.init_start_ticks)
