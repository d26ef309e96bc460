"""Container records on disk: one JSON file per container, replaced atomically.

A record is written before anything is started and after every change, with
write-to-temp-then-rename, so an orchestrator killed at any moment leaves
either the old or the new record, never a torn one. Records describe processes
that do not survive a host reboot, so no fsync is needed for them to be right.

A full disk makes ``save`` raise StateStorageFull, and the caller changes
nothing. Teardown records (what happened whether or not there is room) may
instead overwrite the container's existing file in place: that reuses the
blocks the file already holds, so it needs no free space.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from orchestrator_service.model import Container, Endpoint, Port, Resources, State
from sandhub.errors import BackendUnavailable, StateStorageFull

log = structlog.get_logger("sandhub.local.store")
FORMAT_VERSION = 1


@dataclass
class Runtime:
    """What the local backend needs to find and tear down a container's pieces."""

    bwrap_pid: int = 0
    init_pid: int = 0
    init_start_ticks: int = 0
    """Start time of init_pid (clock ticks since boot): tells a live container
    from an unrelated process that got the same pid after it died."""
    namespaces: dict[str, int] = field(default_factory=dict)
    host_uid: int = 0
    """Unprivileged host uid the container runs as; 0 when uids aren't isolated."""
    ip_address: str = ""
    oom_kills: int = 0
    teardown_reason: str = ""
    """Why it is being torn down ("Deleted", "Expired"), kept while a teardown
    that left something behind is retried (its state_reason says so then)."""


@dataclass
class Record:
    container: Container
    runtime: Runtime


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def to_json(record: Record) -> dict[str, Any]:
    c = record.container
    data = asdict(c)
    data["state"] = c.state.value
    for key in ("create_time", "expire_time", "update_time", "ready_time", "end_time"):
        data[key] = _ts(getattr(c, key))
    return {"version": FORMAT_VERSION, "container": data, "runtime": asdict(record.runtime)}


def from_json(data: dict[str, Any]) -> Record:
    c = dict(data["container"])
    c["state"] = State(c["state"])
    c["resources"] = Resources(**c["resources"])
    c["ports"] = tuple(Port(**p) for p in c["ports"])
    c["endpoints"] = tuple(Endpoint(**e) for e in c["endpoints"])
    for key in ("create_time", "expire_time", "update_time", "ready_time", "end_time"):
        c[key] = _dt(c[key])
    return Record(container=Container(**c), runtime=Runtime(**data["runtime"]))


class Store:
    def __init__(self, root: Path) -> None:
        self.dir = root / "containers"

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, container_id: str) -> Path:
        return self.dir / f"{container_id}.json"

    def save(self, record: Record, *, in_place: bool = False) -> None:
        """Replaces the record atomically. Raises StateStorageFull when the
        disk has no room (BackendUnavailable when it refuses otherwise), with
        the old record left as it was. With ``in_place``, a record with no
        room for a new file overwrites its existing one instead (see
        _overwrite); only when that fails too does it raise."""
        final = self.path(record.container.id)
        tmp = final.with_suffix(".tmp")
        data = json.dumps(to_json(record), separators=(",", ":")).encode()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
            return
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            if e.errno not in NO_ROOM:
                raise BackendUnavailable(f"the orchestrator could not record the change ({name}); "
                                         "nothing was changed; retry", metadata={"error": name}) from e
            if not (in_place and _overwrite(final, data)):
                raise StateStorageFull(name) from e
        log.warning("store.saved_in_place", container_id=record.container.id, state=record.container.state.value)

    def remove(self, container_id: str) -> None:
        self.path(container_id).unlink(missing_ok=True)

    def load_all(self) -> list[Record]:
        """Every readable record. Works on a full or read-only disk: a record
        it can't read nor set aside is skipped (and stays for a human)."""
        records = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                records.append(from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as e:
                # A record we can't read is kept aside for a human, never deleted.
                log.error("store.unreadable_record", path=str(path), error=str(e))
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".unreadable"))
        for tmp in self.dir.glob("*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        return records


NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def _overwrite(path: Path, data: bytes) -> bool:
    """Writes ``data`` over the file at ``path`` in one write, padded with
    spaces (JSON allows trailing whitespace) to the file's length, so nothing
    of the old record is left after it; only when it fits in the blocks the
    file already holds, so it needs no free space. An orchestrator killed
    during a write of a page or two leaves the old or the new record (a
    fatal signal is taken between pages, not inside one); should the write
    still fail, the old record is written back. True when written."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False  # no record yet: nothing to reuse
    try:
        st = os.fstat(fd)
        if len(data) > st.st_blocks * 512:
            return False
        old = os.pread(fd, st.st_size, 0)
        new = data.ljust(st.st_size, b" ")
        try:
            if os.pwrite(fd, new, 0) == len(new):
                return True
        except OSError:
            pass
        with contextlib.suppress(OSError):
            os.pwrite(fd, old.ljust(len(new), b" "), 0)
        return False
    except OSError:
        return False
    finally:
        os.close(fd)
