"""What a bench measures: a Target creates, enters and deletes containers.

Scenarios are written once against this Protocol; the Hub (over gRPC), the
floor (the local backend called directly) and later Docker each implement it.
A step that fails raises TargetError with a short reason; the reasons are
counted and printed grouped, so keep them free of ids and timestamps.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


def not_running(state: str, reason: str, message: str) -> str:
    """The failure reason for a container that ended ``state`` instead of
    RUNNING: its reason and the first line of its message, ids blanked."""
    first = re.sub(r"cnt-[a-z0-9]{12}", "cnt-...", message.splitlines()[0] if message else "")[:160]
    return f"container is {state} ({reason or 'no reason'}{': ' + first if first else ''})"


class TargetError(Exception):
    """One step failed. ``container_id`` is set when a container exists anyway
    (e.g. it was created but ended FAILED), so cleanup deletes it."""

    def __init__(self, reason: str, *, container_id: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.container_id = container_id


@dataclass(frozen=True)
class CreateParams:
    image: str
    """"" means the target's default image."""
    cpu_millicores: int
    """0 means the target's default."""
    memory_mib: int
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Created:
    container_id: str
    cct_ms: float | None
    """Container creation time as the system itself reports it
    (ready_time - create_time); None if it doesn't."""
    ip_address: str = ""


@dataclass(frozen=True)
class FileToPut:
    path: str
    """Relative to the container's work directory."""
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""


class Target(Protocol):
    name: str
    """"hub", "floor", "docker": how reports and ratios refer to it."""

    @property
    def detail(self) -> str:
        """One line saying what exactly is measured (address, backend)."""

    @property
    def cgroup_parent(self) -> str:
        """The cgroup directory holding one cgroup per container, named by its
        id, on this host ("sandhub"); "" when containers don't live here."""

    async def start(self) -> None: ...

    async def close(self) -> list[str]:
        """Releases the target; whatever it started itself (in-process
        services, a temp state dir) is stopped and removed. Returns the ids of
        containers it found still alive and had to delete on its own: empty
        when the bench's cleanup did its job."""

    async def create(self, params: CreateParams) -> Created:
        """Returns once the container runs; raises TargetError otherwise."""

    async def put_files(self, container_id: str, files: Sequence[FileToPut]) -> None: ...

    async def run(self, container_id: str, argv: Sequence[str]) -> RunResult:
        """Runs a command to completion (a nonzero exit is a result, not an error)."""

    async def start_process(self, container_id: str, process_id: str, argv: Sequence[str]) -> None:
        """Starts a background process that outlives the call."""

    async def delete(self, container_id: str) -> None:
        """Starts deleting; idempotent, and a container already gone is fine."""

    async def alive(self, labels: Mapping[str, str]) -> list[str]:
        """Ids of containers carrying all ``labels`` that are not yet fully
        gone (not TERMINATED): what cleanup still has to delete or wait for."""
