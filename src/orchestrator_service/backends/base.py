"""The one interface every backend implements.

A backend is the source of truth for its containers (the local state directory,
Kubernetes labels and annotations, ECS tags): the orchestrator holds no state of
its own, so a restart loses nothing. Methods are async and keyword-only; inputs
and outputs are the plain types of ``orchestrator_service.model``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from orchestrator_service.model import Container, ContainerSpec, Event

Notify = Callable[[Event], None]
"""Called by a backend, on the event loop, after every change it makes or sees."""


class Backend(Protocol):
    name: str

    async def start(self) -> None:
        """Connects, and adopts what already runs (after an orchestrator restart)."""

    async def close(self) -> None:
        """Releases connections; leaves containers running."""

    def validate_image(self, image: str) -> None:
        """Raises UnknownImage when the backend can't run ``image``."""

    async def create(self, *, spec: ContainerSpec, container_id: str) -> Container:
        """Starts a container; returns it PENDING or RUNNING."""

    async def get(self, *, container_id: str) -> Container:
        """Raises ContainerNotFound."""

    async def list(self) -> list[Container]:
        """Every container the backend knows, of all tenants, terminated ones included."""

    async def delete(self, *, container_id: str, grace_period_s: float, reason: str) -> Container:
        """Starts tearing the container down; returns it TERMINATING or TERMINATED.
        ``reason`` becomes its state_reason ("Deleted", "Expired"). Idempotent; raises ContainerNotFound only for ids it never knew."""

    async def set_expiry(self, *, container_id: str, expire_time: datetime) -> Container:
        """Stores a new expiry time."""

    async def forget(self, *, container_id: str) -> None:
        """Drops the record of a TERMINATED or FAILED container whose tombstone time is over."""

    def agent_target(self, container: Container) -> str:
        """The gRPC target of ``container``'s exec agent (sandhub-agent, its
        init): "unix:/path" on this host, "ip:port" on a cluster. Called for
        RUNNING containers only; served to the Hub by AgentDirectoryService
        (proto/sandhub/internal/v1/agents.proto). Raises NotSupported while the
        backend has no agent."""

    def status(self) -> dict[str, str]:
        """What isolation and features are active, for logs and `sandhub doctor`."""
