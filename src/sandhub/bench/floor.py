"""The floor as a bench target: the same sandboxes the Hub would make, created
by calling the local backend directly, without gRPC, the Hub or the
orchestrator's domain layer. sandhub's numbers divided by these are what the
service layers cost.

The spec goes through the orchestrator's own validation, so defaults (pids,
disk, open files) are exactly what a CreateContainer would get.

Commands (`ls /`) go straight to the container's agent over its unix socket
(ExecService.Run, as the Hub relays it, without the Hub). Uploads and
background processes are not offered by the floor (only `ls /` is measured
here), so the webserver scenario reports them as failures here.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc

from orchestrator_service.model import Event, State, new_container_id
from orchestrator_service.validation import RawCreate, build_spec
from sandhub import internal_auth
from sandhub.bench.target import Created, CreateParams, FileToPut, RunResult, TargetError, not_running
from sandhub.config import Limits, LocalBackendConfig
from sandhub.errors import SandhubError
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc

TENANT = "bench"
_ID = re.compile(r"cnt-[a-z0-9]{12}")


class FloorTarget:
    name = "floor"
    cgroup_parent = "sandhub"

    def __init__(self, *, limits: Limits | None = None) -> None:
        self._limits = limits or Limits()
        self._state: Path | None = None
        self._backend: Any = None
        self._config: LocalBackendConfig | None = None
        self._agent_key = secrets.token_bytes(32)
        self._agents: dict[str, grpc.aio.Channel] = {}

    @property
    def detail(self) -> str:
        return "local backend called directly (no gRPC, no Hub), state in " + str(self._state or "a temp dir")

    async def start(self) -> None:
        from orchestrator_service.backends.local.backend import LocalBackend

        from sandhub.bench.local import private_backend_config

        self._state = Path(tempfile.mkdtemp(prefix="sandhub-floor-"))
        self._config = private_backend_config(self._state)
        self._backend = LocalBackend(self._config, notify=self._ignore, agent_key=self._agent_key)
        await self._backend.start()

    @staticmethod
    def _ignore(event: Event) -> None:
        pass

    async def close(self) -> list[str]:
        swept: list[str] = []
        for channel in self._agents.values():
            await channel.close()
        self._agents.clear()
        if self._backend is not None:
            swept = await self._sweep()
            await self._backend.close()
            self._backend = None
        if self._config is not None:
            from sandhub.bench.local import remove_cgroup_parent, remove_network

            await remove_network(self._config)
            remove_cgroup_parent(self._config)
        if self._state is not None:
            shutil.rmtree(self._state, ignore_errors=True)
        return swept

    async def _sweep(self) -> list[str]:
        """Deletes whatever is still alive, whatever cleanup did: a closed
        local backend leaves its containers running."""
        swept = []
        for c in await self._backend.list():
            if c.state.alive:
                swept.append(c.id)
                await self._backend.delete(container_id=c.id, grace_period_s=0, reason="Deleted")
        for _ in range(600):
            if not any(c.state.alive or c.state is State.TERMINATING for c in await self._backend.list()):
                break
            await asyncio.sleep(0.05)
        return swept

    async def create(self, params: CreateParams) -> Created:
        assert self._config is not None
        raw = RawCreate(
            image=params.image, cpu_millicores=params.cpu_millicores, memory_mib=params.memory_mib,
            pids=0, disk_mib=0, open_files=0, env={}, labels=dict(params.labels), ttl_s=0,
            ports=(), placement="", request_id="",
        )
        try:
            spec = build_spec(raw, tenant=TENANT, limits=self._limits, placements=("default",),
                              default_image=self._config.default_image)
            self._backend.validate_image(spec.image)
            c = await self._backend.create(spec=spec, container_id=new_container_id())
        except SandhubError as e:
            raise TargetError(f"{type(e).__name__}: {e.message}") from None
        if c.state is not State.RUNNING:
            raise TargetError(not_running(c.state.value, c.state_reason, c.state_message), container_id=c.id)
        cct = (c.ready_time - c.create_time).total_seconds() * 1000 if c.ready_time else None
        return Created(container_id=c.id, cct_ms=cct, ip_address=c.ip_address)

    async def run(self, container_id: str, argv: Sequence[str]) -> RunResult:
        try:
            channel = self._agents.get(container_id)
            if channel is None:
                target = self._backend.agent_target(await self._backend.get(container_id=container_id))
                channel = self._agents[container_id] = grpc.aio.insecure_channel(target)
            token = internal_auth.agent_token(self._agent_key, container_id)
            reply = await xpb_grpc.ExecServiceStub(channel).Run(
                xpb.RunRequest(container_id=container_id, command=xpb.Command(argv=list(argv))),
                metadata=internal_auth.agent_call_metadata(token, "/sandhub.exec.v1.ExecService/Run"), timeout=60)
        except SandhubError as e:
            raise TargetError(f"{type(e).__name__}: {_ID.sub('cnt-...', e.message)}") from None
        except grpc.aio.AioRpcError as e:
            raise TargetError(f"the agent: {e.code().name}: {_ID.sub('cnt-...', e.details() or '')}") from None
        status = reply.exit_status
        return RunResult(exit_code=-1 if status.signal_number else status.exit_code, stdout=reply.stdout,
                         stderr=reply.stderr)

    def _hub_only(self, what: str) -> NoReturn:
        raise TargetError(f"the floor has no {what} (a Hub feature); only `ls /` runs here")

    async def put_files(self, container_id: str, files: Sequence[FileToPut]) -> None:
        self._hub_only("file upload")

    async def start_process(self, container_id: str, process_id: str, argv: Sequence[str]) -> None:
        self._hub_only("background processes")

    async def delete(self, container_id: str) -> None:
        if (channel := self._agents.pop(container_id, None)) is not None:
            await channel.close()
        try:
            await self._backend.delete(container_id=container_id, grace_period_s=0, reason="Deleted")
        except SandhubError as e:
            if e.code.name != "NOT_FOUND":
                raise TargetError(f"{type(e).__name__}: {e.message}") from None

    async def alive(self, labels: Mapping[str, str]) -> list[str]:
        return [
            c.id for c in await self._backend.list()
            if c.state is not State.TERMINATED and all(c.labels.get(k) == v for k, v in labels.items())
        ]
