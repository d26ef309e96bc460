"""AgentDirectoryService servicer: where a container's exec agent listens.

Internal, like OrchestratorService: it is served by the Orchestrator only,
behind the same token interceptor, with the tenant the Hub names
(``x-sandhub-tenant``; another tenant's container is NOT_FOUND). The Hub asks
it once per container and caches the answer (proto/sandhub/internal/v1/agents.proto).
"""

from __future__ import annotations

from orchestrator_service import convert
from orchestrator_service.containers import ContainerService
from orchestrator_service.servicer import OPERATOR_BUDGET, tenant_of
from sandhub import rpc
from sandhub.budget import CallBudget
from sandhub.internal.v1 import agents_pb2 as pb
from sandhub.internal.v1 import agents_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["AgentDirectoryService"].full_name


class AgentDirectoryServicer(pb_grpc.AgentDirectoryServiceServicer):
    def __init__(self, containers: ContainerService, calls: CallBudget) -> None:
        """``calls``: the OrchestratorService's budget, so a tenant's look-ups
        and its other calls share one bound."""
        self._containers = containers
        self._calls = calls

    async def GetAgentEndpoint(self, request: pb.GetAgentEndpointRequest, context: rpc.Ctx) -> pb.GetAgentEndpointResponse:
        tenant = tenant_of(context)
        async with self._calls.call(tenant or OPERATOR_BUDGET):
            container, target = await self._containers.agent_endpoint(request.container_id, tenant=tenant)
        return pb.GetAgentEndpointResponse(
            target=target, state=convert.state_to_pb(container.state), backend=self._containers.backend_name
        )
