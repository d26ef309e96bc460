"""OrchestratorService servicer: validate, convert, call the domain, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from orchestrator_service import convert
from orchestrator_service.containers import ContainerService, Keepalive, Synced
from sandhub import rpc
from sandhub.budget import CallBudget, watch_budget
from sandhub.config import OrchestratorConfig
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

OPERATOR_TENANT = "default"
OPERATOR_BUDGET = "(operator)"
"""Whose budget calls without a tenant (the operator's) count against."""


def tenant_of(context: rpc.Ctx) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == rpc.TENANT_KEY and isinstance(value, str) and value:
            rpc.set_tenant(value)
            return value
    return None


class OrchestratorServicer(pb_grpc.OrchestratorServiceServicer):
    def __init__(self, containers: ContainerService, config: OrchestratorConfig) -> None:
        self._containers = containers
        # Per tenant (as the Hub names it): bounded however many Hub replicas
        # or callers there are, and served in fair turns.
        self.calls = CallBudget(per_tenant=config.max_calls_per_tenant, total=config.max_calls,
                                 concurrency=config.call_concurrency)
        self._watches = watch_budget(per_tenant=config.max_watches_per_tenant, total=config.max_watches)

    async def CreateContainer(self, request: pb.CreateContainerRequest, context: rpc.Ctx) -> pb.CreateContainerResponse:
        tenant = tenant_of(context)
        async with self.calls.call(tenant or OPERATOR_BUDGET):
            container = await self._containers.create(
                convert.raw_create(request), tenant=tenant or OPERATOR_TENANT,
                wait_until_running=request.wait_until_running,
            )
        return pb.CreateContainerResponse(container=convert.container_to_pb(container))

    async def GetContainer(self, request: pb.GetContainerRequest, context: rpc.Ctx) -> pb.GetContainerResponse:
        tenant = tenant_of(context)
        async with self.calls.call(tenant or OPERATOR_BUDGET):
            container = await self._containers.get(request.container_id, tenant=tenant)
        return pb.GetContainerResponse(container=convert.container_to_pb(container))

    async def ListContainers(self, request: pb.ListContainersRequest, context: rpc.Ctx) -> pb.ListContainersResponse:
        tenant = tenant_of(context)
        async with self.calls.call(tenant or OPERATOR_BUDGET):
            page = await self._containers.list(
                tenant=tenant,
                label_selector=request.label_selector,
                state=convert.state_from_pb(request.state),
                size=request.page_size,
                token=request.page_token,
            )
        return pb.ListContainersResponse(
            containers=[convert.container_to_pb(c) for c in page.containers],
            next_page_token=page.next_page_token,
        )

    async def DeleteContainer(self, request: pb.DeleteContainerRequest, context: rpc.Ctx) -> pb.DeleteContainerResponse:
        tenant = tenant_of(context)
        async with self.calls.call(tenant or OPERATOR_BUDGET):
            container = await self._containers.delete(
                request.container_id, tenant=tenant,
                grace_period_s=convert.seconds(request.grace_period, "grace_period"),
            )
        return pb.DeleteContainerResponse(container=convert.container_to_pb(container))

    async def ExtendContainer(self, request: pb.ExtendContainerRequest, context: rpc.Ctx) -> pb.ExtendContainerResponse:
        tenant = tenant_of(context)
        async with self.calls.call(tenant or OPERATOR_BUDGET):
            container = await self._containers.extend(
                request.container_id, tenant=tenant, extend_by_s=convert.seconds(request.extend_by, "extend_by")
            )
        return pb.ExtendContainerResponse(container=convert.container_to_pb(container))

    async def WatchContainers(self, request: pb.WatchContainersRequest, context: rpc.Ctx) -> AsyncIterator[pb.WatchContainersResponse]:
        tenant = tenant_of(context)
        with self._watches.hold(tenant or OPERATOR_BUDGET):
            async for item in self._containers.watch(
                tenant=tenant, label_selector=request.label_selector, send_initial=request.send_initial
            ):
                if isinstance(item, Synced):
                    yield pb.WatchContainersResponse(type=pb.WATCH_EVENT_TYPE_SYNCED)
                elif isinstance(item, Keepalive):
                    yield pb.WatchContainersResponse(type=pb.WATCH_EVENT_TYPE_KEEPALIVE)
                else:
                    yield pb.WatchContainersResponse(
                        type=convert.event_type_to_pb(item.type), container=convert.container_to_pb(item.container)
                    )
