"""The blocking client: both of the Hub's services behind one object."""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar, cast

import grpc

from sandhub.client import requests as build
from sandhub.client.connection import MAX_RECEIVE_BYTES, Tls, bearer, channel_options, sync_channel
from sandhub.client.errors import from_rpc_error
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

T = TypeVar("T")


class Client:
    """A Hub (or, with the operator's ``metadata``, an Orchestrator).

    ``tls`` None is plaintext, meant for a Hub on loopback; otherwise the API
    key goes as per-call credentials over TLS. ``timeout_s`` is the deadline
    of each unary call and upload/download; streams that follow something
    (watch, exec, attach) have none unless given. Errors are
    :class:`sandhub.client.errors.ApiError` subclasses."""

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
        self.channel = sync_channel(target, api_key=api_key, tls=tls,
                                    options=channel_options(tls, max_receive_bytes, tuple(options)))
        self.metadata = (*(bearer(api_key) if tls is None else ()), *metadata)
        self.timeout_s = timeout_s
        self.containers = pb_grpc.OrchestratorServiceStub(self.channel)
        self.exec_service = xpb_grpc.ExecServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------

    def _call(self, response: type[T], method: Any, request: Any, *, timeout_s: float | None = None) -> T:
        """``method``'s answer (of type ``response``, which the untyped stubs can't say)."""
        try:
            return cast(T, method(request, metadata=self.metadata, timeout=timeout_s or self.timeout_s))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def _stream(self, call: Any) -> Iterator[Any]:
        """The call's responses; errors as ApiError; cancelled if the caller stops early."""
        try:
            yield from call
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            call.cancel()

    # -- containers ------------------------------------------------------------------

    def create_container(self, **kwargs: Any) -> pb.Container:
        """Keyword arguments of :func:`sandhub.client.requests.create_container`."""
        return self._call(pb.CreateContainerResponse, self.containers.CreateContainer, build.create_container(**kwargs)).container

    def get_container(self, container_id: str) -> pb.Container:
        return self._call(pb.GetContainerResponse, self.containers.GetContainer, pb.GetContainerRequest(container_id=container_id)).container

    def list_containers(
        self, *, label_selector: str = "", state: str | int = "", page_size: int = 0, page_token: str = ""
    ) -> pb.ListContainersResponse:
        """One page; :meth:`iter_containers` walks them all."""
        req = pb.ListContainersRequest(label_selector=label_selector, state=build.container_state(state),
                                       page_size=page_size, page_token=page_token)
        return self._call(pb.ListContainersResponse, self.containers.ListContainers, req)

    def iter_containers(self, *, label_selector: str = "", state: str | int = "", page_size: int = 0) -> Iterator[pb.Container]:
        token = ""
        while True:
            page = self.list_containers(label_selector=label_selector, state=state, page_size=page_size,
                                        page_token=token)
            yield from page.containers
            if not (token := page.next_page_token):
                return

    def delete_container(self, container_id: str, *, grace_period_s: float = 0.0) -> pb.Container:
        req = pb.DeleteContainerRequest(container_id=container_id, grace_period=build.duration(grace_period_s))
        return self._call(pb.DeleteContainerResponse, self.containers.DeleteContainer, req).container

    def extend_container(self, container_id: str, *, by_s: float) -> pb.Container:
        req = pb.ExtendContainerRequest(container_id=container_id, extend_by=build.duration(by_s))
        return self._call(pb.ExtendContainerResponse, self.containers.ExtendContainer, req).container

    def watch_containers(
        self, *, label_selector: str = "", send_initial: bool = False, timeout_s: float | None = None
    ) -> Iterator[pb.WatchContainersResponse]:
        req = pb.WatchContainersRequest(label_selector=label_selector, send_initial=send_initial)
        return self._stream(self.containers.WatchContainers(req, metadata=self.metadata, timeout=timeout_s))

    # -- files -------------------------------------------------------------------------

    def put_files(
        self, container_id: str, files: Mapping[str, bytes], *, destination: str = "", mode: int = 0
    ) -> xpb.PutFilesResponse:
        """In-memory files, path -> content."""
        return self._call(xpb.PutFilesResponse, self.exec_service.PutFiles, build.put_bytes(container_id, destination, files, mode=mode))

    def put_paths(
        self, container_id: str, paths: Iterable[str | Path], *, destination: str = ""
    ) -> xpb.PutFilesResponse:
        """Local files and directories (walked), with their permission bits."""
        files = build.local_files(paths)
        return self._call(xpb.PutFilesResponse, self.exec_service.PutFiles, build.put_local(container_id, destination, files))

    def put_tar(self, container_id: str, chunks: Iterable[bytes], *, destination: str = "") -> xpb.PutFilesResponse:
        return self._call(xpb.PutFilesResponse, self.exec_service.PutFiles, build.put_tar(container_id, destination, chunks))

    def download(
        self, container_id: str, path: str, out: IO[bytes], *, archive_format: xpb.ArchiveFormat = xpb.ARCHIVE_FORMAT_UNSPECIFIED
    ) -> xpb.FileInfo:
        """Writes a file's bytes (a directory's as tar) to ``out``; returns what it was."""
        req = xpb.GetFilesRequest(container_id=container_id, path=path, format=archive_format)
        info = xpb.FileInfo()
        for r in self._stream(self.exec_service.GetFiles(req, metadata=self.metadata, timeout=self.timeout_s)):
            if r.HasField("info"):
                info = r.info
            else:
                out.write(r.data)
        return info

    def get_file(
        self, container_id: str, path: str, *, archive_format: xpb.ArchiveFormat = xpb.ARCHIVE_FORMAT_UNSPECIFIED
    ) -> tuple[xpb.FileInfo, bytes]:
        import io

        buf = io.BytesIO()
        info = self.download(container_id, path, buf, archive_format=archive_format)
        return info, buf.getvalue()

    # -- commands ------------------------------------------------------------------------

    def run(
        self, container_id: str, argv: Sequence[str] | str, *, stdin: bytes = b"", env: Mapping[str, str] | None = None,
        cwd: str = "", timeout_s: float = 0.0, max_output_bytes: int = 0,
    ) -> xpb.RunResponse:
        """Runs to completion; ``argv`` a string runs with /bin/sh -c."""
        req = build.run(container_id, build.command(argv, env=env, cwd=cwd), stdin=stdin, timeout_s=timeout_s,
                        max_output_bytes=max_output_bytes)
        # The command's own timeout ends it; the call's deadline leaves room for that answer.
        return self._call(xpb.RunResponse, self.exec_service.Run, req, timeout_s=max(self.timeout_s, timeout_s + 10))

    def exec(
        self, container_id: str, argv: Sequence[str] | str, *, env: Mapping[str, str] | None = None, cwd: str = "",
        pty: tuple[int, int] | None = None, timeout_s: float = 0.0,
    ) -> ExecSession:
        """An interactive command: iterate the session for its output; write,
        close stdin, resize (``pty`` is (rows, cols)) and signal meanwhile."""
        start = build.exec_start(container_id, build.command(argv, env=env, cwd=cwd), pty=pty, timeout_s=timeout_s)
        return ExecSession(self.exec_service, start, self.metadata)

    # -- background processes ---------------------------------------------------------

    def start_process(
        self, container_id: str, process_id: str, argv: Sequence[str] | str, *,
        env: Mapping[str, str] | None = None, cwd: str = "",
    ) -> xpb.StartProcessResponse:
        req = xpb.StartProcessRequest(container_id=container_id, process_id=process_id,
                                      command=build.command(argv, env=env, cwd=cwd))
        return self._call(xpb.StartProcessResponse, self.exec_service.StartProcess, req)

    def get_process(self, container_id: str, process_id: str) -> xpb.Process:
        req = xpb.GetProcessRequest(container_id=container_id, process_id=process_id)
        return self._call(xpb.GetProcessResponse, self.exec_service.GetProcess, req).process

    def list_processes(
        self, container_id: str, *, state: xpb.ProcessState = xpb.PROCESS_STATE_UNSPECIFIED, page_size: int = 0, page_token: str = ""
    ) -> xpb.ListProcessesResponse:
        req = xpb.ListProcessesRequest(container_id=container_id, state=state, page_size=page_size,
                                       page_token=page_token)
        return self._call(xpb.ListProcessesResponse, self.exec_service.ListProcesses, req)

    def iter_processes(
        self, container_id: str, *, state: xpb.ProcessState = xpb.PROCESS_STATE_UNSPECIFIED, page_size: int = 0
    ) -> Iterator[xpb.Process]:
        token = ""
        while True:
            page = self.list_processes(container_id, state=state, page_size=page_size, page_token=token)
            yield from page.processes
            if not (token := page.next_page_token):
                return

    def signal_process(self, container_id: str, process_id: str, sig: int | str = "TERM") -> xpb.Process:
        req = xpb.SignalProcessRequest(container_id=container_id, process_id=process_id, signal=build.signal(sig))
        return self._call(xpb.SignalProcessResponse, self.exec_service.SignalProcess, req).process

    def attach_process(
        self, container_id: str, process_id: str, *, stdout_offset: int = 0, stderr_offset: int = 0,
        follow: bool = False, timeout_s: float | None = None,
    ) -> Iterator[xpb.AttachProcessResponse]:
        req = xpb.AttachProcessRequest(container_id=container_id, process_id=process_id, follow=follow,
                                       stdout_offset=stdout_offset, stderr_offset=stderr_offset)
        return self._stream(self.exec_service.AttachProcess(req, metadata=self.metadata, timeout=timeout_s))


class ExecSession:
    """One Exec call. Iterating yields its ExecResponse messages (started,
    stdout, stderr, keepalive, exit_status); ``pid`` and ``exit_status`` are set as
    they arrive. Writes may come from any thread."""

    def __init__(self, stub: xpb_grpc.ExecServiceStub, start: xpb.ExecRequest,
                 metadata: Sequence[tuple[str, str]]) -> None:
        self._outgoing: queue.Queue[xpb.ExecRequest | None] = queue.Queue()
        self._outgoing.put(start)
        self._call = stub.Exec(self._requests(), metadata=metadata)
        self.pid = 0
        self.exit_status: xpb.ExitStatus | None = None

    def _requests(self) -> Iterator[xpb.ExecRequest]:
        while (r := self._outgoing.get()) is not None:
            yield r

    def write(self, data: bytes) -> None:
        self._outgoing.put(xpb.ExecRequest(stdin=data))

    def close_stdin(self) -> None:
        self._outgoing.put(xpb.ExecRequest(close_stdin=xpb.CloseStdin()))

    def resize(self, rows: int, cols: int) -> None:
        self._outgoing.put(xpb.ExecRequest(resize=xpb.PtySize(rows=rows, cols=cols)))

    def signal(self, sig: int | str) -> None:
        self._outgoing.put(xpb.ExecRequest(signal=build.signal(sig)))

    def __iter__(self) -> Iterator[xpb.ExecResponse]:
        try:
            for r in self._call:
                kind = r.WhichOneof("msg")
                if kind == "started":
                    self.pid = r.started.pid
                elif kind == "exit_status":
                    self.exit_status = r.exit_status
                    self._outgoing.put(None)  # half-close: the call ends now, not 2 s later
                yield r
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            self._outgoing.put(None)

    def wait(self) -> tuple[bytes, bytes, xpb.ExitStatus]:
        """Reads to the end: (stdout, stderr, exit status)."""
        out, err = bytearray(), bytearray()
        for r in self:
            out += r.stdout
            err += r.stderr
        assert self.exit_status is not None, "Exec ended without an exit status"
        return bytes(out), bytes(err), self.exit_status

    def close(self) -> None:
        """Ends the call (the command is killed if still running)."""
        self._outgoing.put(None)
        self._call.cancel()

    def __enter__(self) -> ExecSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
