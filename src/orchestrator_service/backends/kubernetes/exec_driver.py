"""ExecDriver for Kubernetes containers: pods/exec over v5 websockets.

Every command is one exec session (exec_ws.py) through the API server to
the pod's kubelet; processes that must outlive the caller are supervised by
a shell in the container (exec_scripts.py). The driver has an ApiClient of
its own, separate from the backend's: the websocket needs the client's
credentials and TLS settings, never its shared connection pool.
"""

from __future__ import annotations

import asyncio
import re

import structlog

from orchestrator_service.backends.exec_base import CommandSpec, OutputRead, ProcessInfo, PtySize, Stream
from orchestrator_service.backends.kubernetes import exec_scripts as scripts
from orchestrator_service.backends.kubernetes import objects as o
from orchestrator_service.backends.kubernetes.api import Api, new_api_client
from orchestrator_service.backends.kubernetes.exec_process import KubeProcess, StartError
from orchestrator_service.backends.kubernetes.exec_ws import ChannelSocket, exec_url
from sandhub.config import KubernetesBackendConfig
from sandhub.errors import (
    BackendError, BackendUnavailable, ContainerNotRunning, InvalidField, ProcessNotFound, Timeout,
)

log = structlog.get_logger("sandhub.kubernetes.exec")
PROCESS_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
NO_SUCH_PROCESS = 3
START_TIMEOUT_S = 30.0
MAX_SCRIPT_OUTPUT = 64 << 20


class KubernetesExecDriver:
    def __init__(self, config: KubernetesBackendConfig) -> None:
        self._config = config
        self._api: Api | None = None

    @property
    def toolbox(self) -> str:
        return ""  # the image's own /bin/sh and tools

    @property
    def api(self) -> Api:
        assert self._api is not None, "KubernetesExecDriver.start() was not called"
        return self._api

    async def start(self) -> None:
        self._api = Api(self._config, await asyncio.to_thread(new_api_client, self._config))

    async def close(self) -> None:
        if self._api is not None:
            self._api.client.close()

    # -- one exec session ---------------------------------------------------------------

    async def _check_running(self, container_id: str) -> None:
        pod = await self.api.read_container_pod(self._config.namespace, container_id, id_label=o.LABEL_CONTAINER_ID)
        if pod.metadata.deletion_timestamp is not None or (pod.status and pod.status.phase) != "Running":
            raise ContainerNotRunning(container_id, "TERMINATING" if pod.metadata.deletion_timestamp else
                                      ("PENDING" if pod.status and pod.status.phase == "Pending" else "FAILED"))

    async def _open(self, container_id: str, argv: list[str], *, stdin: bool, tty: bool) -> ChannelSocket:
        conf = self.api.client.configuration
        url = exec_url(conf, namespace=self._config.namespace, pod=container_id, container=o.CONTAINER_NAME,
                       argv=argv, stdin=stdin, tty=tty)
        return await asyncio.to_thread(ChannelSocket.connect, conf, url, timeout_s=self._config.request_timeout_s)

    async def _run(self, container_id: str, argv: list[str]) -> tuple[int, bytes]:
        """Runs a short script to its end; returns its exit code and stdout."""
        sock = await self._open(container_id, argv, stdin=False, tty=False)
        proc = KubeProcess(sock, tty=False, signaller=_no_signal, wrapped=False)
        out = bytearray()
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while (chunk := await proc.read()) is not None:
                    if chunk.stream == "stdout" and len(out) < MAX_SCRIPT_OUTPUT:
                        out += chunk.data
                info = await proc.wait()
        except TimeoutError:
            await proc.kill()
            raise Timeout(f"container {container_id} did not answer in {START_TIMEOUT_S:g}s") from None
        return info.exit_code, bytes(out)

    # -- attached -----------------------------------------------------------------------

    async def spawn(self, *, container_id: str, command: CommandSpec, pty: PtySize | None = None) -> KubeProcess:
        command.check()
        if pty is not None and not (0 < pty.rows < 65536 and 0 < pty.cols < 65536):
            raise InvalidField("pty", "rows and cols must be between 1 and 65535")
        await self._check_running(container_id)
        sock = await self._open(container_id, scripts.wrapped(command, tty=pty is not None), stdin=True,
                                tty=pty is not None)

        async def signaller(pid: int, signum: int) -> None:
            await self._run(container_id, scripts.signal_argv(pid, signum))

        proc = KubeProcess(sock, tty=pty is not None, signaller=signaller)
        try:
            await proc.started(START_TIMEOUT_S)
        except StartError as e:
            await proc.kill()
            if e.reason == "NOCWD":
                raise InvalidField("command.cwd", f"{command.cwd!r}: no such directory in the container") from None
            if e.reason == "NOEXEC":
                raise InvalidField("command.argv", f"{command.argv[0]!r}: not found in the container") from None
            await self._check_running(container_id)
            log.warning("kubernetes.exec_ended_early", container_id=container_id, status=proc.status_message)
            # The exec session broke before the command ran (the API server,
            # kubelet or runtime let go of it): transient, and nothing started.
            raise BackendUnavailable(f"exec in {container_id} ended before the command started "
                                     f"({proc.status_message or 'no status'}); not started, retry") from None
        except TimeoutError:
            await proc.kill()
            raise Timeout(f"the command did not start in {START_TIMEOUT_S:g}s") from None
        if pty is not None:
            await proc.resize(pty)
        return proc

    # -- background ---------------------------------------------------------------------

    async def start_background(self, *, container_id: str, process_id: str,
                               command: CommandSpec) -> tuple[ProcessInfo, bool]:
        if not PROCESS_ID.match(process_id):
            raise InvalidField("process_id", "1-63 characters of [a-z0-9-], starting with a lower-case letter or digit")
        command.check()
        await self._check_running(container_id)
        code, out = await self._run(container_id, scripts.start_argv(process_id, command))
        answer = out.strip().decode(errors="replace")
        if answer == "NOCWD":
            raise InvalidField("command.cwd", f"{command.cwd!r}: no such directory in the container")
        if answer == "NOEXEC":
            raise InvalidField("command.argv", f"{command.argv[0]!r}: not found in the container")
        if answer not in ("STARTED", "EXISTS"):
            raise BackendError(f"starting a background process failed (exit {code}): {answer[:200]!r}")
        info = await self.get_background(container_id=container_id, process_id=process_id)
        return info, answer == "STARTED"

    async def get_background(self, *, container_id: str, process_id: str) -> ProcessInfo:
        if not PROCESS_ID.match(process_id):
            raise ProcessNotFound(container_id, process_id)
        await self._check_running(container_id)
        code, out = await self._run(container_id, scripts.sh(scripts.GET, process_id, str(scripts.SEGMENT)))
        found = scripts.parse_processes(out)
        if code == NO_SUCH_PROCESS or not found:
            raise ProcessNotFound(container_id, process_id)
        return found[0]

    async def list_background(self, *, container_id: str) -> list[ProcessInfo]:
        await self._check_running(container_id)
        _, out = await self._run(container_id, scripts.sh(scripts.LIST, str(scripts.SEGMENT)))
        return scripts.parse_processes(out)

    async def out_of_pids(self, *, container_id: str) -> bool:
        """Unknown: the pod's pids cgroup is not readable through the API."""
        return False

    async def signal_background(self, *, container_id: str, process_id: str, signum: int) -> ProcessInfo:
        if not 0 < signum < 65:
            raise InvalidField("signal", f"{signum} is not a signal number")
        info = await self.get_background(container_id=container_id, process_id=process_id)
        if info.exit is None:
            await self._run(container_id, scripts.sh(scripts.SIGNAL, process_id, str(signum)))
        return info

    async def read_output(self, *, container_id: str, process_id: str, stream: Stream, offset: int,
                          max_bytes: int) -> OutputRead:
        if offset < 0:
            raise InvalidField("offset", "must not be negative")
        if max_bytes <= 0:
            raise InvalidField("max_bytes", "must be positive")
        if not PROCESS_ID.match(process_id):
            raise ProcessNotFound(container_id, process_id)
        await self._check_running(container_id)
        base = "out" if stream == "stdout" else "err"
        code, out = await self._run(container_id, scripts.sh(
            scripts.READ, process_id, base, str(offset), str(min(max_bytes, scripts.SEGMENT)), str(scripts.SEGMENT)))
        if code == NO_SUCH_PROCESS:
            raise ProcessNotFound(container_id, process_id)
        answer = scripts.parse_read(out)
        return OutputRead(offset=answer.offset, data=answer.data, dropped_before=answer.offset > offset)


async def _no_signal(pid: int, signum: int) -> None:
    """Scripts are never signalled: closing their session is enough."""
