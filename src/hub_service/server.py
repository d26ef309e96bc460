"""Builds and runs the Hub's gRPC server."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import structlog

from hub_service import transport
from hub_service.auth import ApiKeyAuth
from hub_service.budgets import HubBudgets
from hub_service.exec.agent_servicer import AgentExecServicer
from hub_service.exec.agents import AgentChannels, AgentDirectory
from hub_service.exec.relay import AgentRelay
from hub_service.orchestrator_proxy import OrchestratorProxy
from sandhub import internal_auth, rpc
from sandhub.config import HubConfig
from sandhub.exec.v1 import exec_pb2, exec_pb2_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

log = structlog.get_logger("sandhub.hub")
SERVICES = [
    orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name,
    exec_pb2.DESCRIPTOR.services_by_name["ExecService"].full_name,
]


@dataclass
class RunningHub:
    server: grpc.aio.Server
    channel: grpc.aio.Channel
    port: int
    config: HubConfig
    budgets: HubBudgets
    agent_channels: AgentChannels

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.server.stop(grace_s)
        await self.agent_channels.close()
        await self.channel.close()


PROOF_TIMEOUT_S = 10.0
"""How long a relayed stream waits for the agent's header (connecting included)."""


async def start_hub(config: HubConfig) -> RunningHub:
    """ExecService relays every call to the container's agent, found through
    the Orchestrator's AgentDirectoryService."""
    if not config.api_keys:
        raise ValueError("no API keys configured: set SANDHUB_API_KEYS=key=tenant (or use `sandhub serve --dev`)")
    token = internal_auth.require_token(config.orchestrator_token, who="hub")
    server_credentials = transport.credentials(config)  # before anything that needs closing
    channel = internal_auth.orchestrator_channel(  # every call carries the token
        config.orchestrator,
        token,
        options=[
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", int(config.connect_timeout_s * 1000)),
            ("grpc.keepalive_time_ms", 30000),
        ],
    )
    auth = ApiKeyAuth(config.api_keys)
    budgets = HubBudgets.from_config(config)
    server = grpc.aio.server(interceptors=[rpc.CanonicalInterceptor("hub")])
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    directory = AgentDirectory(channel, agent_key=internal_auth.agent_key(token), timeout_s=config.backend_timeout_s)
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(
        OrchestratorProxy(stub, auth, timeout_s=config.backend_timeout_s, budgets=budgets,
                          deleted=directory.forget_container), server
    )
    agent_channels = AgentChannels()
    relay = AgentRelay(directory, agent_channels, proof_timeout_s=PROOF_TIMEOUT_S)
    exec_pb2_grpc.add_ExecServiceServicer_to_server(
        AgentExecServicer(auth, relay, config.exec, budgets, call_timeout_s=config.backend_timeout_s), server)
    rpc.add_health_and_reflection(server, SERVICES)
    port = transport.bind(server, config.listen, server_credentials)
    await server.start()
    log.info("hub.serving", listen=config.listen, port=port, tls=server_credentials is not None,
             orchestrator=config.orchestrator,
             tenants=sorted(set(config.api_keys.values())))
    return RunningHub(server, channel, port, config, budgets, agent_channels)
