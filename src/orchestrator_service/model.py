"""Plain domain types. Backends and domain code use these; proto stops at the servicer."""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def new_container_id() -> str:
    """"cnt-" + 12 random characters: DNS-label safe, unguessable across tenants."""
    return "cnt-" + "".join(secrets.choice(ID_ALPHABET) for _ in range(12))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


CREATE_INTERRUPTED = "OrchestratorCrashed"
"""The state_reason of a FAILED container whose create the orchestrator was in
the middle of when it stopped (killed, crashed): nothing of it is left, and a
CreateContainer with the same tenant, request_id and spec starts it again, as a
new container with a new id (containers.py). Any other FAILED container is
what its request_id names for good."""


class State(enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"
    FAILED = "FAILED"

    @property
    def alive(self) -> bool:
        return self in (State.PENDING, State.RUNNING)


@dataclass(frozen=True)
class Resources:
    cpu_millicores: int
    memory_mib: int
    pids: int
    disk_mib: int
    open_files: int


@dataclass(frozen=True)
class Port:
    port: int
    protocol: str = "TCP"
    name: str = ""


@dataclass(frozen=True)
class Endpoint:
    name: str
    port: int
    protocol: str
    address: str


@dataclass(frozen=True)
class ContainerSpec:
    """A validated create request, defaults filled in."""

    tenant: str
    image: str
    resources: Resources
    env: dict[str, str]
    labels: dict[str, str]
    ttl_s: float
    ports: tuple[Port, ...]
    placement: str
    request_id: str = ""


@dataclass(frozen=True)
class Container:
    id: str
    tenant: str
    image: str
    resources: Resources
    env: dict[str, str]
    labels: dict[str, str]
    ports: tuple[Port, ...]
    state: State
    backend: str
    placement: str
    create_time: datetime
    expire_time: datetime
    update_time: datetime
    state_reason: str = ""
    state_message: str = ""
    ip_address: str = ""
    endpoints: tuple[Endpoint, ...] = ()
    ready_time: datetime | None = None
    end_time: datetime | None = None
    request_id: str = ""

    @classmethod
    def from_spec(cls, spec: ContainerSpec, *, id: str, backend: str, now: datetime) -> Container:
        return cls(
            id=id,
            tenant=spec.tenant,
            image=spec.image,
            resources=spec.resources,
            env=dict(spec.env),
            labels=dict(spec.labels),
            ports=spec.ports,
            state=State.PENDING,
            backend=backend,
            placement=spec.placement,
            create_time=now,
            expire_time=now + timedelta(seconds=spec.ttl_s),
            update_time=now,
            request_id=spec.request_id,
        )

    def with_state(self, state: State, *, reason: str = "", message: str = "", now: datetime | None = None) -> Container:
        now = now or utcnow()
        changes: dict[str, object] = {
            "state": state,
            "state_reason": reason,
            "state_message": message,
            "update_time": now,
        }
        if state is State.RUNNING and self.ready_time is None:
            changes["ready_time"] = now
        if state in (State.TERMINATED, State.FAILED) and self.end_time is None:
            changes["end_time"] = now
        return replace(self, **changes)  # type: ignore[arg-type]


class EventType(enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True)
class Event:
    type: EventType
    container: Container


@dataclass
class Page:
    containers: list[Container] = field(default_factory=list)
    next_page_token: str = ""
