"""Error statuses carry what ErrorReason's comment in errors.proto promises,
read off the wire of a real Hub (which relays the Orchestrator's errors) and a
real Orchestrator on loopback, local backend (root): ErrorInfo, the typed
ErrorDetail, and a BadRequest naming the field as a proto field path when the
error is about one.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from sandhub.client import AsyncClient, InvalidArgument
from sandhub.common.v1 import errors_pb2
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import Services, auth

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]
A = auth("key-a")


class Details:
    """The details of one error status, by kind."""

    def __init__(self, err: grpc.aio.AioRpcError) -> None:
        raw = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
        self.code = err.code()
        self.info, self.typed = error_details_pb2.ErrorInfo(), errors_pb2.ErrorDetail()
        self.bad: error_details_pb2.BadRequest | None = None
        found = {"info": 0, "typed": 0}
        for detail in status_pb2.Status.FromString(raw).details:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(self.info):
                found["info"] += 1
            elif detail.Unpack(self.typed):
                found["typed"] += 1
            elif detail.Unpack(bad):
                self.bad = bad
        assert found == {"info": 1, "typed": 1}, found

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.bad.field_violations] if self.bad else []


async def _details(call: Awaitable[Any]) -> Details:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return Details(e.value)


async def test_not_found_and_invalid_field_carry_the_typed_reason_and_bad_request(services: Services) -> None:
    ex = xpb_grpc.ExecServiceStub(services.hub_channel)
    for stub in (services.hub_stub, services.orchestrator_stub):  # the Hub relays every detail
        md = A if stub is services.hub_stub else ()
        nf = await _details(stub.GetContainer(pb.GetContainerRequest(container_id="cnt-000000000000"), metadata=md))
        assert nf.code is grpc.StatusCode.NOT_FOUND
        assert (nf.info.reason, nf.typed.reason) == ("CONTAINER_NOT_FOUND", errors_pb2.ERROR_REASON_CONTAINER_NOT_FOUND)
        assert dict(nf.info.metadata) == {"container_id": "cnt-000000000000"} and nf.bad is None

        big = await _details(stub.CreateContainer(pb.CreateContainerRequest(
            resources=pb.Resources(memory_mib=10**7)), metadata=md))
        assert big.code is grpc.StatusCode.INVALID_ARGUMENT
        assert (big.info.reason, big.typed.reason) == ("INVALID_FIELD", errors_pb2.ERROR_REASON_INVALID_FIELD)
        assert big.info.metadata["field"] == "resources.memory_mib" and big.fields == ["resources.memory_mib"]

        port = await _details(stub.CreateContainer(pb.CreateContainerRequest(
            ports=[pb.Port(port=80), pb.Port(port=0)]), metadata=md))
        assert port.typed.reason == errors_pb2.ERROR_REASON_INVALID_FIELD and port.fields == ["ports[1].port"]
        label = await _details(stub.CreateContainer(pb.CreateContainerRequest(
            labels={"ok": "1", "bad key": "x"}), metadata=md))
        assert label.fields == ["labels[bad key]"]

        malformed = await _details(stub.DeleteContainer(pb.DeleteContainerRequest(container_id="nope"), metadata=md))
        assert malformed.fields == ["container_id"] == [malformed.info.metadata["field"]]

    # Exec's container id is under `start`: the field path says so.
    async def exec_requests() -> Any:
        yield xpb.ExecRequest(start=xpb.ExecStart(container_id="nope", command=xpb.Command(argv=["true"])))

    inside = await _details(ex.Exec(exec_requests(), metadata=A).read())
    assert inside.fields == ["start.container_id"] and inside.typed.reason == errors_pb2.ERROR_REASON_INVALID_FIELD

    env = await _details(services.hub_stub.CreateContainer(pb.CreateContainerRequest(env={"1X": "y"}), metadata=A))
    assert env.fields == ["env[1X]"]


async def test_the_python_client_exposes_the_typed_reason_and_the_field(services: Services) -> None:
    async with AsyncClient(f"127.0.0.1:{services.hub.port}", api_key="key-a") as hub:
        with pytest.raises(InvalidArgument) as e:
            await hub.create_container(memory_mib=10**7)
    assert e.value.reason == errors_pb2.ERROR_REASON_INVALID_FIELD and e.value.field == "resources.memory_mib"
    assert str(e.value).endswith("[INVALID_ARGUMENT INVALID_FIELD]")
