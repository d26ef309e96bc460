"""`--start-local`: an Orchestrator (local backend, temp state dir) and a Hub on
loopback port 0, inside the bench process, so one command measures without a
running server.

They run on their own thread and event loop, as `sandhub serve` would run them
in their own process: the bench's client work (a thousand calls in flight,
progress, /proc reads) then doesn't sit in the servers' loop and inflate their
latency. They still share the GIL with the client; a Hub in another process
(`--hub`) avoids that too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from orchestrator_service.model import State
from sandhub.bench.hub import HubTarget
from sandhub.config import HubConfig, Limits, LocalBackendConfig, OrchestratorConfig

T = TypeVar("T")
TENANT = "bench"


def init_pid(config: LocalBackendConfig, container_id: str) -> int:
    """Host pid of a container's pid 1 (its agent), read from the backend's record."""
    record = config.state_dir / "containers" / f"{container_id}.json"
    return int(json.loads(record.read_text())["runtime"]["init_pid"])


def private_backend_config(state: Path) -> LocalBackendConfig:
    """A local backend of the bench's own: its state under ``state``, and a
    network device and /19 subnet (8,190 addresses: room for `bench capacity`'s
    5,000) of its own in 10.224.0.0/12, so a bench never disturbs a sandhub
    already serving on this host (sandhub0, 10.88.0.0/16) nor the tests
    (10.240.0.0/12)."""
    n = secrets.randbelow(128)
    return LocalBackendConfig(
        state_dir=state / "local",
        images_dir=state / "images",
        bridge=f"shb{secrets.token_hex(4)}",
        subnet=f"10.{224 + n // 8}.{(n % 8) * 32}.0/19",
        agent_path=os.environ.get("SANDHUB_AGENT", ""),  # this checkout's (make exports it)
    )


def remove_cgroup_parent(config: LocalBackendConfig) -> None:
    """Removes the backend's own cgroup parent when the local backend keeps
    one per state directory (sandhub/<instance>), once it is empty: with a
    temp state dir per run nobody else would. rmdir never removes a cgroup
    that still has children or processes."""
    from orchestrator_service.backends.local import cgroups

    parent_for = getattr(cgroups, "parent_for", None)
    if parent_for is None:
        return
    parent = str(parent_for(config.state_dir))
    if parent == cgroups.PARENT:
        return  # the shared parent of every orchestrator: not ours to remove
    for d in [cgroups.ROOT / parent, *(cgroups.ROOT / c / parent for c in cgroups.V1_CONTROLLERS)]:
        try:
            d.rmdir()
        except OSError:
            pass


async def remove_network(config: LocalBackendConfig) -> None:
    """The bridge outlives its backend on purpose (containers survive a
    restart); the bench removes its own."""
    if not config.network:
        return
    from orchestrator_service.backends.local.network import HostNetwork, NetworkConfig, NetworkError

    try:
        await HostNetwork(NetworkConfig(bridge=config.bridge, subnet=config.subnet)).teardown()
    except NetworkError:
        pass  # no network tools: there was no bridge either


class LocalServices:
    def __init__(self, *, api_key: str, limits: Limits | None = None) -> None:
        """``limits``: the Orchestrator's, when not its defaults (`bench
        capacity` lifts the per-tenant quota and create rate)."""
        self._api_key = api_key
        self._limits = limits
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sandhub-bench-services", daemon=True)
        self._state: Path | None = None
        self._local: LocalBackendConfig | None = None
        self._orch: Any = None
        self._hub: Any = None
        self.hub_address = ""

    @property
    def state_dir(self) -> Path | None:
        return self._state

    @property
    def local_config(self) -> LocalBackendConfig:
        """The local backend's configuration (once started): where its records are."""
        assert self._local is not None, "start() first"
        return self._local

    async def _in_thread(self, coro: Coroutine[Any, Any, T]) -> T:
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return await asyncio.wrap_future(future)

    async def start(self) -> None:
        self._state = Path(tempfile.mkdtemp(prefix="sandhub-bench-"))
        self._thread.start()
        await self._in_thread(self._start())

    async def _start(self) -> None:
        from hub_service.server import start_hub
        from orchestrator_service.server import start_orchestrator
        from sandhub import internal_auth

        assert self._state is not None
        self._local = private_backend_config(self._state)
        token = internal_auth.new_token()  # both in this process, as `sandhub serve` does
        config = OrchestratorConfig(listen="127.0.0.1:0", local=self._local, token=token)
        if self._limits is not None:
            config = dataclasses.replace(config, limits=self._limits)
        self._orch = await start_orchestrator(config)
        hub = HubConfig(
            listen="127.0.0.1:0", orchestrator=f"127.0.0.1:{self._orch.port}", api_keys={self._api_key: TENANT},
            orchestrator_token=token,
        )
        self._hub = await start_hub(hub)
        self.hub_address = f"127.0.0.1:{self._hub.port}"

    async def stop(self) -> list[str]:
        """Stops both servers after deleting, through the backend itself, any
        container still alive (a safety net under the bench's own cleanup);
        returns the ids it had to delete that way."""
        swept: list[str] = []
        if self._thread.is_alive():
            swept = await self._in_thread(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 10)
        if not self._thread.is_alive():
            self._loop.close()
        if self._local is not None:
            await remove_network(self._local)
            remove_cgroup_parent(self._local)
        if self._state is not None:
            shutil.rmtree(self._state, ignore_errors=True)
        return swept

    async def _stop(self) -> list[str]:
        swept: list[str] = []
        if self._hub is not None:
            await self._hub.stop(0)
        if self._orch is None:
            return swept
        containers = self._orch.containers
        for c in await containers.backend.list():
            if c.state.alive:
                swept.append(c.id)
                await containers.delete(c.id, tenant=None, grace_period_s=0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            states = [c.state for c in await containers.backend.list()]
            if not any(s.alive or s is State.TERMINATING for s in states):
                break
            await asyncio.sleep(0.05)
        await self._orch.stop(0)
        return swept


class LocalHubTarget(HubTarget):
    """The Hub target, with its own Hub and Orchestrator started on loopback."""

    def __init__(self, *, api_key: str, timeout_s: float, limits: Limits | None = None) -> None:
        super().__init__("", api_key=api_key, timeout_s=timeout_s)
        self._services = LocalServices(api_key=api_key, limits=limits)

    async def start(self) -> None:
        try:
            await self._services.start()
        except BaseException:
            await self._services.stop()
            raise
        self._address = self._services.hub_address
        self._detail = (
            f"Hub in-process at {self._address}, Orchestrator with the local backend, "
            f"state in {self._services.state_dir}"
        )
        try:
            await super().start()
        except BaseException:
            await self._services.stop()
            raise

    @property
    def local_config(self) -> LocalBackendConfig:
        """The local backend's configuration (once started)."""
        return self._services.local_config

    async def close(self) -> list[str]:
        await super().close()
        return await self._services.stop()
