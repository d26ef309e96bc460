"""The exec driver of each backend, loaded lazily on first use."""

from __future__ import annotations

import asyncio

import structlog

from orchestrator_service.backends.exec_base import ExecDriver
from sandhub.config import HubConfig
from sandhub.errors import NotSupported

log = structlog.get_logger("sandhub.hub.exec")


class Drivers:
    def __init__(self, config: HubConfig) -> None:
        self._config = config
        self._loaded: dict[str, ExecDriver] = {}
        self._lock = asyncio.Lock()

    async def get(self, backend: str) -> ExecDriver:
        driver = self._loaded.get(backend)
        if driver is not None:
            return driver
        async with self._lock:
            if backend not in self._loaded:
                driver = self._make(backend)
                await driver.start()
                self._loaded[backend] = driver
                log.info("exec.driver_started", backend=backend)
            return self._loaded[backend]

    def _make(self, backend: str) -> ExecDriver:
        if backend == "local":
            from orchestrator_service.backends.local.exec_driver import LocalExecDriver

            return LocalExecDriver(self._config.local)
        if backend == "kubernetes":
            from orchestrator_service.backends.kubernetes.exec_driver import KubernetesExecDriver

            return KubernetesExecDriver(self._config.kubernetes)
        raise NotSupported(f"running commands in {backend!r} containers is not supported by this Hub yet")

    async def close(self) -> None:
        for driver in self._loaded.values():
            await driver.close()
        self._loaded.clear()
