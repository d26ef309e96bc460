"""Shared pieces of the Kubernetes backend tests: configuration for the test
cluster, specs, and waiting for what the shared watch reports."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from orchestrator_service.backends.kubernetes.backend import KubernetesBackend
from orchestrator_service.model import Container, ContainerSpec, Event, Port, Resources, State
from sandhub import internal_auth
from sandhub.config import KubernetesBackendConfig, KubernetesPlacement, KubernetesToleration
from tests.conftest import ORCHESTRATOR_TOKEN
from tests.kubernetes.control_plane import NODEGROUP, NODEGROUP_LABEL, NODEGROUP_TAINT, RUNTIME_CLASS

AGENT_KEY = internal_auth.agent_key(ORCHESTRATOR_TOKEN)
"""What the Orchestrator derives from its token (tests/conftest's): pods' agent credentials."""
PLACEMENTS = {
    "default": KubernetesPlacement(),
    "fargate": KubernetesPlacement(labels={"compute": "fargate"}),
    "ec2": KubernetesPlacement(
        node_selector={NODEGROUP_LABEL: NODEGROUP},
        tolerations=(KubernetesToleration(key=NODEGROUP_TAINT, value=NODEGROUP, effect="NoSchedule"),),
        runtime_class=RUNTIME_CLASS,
        egress_cidrs=("0.0.0.0/0",),
    ),
    "nowhere": KubernetesPlacement(node_selector={NODEGROUP_LABEL: "no-such-nodegroup"}),
}


def k8s_config(kubeconfig: Path, namespace: str, **changes: Any) -> KubernetesBackendConfig:
    base: dict[str, Any] = dict(kubeconfig=str(kubeconfig), namespace=namespace, placements=PLACEMENTS,
                                retry_backoff_s=0.05)
    base.update(changes)
    return KubernetesBackendConfig(**base)


def make_spec(**changes: Any) -> ContainerSpec:
    base: dict[str, Any] = dict(
        tenant="tenant-a", image="busybox:1.37", resources=Resources(250, 128, 256, 512, 1024),
        env={"GREETING": "hi"}, labels={"app": "web"}, ttl_s=600, ports=(Port(8000, "TCP", "http"),),
        placement="default",
    )
    base.update(changes)
    return ContainerSpec(**base)


@dataclass
class Recorder:
    """The backend's notify: keeps every event, wakes waiters."""

    events: list[Event] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self.changed.set()

    def states(self, container_id: str) -> list[State]:
        return [e.container.state for e in self.events if e.container.id == container_id]


async def wait_for(backend: KubernetesBackend, container_id: str, ok: Callable[[Container], bool],
                   timeout_s: float = 30.0) -> Container:
    """Waits on the backend's own view (fed by its watch; no polling of the API)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        c = await backend.get(container_id=container_id)
        if ok(c):
            return c
        if loop.time() > deadline:
            raise AssertionError(f"{container_id} is {c.state.value} ({c.state_reason}: {c.state_message})")
        await asyncio.sleep(0.05)


def state_is(*states: State) -> Callable[[Container], bool]:
    return lambda c: c.state in states


T = TypeVar("T")


async def eventually(read: Callable[[], Awaitable[T]], ok: Callable[[T], bool], *, timeout_s: float = 30.0,
                     every_s: float = 0.1) -> T:
    """Reads until ``ok`` holds: a condition waited for, with a deadline far
    above its usual time (a loaded CI machine), never a fixed sleep or count."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await read()
        if ok(value) or loop.time() > deadline:
            return value  # the caller's assert says what was wrong
        await asyncio.sleep(every_s)
