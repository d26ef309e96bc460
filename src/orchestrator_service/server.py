"""Builds and runs the orchestrator's gRPC server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import structlog

from orchestrator_service import agents
from orchestrator_service.backends import load_backend
from orchestrator_service.backends.base import Backend, Notify
from orchestrator_service.containers import ContainerService
from orchestrator_service.servicer import OrchestratorServicer
from sandhub import internal_auth, rpc
from sandhub.config import OrchestratorConfig
from sandhub.internal.v1 import agents_pb2_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

log = structlog.get_logger("sandhub.orchestrator")
SERVICE = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name


@dataclass
class RunningOrchestrator:
    server: grpc.aio.Server
    containers: ContainerService
    port: int
    config: OrchestratorConfig

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.server.stop(grace_s)
        await self.containers.close()


async def start_orchestrator(
    config: OrchestratorConfig, *, backend: Callable[[Notify], Backend] | None = None
) -> RunningOrchestrator:
    """Raises ConfigError without a usable token (config.token): callers must
    prove they are the Hub or the operator (see sandhub.internal_auth).
    ``backend`` makes the backend instead of config.backend's (tests)."""
    token_check = internal_auth.TokenServerInterceptor(config.token)
    containers = ContainerService(config)
    make = backend or (lambda notify: load_backend(config, notify))
    containers.attach(make(containers.notify))
    await containers.start()
    server = grpc.aio.server(interceptors=[rpc.CanonicalInterceptor("orchestrator"), token_check])
    servicer = OrchestratorServicer(containers, config)
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server)
    # Internal, for the Hub only (the Hub never serves it): where each agent listens.
    agents_pb2_grpc.add_AgentDirectoryServiceServicer_to_server(
        agents.AgentDirectoryServicer(containers, servicer.calls), server
    )
    rpc.add_health_and_reflection(server, [SERVICE, agents.SERVICE])
    port = rpc.bind(server, config.listen)
    await server.start()
    log.info("orchestrator.serving", listen=config.listen, port=port, backend=config.backend)
    return RunningOrchestrator(server, containers, port, config)
