"""The asyncio client (grpc.aio): the same calls as :class:`sandhub.client.Client`."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import grpc

from sandhub.client import requests as build
from sandhub.client.connection import MAX_RECEIVE_BYTES, Tls, aio_channel, bearer, channel_options
from sandhub.client.errors import from_rpc_error
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

T = TypeVar("T")


class AsyncClient:
    """See :class:`sandhub.client.Client`; every call is a coroutine, every
    stream an async iterator. Use ``async with`` or ``await close()``."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str = "",
        tls: Tls | None = None,
        timeout_s: float = 60.0,
        metadata: Sequence[tuple[str, str]] = (),
        max_receive_bytes: int = MAX_RECEIVE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.channel = aio_channel(target, api_key=api_key, tls=tls,
                                   options=channel_options(tls, max_receive_bytes, tuple(options)))
        self.metadata = (*(bearer(api_key) if tls is None else ()), *metadata)
        self.timeout_s = timeout_s
        self.containers = pb_grpc.OrchestratorServiceStub(self.channel)
        self.exec_service = xpb_grpc.ExecServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing -------------------------------------------------------------------

    async def _call(self, response: type[T], method: Any, request: Any, *, timeout_s: float | None = None) -> T:
        try:
            return cast(T, await method(request, metadata=self.metadata, timeout=timeout_s or self.timeout_s))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    async def _stream(self, call: Any) -> AsyncIterator[Any]:
        try:
            async for item in call:
                yield item
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            call.cancel()

    # -- containers ------------------------------------------------------------------

    async def create_container(self, **kwargs: Any) -> pb.Container:
        """Keyword arguments of :func:`sandhub.client.requests.create_container`."""
        req = build.create_container(**kwargs)
        return (await self._call(pb.CreateContainerResponse, self.containers.CreateContainer, req)).container

    async def get_container(self, container_id: str) -> pb.Container:
        req = pb.GetContainerRequest(container_id=container_id)
        return (await self._call(pb.GetContainerResponse, self.containers.GetContainer, req)).container

    async def list_containers(
        self, *, label_selector: str = "", state: str | int = "", page_size: int = 0, page_token: str = ""
    ) -> pb.ListContainersResponse:
        req = pb.ListContainersRequest(label_selector=label_selector, state=build.container_state(state),
                                       page_size=page_size, page_token=page_token)
        return await self._call(pb.ListContainersResponse, self.containers.ListContainers, req)

    async def iter_containers(
        self, *, label_selector: str = "", state: str | int = "", page_size: int = 0
    ) -> AsyncIterator[pb.Container]:
        token = ""
        while True:
            page = await self.list_containers(label_selector=label_selector, state=state, page_size=page_size,
                                              page_token=token)
            for c in page.containers:
                yield c
            if not (token := page.next_page_token):
                return

    async def delete_container(self, container_id: str, *, grace_period_s: float = 0.0) -> pb.Container:
        req = pb.DeleteContainerRequest(container_id=container_id, grace_period=build.duration(grace_period_s))
        return (await self._call(pb.DeleteContainerResponse, self.containers.DeleteContainer, req)).container

    async def extend_container(self, container_id: str, *, by_s: float) -> pb.Container:
        req = pb.ExtendContainerRequest(container_id=container_id, extend_by=build.duration(by_s))
        return (await self._call(pb.ExtendContainerResponse, self.containers.ExtendContainer, req)).container

    def watch_containers(
        self, *, label_selector: str = "", send_initial: bool = False, timeout_s: float | None = None
    ) -> AsyncIterator[pb.WatchContainersResponse]:
        req = pb.WatchContainersRequest(label_selector=label_selector, send_initial=send_initial)
        return self._stream(self.containers.WatchContainers(req, metadata=self.metadata, timeout=timeout_s))

    # -- files -------------------------------------------------------------------------

    async def put_files(
        self, container_id: str, files: Mapping[str, bytes], *, destination: str = "", mode: int = 0
    ) -> xpb.PutFilesResponse:
        reqs = build.put_bytes(container_id, destination, files, mode=mode)
        return await self._call(xpb.PutFilesResponse, self.exec_service.PutFiles, reqs)

    async def put_paths(
        self, container_id: str, paths: Iterable[str | Path], *, destination: str = ""
    ) -> xpb.PutFilesResponse:
        reqs = build.put_local(container_id, destination, build.local_files(paths))
        return await self._call(xpb.PutFilesResponse, self.exec_service.PutFiles, reqs)

    async def put_tar(
        self, container_id: str, chunks: Iterable[bytes], *, destination: str = ""
    ) -> xpb.PutFilesResponse:
        reqs = build.put_tar(container_id, destination, chunks)
        return await self._call(xpb.PutFilesResponse, self.exec_service.PutFiles, reqs)

    async def download(
        self, container_id: str, path: str, out: IO[bytes], *,
        archive_format: xpb.ArchiveFormat = xpb.ARCHIVE_FORMAT_UNSPECIFIED,
    ) -> xpb.FileInfo:
        req = xpb.GetFilesRequest(container_id=container_id, path=path, format=archive_format)
        info = xpb.FileInfo()
        async for r in self._stream(self.exec_service.GetFiles(req, metadata=self.metadata, timeout=self.timeout_s)):
            if r.HasField("info"):
                info = r.info
            else:
                out.write(r.data)
        return info

    async def get_file(
        self, container_id: str, path: str, *, archive_format: xpb.ArchiveFormat = xpb.ARCHIVE_FORMAT_UNSPECIFIED
    ) -> tuple[xpb.FileInfo, bytes]:
        buf = io.BytesIO()
        info = await self.download(container_id, path, buf, archive_format=archive_format)
        return info, buf.getvalue()

    # -- commands ------------------------------------------------------------------------

    async def run(
        self, container_id: str, argv: Sequence[str] | str, *, stdin: bytes = b"", env: Mapping[str, str] | None = None,
        cwd: str = "", timeout_s: float = 0.0, max_output_bytes: int = 0,
    ) -> xpb.RunResponse:
        req = build.run(container_id, build.command(argv, env=env, cwd=cwd), stdin=stdin, timeout_s=timeout_s,
                        max_output_bytes=max_output_bytes)
        return await self._call(xpb.RunResponse, self.exec_service.Run, req,
                                timeout_s=max(self.timeout_s, timeout_s + 10))

    async def exec(
        self, container_id: str, argv: Sequence[str] | str, *, env: Mapping[str, str] | None = None, cwd: str = "",
        pty: tuple[int, int] | None = None, timeout_s: float = 0.0,
    ) -> AsyncExecSession:
        start = build.exec_start(container_id, build.command(argv, env=env, cwd=cwd), pty=pty, timeout_s=timeout_s)
        session = AsyncExecSession(self.exec_service.Exec(metadata=self.metadata))
        await session.send(start)
        return session

    # -- background processes ---------------------------------------------------------

    async def start_process(
        self, container_id: str, process_id: str, argv: Sequence[str] | str, *,
        env: Mapping[str, str] | None = None, cwd: str = "",
    ) -> xpb.StartProcessResponse:
        req = xpb.StartProcessRequest(container_id=container_id, process_id=process_id,
                                      command=build.command(argv, env=env, cwd=cwd))
        return await self._call(xpb.StartProcessResponse, self.exec_service.StartProcess, req)

    async def get_process(self, container_id: str, process_id: str) -> xpb.Process:
        req = xpb.GetProcessRequest(container_id=container_id, process_id=process_id)
        return (await self._call(xpb.GetProcessResponse, self.exec_service.GetProcess, req)).process

    async def list_processes(
        self, container_id: str, *, state: xpb.ProcessState = xpb.PROCESS_STATE_UNSPECIFIED, page_size: int = 0,
        page_token: str = "",
    ) -> xpb.ListProcessesResponse:
        req = xpb.ListProcessesRequest(container_id=container_id, state=state, page_size=page_size,
                                       page_token=page_token)
        return await self._call(xpb.ListProcessesResponse, self.exec_service.ListProcesses, req)

    async def iter_processes(
        self, container_id: str, *, state: xpb.ProcessState = xpb.PROCESS_STATE_UNSPECIFIED, page_size: int = 0
    ) -> AsyncIterator[xpb.Process]:
        token = ""
        while True:
            page = await self.list_processes(container_id, state=state, page_size=page_size, page_token=token)
            for p in page.processes:
                yield p
            if not (token := page.next_page_token):
                return

    async def signal_process(self, container_id: str, process_id: str, sig: int | str = "TERM") -> xpb.Process:
        req = xpb.SignalProcessRequest(container_id=container_id, process_id=process_id, signal=build.signal(sig))
        return (await self._call(xpb.SignalProcessResponse, self.exec_service.SignalProcess, req)).process

    def attach_process(
        self, container_id: str, process_id: str, *, stdout_offset: int = 0, stderr_offset: int = 0,
        follow: bool = False, timeout_s: float | None = None,
    ) -> AsyncIterator[xpb.AttachProcessResponse]:
        req = xpb.AttachProcessRequest(container_id=container_id, process_id=process_id, follow=follow,
                                       stdout_offset=stdout_offset, stderr_offset=stderr_offset)
        return self._stream(self.exec_service.AttachProcess(req, metadata=self.metadata, timeout=timeout_s))


class AsyncExecSession:
    """One Exec call: ``async for`` its ExecResponse messages while writing
    stdin, closing it, resizing and signalling. ``pid`` and ``exit_status``
    are set as they arrive."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.pid = 0
        self.exit_status: xpb.ExitStatus | None = None

    async def send(self, request: xpb.ExecRequest) -> None:
        """Dropped once the command ended (so is it by the server)."""
        if self.exit_status is not None:
            return
        try:
            await self._call.write(request)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    async def write(self, data: bytes) -> None:
        await self.send(xpb.ExecRequest(stdin=data))

    async def close_stdin(self) -> None:
        await self.send(xpb.ExecRequest(close_stdin=xpb.CloseStdin()))

    async def resize(self, rows: int, cols: int) -> None:
        await self.send(xpb.ExecRequest(resize=xpb.PtySize(rows=rows, cols=cols)))

    async def signal(self, sig: int | str) -> None:
        await self.send(xpb.ExecRequest(signal=build.signal(sig)))

    async def __aiter__(self) -> AsyncIterator[xpb.ExecResponse]:
        try:
            async for r in self._call:
                kind = r.WhichOneof("msg")
                if kind == "started":
                    self.pid = r.started.pid
                elif kind == "exit_status":
                    self.exit_status = r.exit_status
                    with contextlib.suppress(asyncio.InvalidStateError, grpc.RpcError):
                        await self._call.done_writing()  # the call ends now, not 2 s later
                yield r
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    async def wait(self) -> tuple[bytes, bytes, xpb.ExitStatus]:
        """Reads to the end: (stdout, stderr, exit status)."""
        out, err = bytearray(), bytearray()
        async for r in self:
            out += r.stdout
            err += r.stderr
        assert self.exit_status is not None, "Exec ended without an exit status"
        return bytes(out), bytes(err), self.exit_status

    def close(self) -> None:
        """Ends the call (the command is killed if still running)."""
        self._call.cancel()
