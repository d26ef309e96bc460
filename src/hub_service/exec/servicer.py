"""ExecService on the Hub: authenticate, find the caller's container and its
backend's exec driver, then hand over to files / run / processes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

from hub_service.auth import ApiKeyAuth
from hub_service.exec import files, processes
from hub_service.exec.commands import command_spec, pty_size, signal_number, timeout_s
from hub_service.exec.containers import ContainerLookup
from hub_service.exec.drivers import Drivers
from hub_service.budgets import HubBudgets
from hub_service.exec.run import ExecSession, OutputAllowance, run_once
from orchestrator_service.backends.exec_base import ExecDriver
from sandhub import pagination, rpc
from sandhub.config import ExecLimits
from sandhub.errors import InvalidField, InvalidStream
from sandhub.exec.v1 import exec_pb2 as pb
from sandhub.exec.v1 import exec_pb2_grpc as pb_grpc


async def _first(requests: AsyncIterator[pb.ExecRequest] | AsyncIterator[pb.PutFilesRequest], name: str):  # type: ignore[no-untyped-def]
    try:
        first = await requests.__anext__()
    except StopAsyncIteration:
        raise InvalidStream(f"the stream ended before its {name} message") from None
    if first.WhichOneof("msg") != "start":
        raise InvalidStream(f"the first message must be start, not {first.WhichOneof('msg') or 'empty'}")
    return first.start


class ExecServicer(pb_grpc.ExecServiceServicer):
    """Every handler authenticates before it looks at the request: a caller
    without a valid key gets UNAUTHENTICATED, whatever else is wrong."""

    def __init__(self, auth: ApiKeyAuth, lookup: ContainerLookup, drivers: Drivers, limits: ExecLimits,
                 budgets: HubBudgets) -> None:
        self._auth = auth
        self._lookup = lookup
        self._drivers = drivers
        self._limits = limits
        self._budgets = budgets
        self._slots = budgets.exec_calls
        self._calls = budgets.calls

    async def _driver(self, container_id: str, tenant: str, *, field: str = "container_id") -> ExecDriver:
        backend = await self._lookup.backend_of(container_id, tenant=tenant, field=field)
        return await self._drivers.get(backend)

    async def PutFiles(self, request_iterator: AsyncIterator[pb.PutFilesRequest], context: rpc.Ctx) -> pb.PutFilesResponse:
        tenant = self._auth.tenant(context)
        with self._slots.hold(tenant):
            start = await _first(request_iterator, "start")
            driver = await self._driver(start.container_id, tenant, field="start.container_id")
            return await files.put_files(driver, start.container_id, start, request_iterator, self._limits)

    async def GetFiles(self, request: pb.GetFilesRequest, context: rpc.Ctx) -> AsyncIterator[pb.GetFilesResponse]:
        tenant = self._auth.tenant(context)
        with self._slots.hold(tenant):
            driver = await self._driver(request.container_id, tenant)
            async for response in files.get_files(driver, request.container_id, request, self._limits):
                yield response

    async def Run(self, request: pb.RunRequest, context: rpc.Ctx) -> pb.RunResponse:
        tenant = self._auth.tenant(context)  # first: an unknown caller learns nothing, not even a bad field
        limits = self._limits
        command = command_spec(request.command, limits)
        timeout = timeout_s(request.timeout, default=limits.default_run_timeout_s,
                            maximum=limits.max_run_timeout_s, field="timeout")
        if request.max_output_bytes < 0 or request.max_output_bytes > limits.max_output_bytes:
            raise InvalidField("max_output_bytes", f"0..{limits.max_output_bytes}")
        # The slot and the output stay taken until the reply has really gone
        # (or the call was cancelled), not until this returns: a client that
        # does not read would otherwise pile up replies the budget no longer counts.
        self._slots.take(tenant)
        held: list[OutputAllowance] = []

        def release() -> None:
            if held:
                held.pop().close()
            self._slots.give_back(tenant, 1)

        try:
            driver = await self._driver(request.container_id, tenant)
            # Refused before the command runs when the tenant's output budget is used up.
            held.append(OutputAllowance(self._budgets.output, tenant, first=limits.chunk_bytes))
            proc = await driver.spawn(container_id=request.container_id, command=command)
            response = await run_once(proc, stdin=request.stdin, timeout_s=timeout,
                                      max_output=request.max_output_bytes or limits.default_output_bytes,
                                      allowance=held[0])
        except BaseException:
            release()
            raise
        context.add_done_callback(cast(Any, lambda _: release()))  # the stubs want a nominal _DoneCallback
        return response

    async def Exec(self, request_iterator: AsyncIterator[pb.ExecRequest], context: rpc.Ctx) -> AsyncIterator[pb.ExecResponse]:
        tenant = self._auth.tenant(context)
        with self._slots.hold(tenant):
            async for response in self._exec(request_iterator, tenant):
                yield response

    async def _exec(self, request_iterator: AsyncIterator[pb.ExecRequest], tenant: str) -> AsyncIterator[pb.ExecResponse]:
        start = await _first(request_iterator, "start")
        command = command_spec(start.command, self._limits, field="start.command")
        pty = pty_size(start.pty, field="start.pty") if start.HasField("pty") else None
        timeout = timeout_s(start.timeout, default=self._limits.max_exec_timeout_s,
                            maximum=self._limits.max_exec_timeout_s, field="start.timeout")
        driver = await self._driver(start.container_id, tenant, field="start.container_id")
        try:
            proc = await driver.spawn(container_id=start.container_id, command=command, pty=pty)
        except InvalidField as e:
            # Drivers name the field as Run and StartProcess hold it ("command.argv");
            # an Exec stream holds it under `start`.
            if e.field.split(".")[0] in pb.ExecStart.DESCRIPTOR.fields_by_name:
                raise InvalidField(f"start.{e.field}", e.description) from None
            raise
        session = ExecSession(proc, self._limits, timeout_s=timeout)
        async for response in session.run(request_iterator):
            yield response

    async def StartProcess(self, request: pb.StartProcessRequest, context: rpc.Ctx) -> pb.StartProcessResponse:
        tenant = self._auth.tenant(context)
        pid = processes.check_process_id(request.process_id)
        command = command_spec(request.command, self._limits)
        async with self._calls.call(tenant):
            driver = await self._driver(request.container_id, tenant)
            info, created = await driver.start_background(container_id=request.container_id, process_id=pid,
                                                          command=command)
        return pb.StartProcessResponse(process=processes.process_proto(request.container_id, info), created=created)

    async def GetProcess(self, request: pb.GetProcessRequest, context: rpc.Ctx) -> pb.GetProcessResponse:
        tenant = self._auth.tenant(context)
        pid = processes.check_process_id(request.process_id)
        async with self._calls.call(tenant):
            driver = await self._driver(request.container_id, tenant)
            info = await driver.get_background(container_id=request.container_id, process_id=pid)
        return pb.GetProcessResponse(process=processes.process_proto(request.container_id, info))

    async def ListProcesses(self, request: pb.ListProcessesRequest, context: rpc.Ctx) -> pb.ListProcessesResponse:
        tenant = self._auth.tenant(context)
        size = pagination.page_size(request.page_size)
        async with self._calls.call(tenant):
            driver = await self._driver(request.container_id, tenant)
            found = [processes.process_proto(request.container_id, p)
                     for p in await driver.list_background(container_id=request.container_id)]
        if request.state:
            found = [p for p in found if p.state == request.state]
        page, token = pagination.paginate(
            found, key=lambda p: (f"{p.start_time.ToNanoseconds():020d}", p.process_id), size=size,
            token=request.page_token, query=f"{request.container_id}|{request.state}",
        )
        return pb.ListProcessesResponse(processes=page, next_page_token=token)

    async def SignalProcess(self, request: pb.SignalProcessRequest, context: rpc.Ctx) -> pb.SignalProcessResponse:
        tenant = self._auth.tenant(context)
        pid = processes.check_process_id(request.process_id)
        signum = signal_number(request.signal)
        async with self._calls.call(tenant):
            driver = await self._driver(request.container_id, tenant)
            info = await driver.signal_background(container_id=request.container_id, process_id=pid, signum=signum)
        return pb.SignalProcessResponse(process=processes.process_proto(request.container_id, info))

    async def AttachProcess(self, request: pb.AttachProcessRequest, context: rpc.Ctx) -> AsyncIterator[pb.AttachProcessResponse]:
        tenant = self._auth.tenant(context)
        with self._slots.hold(tenant):
            driver = await self._driver(request.container_id, tenant)
            async for response in processes.attach(driver, request.container_id, request, self._limits):
                yield response
