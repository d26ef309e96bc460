"""Small fakes of the Hub's two services for `sandhub bench` tests: just enough
behaviour to drive the bench's scenarios through real grpc.aio servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from sandhub.exec.v1 import exec_pb2, exec_pb2_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

FAKE_CCT_NS = 7_000_000


class FakeOrchestrator(pb_grpc.OrchestratorServiceServicer):
    """Containers are records only. The ``hang_on``-th create (1-based)
    records its container, then never answers: a create whose answer is lost."""

    def __init__(self, *, ip_address: str = "127.0.0.1", hang_on: int = 0) -> None:
        self.containers: dict[str, pb.Container] = {}
        self._ip = ip_address
        self._hang_on = hang_on
        self.creates = 0
        self.hanging = asyncio.Event()

    async def CreateContainer(self, request: pb.CreateContainerRequest, context: Any) -> pb.CreateContainerResponse:
        self.creates += 1
        cid = f"cnt-fake{self.creates:08d}"
        now = time.time_ns()
        c = pb.Container(container_id=cid, state=pb.CONTAINER_STATE_RUNNING, labels=dict(request.labels),
                         network=pb.Network(ip_address=self._ip))
        c.create_time.FromNanoseconds(now)
        c.ready_time.FromNanoseconds(now + FAKE_CCT_NS)
        self.containers[cid] = c
        if self.creates == self._hang_on:
            self.hanging.set()
            await asyncio.Event().wait()
        return pb.CreateContainerResponse(container=c)

    async def DeleteContainer(self, request: pb.DeleteContainerRequest, context: Any) -> pb.DeleteContainerResponse:
        c = self.containers.get(request.container_id)
        if c is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such container")
        c.state = pb.CONTAINER_STATE_TERMINATED
        return pb.DeleteContainerResponse(container=c)

    async def ListContainers(self, request: pb.ListContainersRequest, context: Any) -> pb.ListContainersResponse:
        wanted = dict(item.split("=", 1) for item in request.label_selector.split(",") if item)
        found = [
            c for c in self.containers.values()
            if c.state != pb.CONTAINER_STATE_TERMINATED and all(c.labels.get(k) == v for k, v in wanted.items())
        ]
        return pb.ListContainersResponse(containers=found)

    def alive(self) -> list[str]:
        return [cid for cid, c in self.containers.items() if c.state != pb.CONTAINER_STATE_TERMINATED]


@dataclass
class FakeExec(exec_pb2_grpc.ExecServiceServicer):
    """Run answers `ls /` with exit 0; StartProcess starts a real HTTP server
    on 127.0.0.1:``http_port`` (once) that answers 200."""

    http_port: int = 0
    runs: list[tuple[str, list[str]]] = field(default_factory=list)
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)
    processes: list[tuple[str, str, list[str]]] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def Run(self, request: exec_pb2.RunRequest, context: Any) -> exec_pb2.RunResponse:
        argv = list(request.command.argv)
        self.runs.append((request.container_id, argv))
        if argv == ["ls", "/"]:
            return exec_pb2.RunResponse(exit_status=exec_pb2.ExitStatus(exit_code=0), stdout=b"bin\netc\nusr\nwork\n")
        return exec_pb2.RunResponse(exit_status=exec_pb2.ExitStatus(exit_code=127), stderr=b"not found")

    async def PutFiles(self, request_iterator: AsyncIterator[exec_pb2.PutFilesRequest], context: Any) -> exec_pb2.PutFilesResponse:
        cid, path, total = "", "", 0
        async for msg in request_iterator:
            kind = msg.WhichOneof("msg")
            if kind == "start":
                cid = msg.start.container_id
                self.files.setdefault(cid, {})
            elif kind == "file":
                path = msg.file.path
                self.files[cid][path] = b""
            elif kind == "data":
                self.files[cid][path] += msg.data
                total += len(msg.data)
        return exec_pb2.PutFilesResponse(total_bytes=total)

    async def StartProcess(self, request: exec_pb2.StartProcessRequest, context: Any) -> exec_pb2.StartProcessResponse:
        self.processes.append((request.container_id, request.process_id, list(request.command.argv)))
        if self.server is None:
            self.server = await asyncio.start_server(self._answer, "127.0.0.1", self.http_port)
        return exec_pb2.StartProcessResponse(
            process=exec_pb2.Process(process_id=request.process_id, container_id=request.container_id,
                                     state=exec_pb2.PROCESS_STATE_RUNNING),
            created=True,
        )

    @staticmethod
    async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def serve(*servicers: Any) -> tuple[grpc.aio.Server, str]:
    """A grpc.aio server on loopback port 0 with the given servicers."""
    server = grpc.aio.server()
    for s in servicers:
        if isinstance(s, pb_grpc.OrchestratorServiceServicer):
            pb_grpc.add_OrchestratorServiceServicer_to_server(s, server)
        elif isinstance(s, exec_pb2_grpc.ExecServiceServicer):
            exec_pb2_grpc.add_ExecServiceServicer_to_server(s, server)
        else:
            raise TypeError(f"not a servicer: {s!r}")
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"
