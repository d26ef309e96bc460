"""Commands in a container for tests about something else (isolation,
networks, leftovers, restarts) that only need to run a script or a server
inside: through the Hub's ExecService (the relay to the container's agent),
or straight to the agent when a test runs an Orchestrator without a Hub."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from sandhub import internal_auth
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc

BB = "/.sandhub/busybox"
"""The local backend's static busybox, bound into every container."""
_SERVICE = "/sandhub.exec.v1.ExecService/"


class ContainerShell:
    def __init__(self, channel: grpc.aio.Channel, metadata: Callable[[str], tuple[tuple[str, str], ...]]) -> None:
        """``metadata(method)``: what a call to ``method`` carries."""
        self.stub = xpb_grpc.ExecServiceStub(channel)
        self._md = metadata

    @classmethod
    def through_hub(cls, channel: grpc.aio.Channel, caller: tuple[tuple[str, str], ...]) -> ContainerShell:
        """``caller``: the caller's credentials (tests.conftest.auth)."""
        return cls(channel, lambda _method: caller)

    @classmethod
    def direct(cls, channel: grpc.aio.Channel, *, orchestrator_token: str, container_id: str) -> ContainerShell:
        """``channel`` to the container's agent (its AgentDirectory target),
        with the credential the Hub would derive."""
        token = internal_auth.agent_token(internal_auth.agent_key(orchestrator_token), container_id)
        return cls(channel, lambda method: internal_auth.agent_call_metadata(token, method))

    async def run(self, container_id: str, argv: Sequence[str], timeout_s: float = 20.0) -> xpb.RunResponse:
        request = xpb.RunRequest(container_id=container_id, command=xpb.Command(argv=list(argv)))
        request.timeout.FromSeconds(int(timeout_s))
        reply: xpb.RunResponse = await self.stub.Run(request, metadata=self._md(_SERVICE + "Run"), timeout=timeout_s + 10)
        return reply

    async def sh(self, container_id: str, script: str, timeout_s: float = 20.0) -> tuple[xpb.ExitStatus, str]:
        """Runs a busybox shell script inside; returns how it ended and its
        stdout followed by its stderr."""
        reply = await self.run(container_id, [BB, "sh", "-c", script], timeout_s)
        return reply.exit_status, (reply.stdout + reply.stderr).decode(errors="replace")

    async def start(self, container_id: str, process_id: str, argv: Sequence[str]) -> xpb.Process:
        """A background process, left running (it dies with its container)."""
        reply = await self.stub.StartProcess(
            xpb.StartProcessRequest(container_id=container_id, process_id=process_id,
                                    command=xpb.Command(argv=list(argv))),
            metadata=self._md(_SERVICE + "StartProcess"), timeout=30)
        process: xpb.Process = reply.process
        return process


@contextlib.asynccontextmanager
async def agent_shell(backend: Any, container_id: str, *, orchestrator_token: str) -> AsyncIterator[ContainerShell]:
    """A shell straight to the agent of ``container_id`` on ``backend`` (an
    Orchestrator's, whose token is ``orchestrator_token``)."""
    target = backend.agent_target(await backend.get(container_id=container_id))
    async with grpc.aio.insecure_channel(target) as channel:
        yield ContainerShell.direct(channel, orchestrator_token=orchestrator_token, container_id=container_id)
