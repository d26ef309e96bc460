"""Which backend a container lives on, for the caller's tenant only.

The orchestrator answers (with the tenant attached, so another tenant's
container is NOT_FOUND); the answer is kept, because a container's tenant and
backend never change. Whether it still runs is the driver's to say."""

from __future__ import annotations

from collections import OrderedDict

import grpc

from hub_service.orchestrator_proxy import translate
from sandhub import rpc
from sandhub.container_ids import check_container_id
from sandhub.errors import ContainerNotFound, ContainerNotRunning
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

CACHE_SIZE = 100_000
ALIVE = (pb.CONTAINER_STATE_PENDING, pb.CONTAINER_STATE_RUNNING)


class ContainerLookup:
    def __init__(self, stub: pb_grpc.OrchestratorServiceStub, *, timeout_s: float) -> None:
        self._stub = stub
        self._timeout_s = timeout_s
        self._known: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (tenant, backend)

    async def backend_of(self, container_id: str, *, tenant: str, field: str = "container_id") -> str:
        """``field``: where the request holds the id, for the error a malformed one gets."""
        check_container_id(container_id, field=field)
        known = self._known.get(container_id)
        if known is not None:
            if known[0] != tenant:
                raise ContainerNotFound(container_id)
            self._known.move_to_end(container_id)
            return known[1]
        metadata = [(rpc.TENANT_KEY, tenant)]
        info = rpc.current_rpc.get()
        if info is not None:
            metadata.append((rpc.REQUEST_ID_KEY, info.request_id))
        try:
            got = await self._stub.GetContainer(
                pb.GetContainerRequest(container_id=container_id), metadata=metadata, timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as e:
            raise translate(e) from None
        c = got.container
        if c.state not in ALIVE:
            raise ContainerNotRunning(container_id, pb.ContainerState.Name(c.state).removeprefix("CONTAINER_STATE_"))
        backend: str = c.backend
        self._known[container_id] = (c.tenant, backend)
        if len(self._known) > CACHE_SIZE:
            self._known.popitem(last=False)
        return backend
