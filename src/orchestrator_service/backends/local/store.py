"""Container records on disk: one JSON file per container, replaced atomically.

A record is written before anything is started and after every change, with
write-to-temp-then-rename, so an orchestrator killed at any moment leaves
either the old or the new record, never a torn one. Records describe processes
that do not survive a host reboot, so no fsync is needed for them to be right.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from orchestrator_service.model import Container, Endpoint, Port, Resources, State

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

    def save(self, record: Record) -> None:
        final = self.path(record.container.id)
        tmp = final.with_suffix(".tmp")
        tmp.write_text(json.dumps(to_json(record), separators=(",", ":")))
        os.replace(tmp, final)

    def remove(self, container_id: str) -> None:
        self.path(container_id).unlink(missing_ok=True)

    def load_all(self) -> list[Record]:
        records = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                records.append(from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as e:
                # A record we can't read is kept aside for a human, never deleted.
                log.error("store.unreadable_record", path=str(path), error=str(e))
                path.rename(path.with_suffix(".unreadable"))
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        return records
