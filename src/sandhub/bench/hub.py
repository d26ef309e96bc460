"""The Hub as a bench target: every step is a gRPC call, as a caller makes it."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc

from sandhub import rpc
from sandhub.bench.target import Created, CreateParams, FileToPut, RunResult, TargetError, not_running
from sandhub.exec.v1 import exec_pb2, exec_pb2_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

CHUNK = 1 << 20
"""PutFiles data messages carry at most 1 MiB (the contract's limit)."""
_ID = re.compile(r"cnt-[a-z0-9]{12}")


def rpc_reason(e: grpc.aio.AioRpcError) -> str:
    """``CODE REASON: message`` with container ids blanked, so the same cause
    in many containers is counted as one reason."""
    reason = rpc.error_reason(e)
    details = _ID.sub("cnt-...", e.details() or "")
    return f"{e.code().name}{' ' + reason if reason else ''}: {details}"


class HubTarget:
    name = "hub"
    cgroup_parent = "sandhub"
    """Right when the Hub's orchestrator runs the local backend on this host;
    otherwise the memory sample finds no cgroups and says so."""

    def __init__(self, address: str, *, api_key: str, timeout_s: float, detail: str = "") -> None:
        self._address = address
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout_s = timeout_s
        self._detail = detail or f"Hub at {address}"
        self._channel: grpc.aio.Channel | None = None
        self._containers: Any = None
        self._exec: Any = None

    @property
    def detail(self) -> str:
        return self._detail

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self._address)
        self._containers = pb_grpc.OrchestratorServiceStub(self._channel)
        self._exec = exec_pb2_grpc.ExecServiceStub(self._channel)
        try:
            await self._containers.ListContainers(
                pb.ListContainersRequest(page_size=1), metadata=self._metadata, timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as e:
            await self.close()
            hint = " (is sandhub serving there? or pass --start-local)" if e.code() is grpc.StatusCode.UNAVAILABLE else ""
            raise TargetError(f"cannot reach the Hub at {self._address}: {rpc_reason(e)}{hint}") from None

    async def close(self) -> list[str]:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        return []

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as e:
            raise TargetError(rpc_reason(e)) from None

    async def create(self, params: CreateParams) -> Created:
        req = pb.CreateContainerRequest(
            image=params.image,
            resources=pb.Resources(cpu_millicores=params.cpu_millicores, memory_mib=params.memory_mib),
            labels=dict(params.labels),
            wait_until_running=True,
        )
        c = (await self._call(self._containers.CreateContainer, req)).container
        if c.state != pb.CONTAINER_STATE_RUNNING:
            state = pb.ContainerState.Name(c.state).removeprefix("CONTAINER_STATE_")
            raise TargetError(not_running(state, c.state_reason, c.state_message), container_id=c.container_id)
        cct = None
        if c.HasField("ready_time") and c.HasField("create_time"):
            cct = (c.ready_time.ToNanoseconds() - c.create_time.ToNanoseconds()) / 1e6
        return Created(container_id=c.container_id, cct_ms=cct, ip_address=c.network.ip_address)

    async def put_files(self, container_id: str, files: Sequence[FileToPut]) -> None:
        async def messages() -> AsyncIterator[exec_pb2.PutFilesRequest]:
            yield exec_pb2.PutFilesRequest(
                start=exec_pb2.PutFilesStart(container_id=container_id, format=exec_pb2.ARCHIVE_FORMAT_RAW)
            )
            for f in files:
                yield exec_pb2.PutFilesRequest(file=exec_pb2.FileHeader(path=f.path, mode=f.mode, size=len(f.data)))
                for i in range(0, len(f.data), CHUNK):
                    yield exec_pb2.PutFilesRequest(data=f.data[i : i + CHUNK])

        try:
            await self._exec.PutFiles(messages(), metadata=self._metadata, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as e:
            raise TargetError(rpc_reason(e)) from None

    async def run(self, container_id: str, argv: Sequence[str]) -> RunResult:
        req = exec_pb2.RunRequest(container_id=container_id, command=exec_pb2.Command(argv=list(argv)))
        resp = await self._call(self._exec.Run, req)
        return RunResult(exit_code=resp.exit_status.exit_code, stdout=resp.stdout, stderr=resp.stderr)

    async def start_process(self, container_id: str, process_id: str, argv: Sequence[str]) -> None:
        req = exec_pb2.StartProcessRequest(
            container_id=container_id, process_id=process_id, command=exec_pb2.Command(argv=list(argv))
        )
        await self._call(self._exec.StartProcess, req)

    async def delete(self, container_id: str) -> None:
        try:
            await self._containers.DeleteContainer(
                pb.DeleteContainerRequest(container_id=container_id), metadata=self._metadata, timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as e:
            if e.code() is not grpc.StatusCode.NOT_FOUND:
                raise TargetError(rpc_reason(e)) from None

    async def alive(self, labels: Mapping[str, str]) -> list[str]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        req = pb.ListContainersRequest(label_selector=selector, page_size=1000)
        found: list[str] = []
        while True:
            resp = await self._call(self._containers.ListContainers, req)
            found.extend(c.container_id for c in resp.containers if c.state != pb.CONTAINER_STATE_TERMINATED)
            if not resp.next_page_token:
                return found
            req.page_token = resp.next_page_token
