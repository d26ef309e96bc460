"""OrchestratorService on the Hub: authenticate, then forward to the orchestrator
with the caller's tenant, a request id and a deadline."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from hub_service.auth import ApiKeyAuth
from hub_service.budgets import HubBudgets
from sandhub import rpc
from sandhub.errors import BackendUnavailable, Timeout
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc


log = structlog.get_logger("sandhub.hub")


class OrchestratorUnavailable(BackendUnavailable):
    def __init__(self) -> None:
        super().__init__("the orchestrator is not reachable; try again shortly")


class OrchestratorProxy(pb_grpc.OrchestratorServiceServicer):
    def __init__(self, stub: pb_grpc.OrchestratorServiceStub, auth: ApiKeyAuth, *, timeout_s: float,
                 budgets: HubBudgets, deleted: Callable[[str], None] = lambda _: None) -> None:
        """``deleted``: told the id of each container a DeleteContainer passed
        on here deleted (the agent directory forgets it)."""
        self._stub = stub
        self._auth = auth
        self._timeout_s = timeout_s
        self._budgets = budgets
        self._deleted = deleted

    def _call_options(self, context: rpc.Ctx) -> dict[str, Any]:
        """Metadata made here, nothing copied from the caller's: a caller's own
        x-sandhub-tenant or orchestrator token never reaches the orchestrator
        (the channel adds the Hub's token)."""
        tenant = self._auth.tenant(context)
        info = rpc.current_rpc.get()
        metadata = [(rpc.TENANT_KEY, tenant)]
        if info is not None:
            metadata.append((rpc.REQUEST_ID_KEY, info.request_id))
        remaining = context.time_remaining()
        timeout = self._timeout_s if remaining is None else min(remaining, self._timeout_s)
        return {"metadata": metadata, "timeout": timeout}

    async def _unary(self, method: Any, request: Any, context: rpc.Ctx) -> Any:
        options = self._call_options(context)
        async with self._budgets.calls.call(self._auth.tenant(context)):
            try:
                return await method(request, **options)
            except grpc.aio.AioRpcError as e:
                raise translate(e) from None

    async def CreateContainer(self, request: pb.CreateContainerRequest, context: rpc.Ctx) -> pb.CreateContainerResponse:
        return await self._unary(self._stub.CreateContainer, request, context)  # type: ignore[no-any-return]

    async def GetContainer(self, request: pb.GetContainerRequest, context: rpc.Ctx) -> pb.GetContainerResponse:
        return await self._unary(self._stub.GetContainer, request, context)  # type: ignore[no-any-return]

    async def ListContainers(self, request: pb.ListContainersRequest, context: rpc.Ctx) -> pb.ListContainersResponse:
        return await self._unary(self._stub.ListContainers, request, context)  # type: ignore[no-any-return]

    async def DeleteContainer(self, request: pb.DeleteContainerRequest, context: rpc.Ctx) -> pb.DeleteContainerResponse:
        response = await self._unary(self._stub.DeleteContainer, request, context)
        self._deleted(request.container_id)  # its agent's address may soon be another container's
        return response  # type: ignore[no-any-return]

    async def ExtendContainer(self, request: pb.ExtendContainerRequest, context: rpc.Ctx) -> pb.ExtendContainerResponse:
        return await self._unary(self._stub.ExtendContainer, request, context)  # type: ignore[no-any-return]

    async def WatchContainers(self, request: pb.WatchContainersRequest, context: rpc.Ctx) -> AsyncIterator[pb.WatchContainersResponse]:
        options = self._call_options(context)
        options["timeout"] = context.time_remaining()  # a watch lives as long as its caller wants
        with self._budgets.watches.hold(self._auth.tenant(context)):
            call = self._stub.WatchContainers(request, **options)
            try:
                async for event in call:
                    yield event
            except grpc.aio.AioRpcError as e:
                raise translate(e) from None
            finally:
                call.cancel()


def translate(e: grpc.aio.AioRpcError) -> Exception:
    """Errors from the orchestrator pass through unchanged; transport failures
    (no sandhub reason attached) become a clear UNAVAILABLE, and so does the
    orchestrator refusing the Hub's token: the caller's API key was fine, the
    operator's configuration is not (told in the log)."""
    if e.code() is grpc.StatusCode.UNAUTHENTICATED:
        log.error("hub.orchestrator_refused_token", reason=rpc.error_reason(e),
                  hint="give the Hub and the Orchestrator the same SANDHUB_ORCHESTRATOR_TOKEN(_FILE)")
        return OrchestratorUnavailable()
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN) and not rpc.error_reason(e):
        return OrchestratorUnavailable()
    if e.code() is grpc.StatusCode.DEADLINE_EXCEEDED and not rpc.error_reason(e):
        return Timeout("the orchestrator did not answer in time")
    return e
