"""ExecService on the Hub. The contract is final; the RPCs are built in the exec
issue and answer UNIMPLEMENTED (reason NOT_SUPPORTED) until then, after
authenticating the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from hub_service.auth import ApiKeyAuth
from sandhub import rpc
from sandhub.errors import NotSupported
from sandhub.exec.v1 import exec_pb2_grpc as pb_grpc


class ExecServicer(pb_grpc.ExecServiceServicer):
    def __init__(self, auth: ApiKeyAuth) -> None:
        self._auth = auth

    def _unimplemented(self, name: str, context: rpc.Ctx) -> NoReturn:
        self._auth.tenant(context)
        raise NotSupported(f"ExecService.{name} is not available yet on this server")

    async def PutFiles(self, request_iterator: Any, context: rpc.Ctx) -> Any:
        self._unimplemented("PutFiles", context)

    async def GetFiles(self, request: Any, context: rpc.Ctx) -> AsyncIterator[Any]:
        self._unimplemented("GetFiles", context)
        yield  # pragma: no cover

    async def Run(self, request: Any, context: rpc.Ctx) -> Any:
        self._unimplemented("Run", context)

    async def Exec(self, request_iterator: Any, context: rpc.Ctx) -> AsyncIterator[Any]:
        self._unimplemented("Exec", context)
        yield  # pragma: no cover

    async def StartProcess(self, request: Any, context: rpc.Ctx) -> Any:
        self._unimplemented("StartProcess", context)

    async def GetProcess(self, request: Any, context: rpc.Ctx) -> Any:
        self._unimplemented("GetProcess", context)

    async def ListProcesses(self, request: Any, context: rpc.Ctx) -> Any:
        self._unimplemented("ListProcesses", context)

    async def SignalProcess(self, request: Any, context: rpc.Ctx) -> Any:
        self._unimplemented("SignalProcess", context)

    async def AttachProcess(self, request: Any, context: rpc.Ctx) -> AsyncIterator[Any]:
        self._unimplemented("AttachProcess", context)
        yield  # pragma: no cover
