"""Backends behind one interface, chosen by configuration and imported lazily."""

from __future__ import annotations

from collections.abc import Callable

from orchestrator_service.backends.base import Backend, Notify
from sandhub import internal_auth
from sandhub.config import OrchestratorConfig


def load_backend(config: OrchestratorConfig, notify: Notify) -> Backend:
    """Imports only the chosen backend, so the kubernetes client and boto3 are
    not loaded when the local backend runs."""
    factories: dict[str, Callable[[], Backend]] = {
        "local": lambda: _local(config, notify),
        "kubernetes": lambda: _kubernetes(config, notify),
        "ecs": lambda: _ecs(config, notify),
    }
    try:
        factory = factories[config.backend]
    except KeyError:
        raise ValueError(
            f"SANDHUB_BACKEND: unknown backend {config.backend!r}; choose one of {', '.join(factories)}"
        ) from None
    return factory()


def _local(config: OrchestratorConfig, notify: Notify) -> Backend:
    from orchestrator_service.backends.local.backend import LocalBackend

    from sandhub.internal_auth import agent_key

    return LocalBackend(config.local, notify=notify, agent_key=agent_key(config.token) if config.token else None)


def _kubernetes(config: OrchestratorConfig, notify: Notify) -> Backend:
    from orchestrator_service.backends.kubernetes.backend import KubernetesBackend

    return KubernetesBackend(config.kubernetes, notify=notify, placements=config.placements,
                             agent_key=internal_auth.agent_key(config.token))


def _ecs(config: OrchestratorConfig, notify: Notify) -> Backend:
    from orchestrator_service.backends.ecs.backend import EcsBackend

    return EcsBackend(config.ecs, notify=notify, placements=config.placements, limits=config.limits,
                      agent_key=internal_auth.agent_key(config.token))
