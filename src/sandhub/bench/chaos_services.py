"""The Hub and the Orchestrator of a chaos run: two `sandhub serve --only ...`
processes that the run kills with SIGKILL and starts again.

Everything is private to the run: a temp root holding the token, the logs and
the Hub's TMPDIR (so its /tmp/sandhub-exec-* directories are the run's own),
and under it the state directory, optionally on a small tmpfs the run mounts
so that it can fill the disk and free it again; a network device, subnet and
cgroup parent of its own (bench/local.py); loopback ports.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sandhub import internal_auth
from sandhub.bench.local import private_backend_config, remove_cgroup_parent, remove_network

SERVICES = ("orchestrator", "hub")
TENANT_KEYS = {"chaos-key-a": "chaos-a", "chaos-key-b": "chaos-b"}
"""Two tenants, so every check also sees that one's calls never reach the other's containers."""
FILL_NAME = "chaos-fill"
"""The file that fills the state disk: beside the backend's directory, not in it."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ProcessFigures:
    rss_kib: int
    open_fds: int


def figures_of(pid: int) -> ProcessFigures | None:
    """RSS and open file descriptors of a live process, None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return ProcessFigures(rss_kib=rss, open_fds=fds)


class ChaosServices:
    """Starts, kills (SIGKILL) and restarts the two services of one run."""

    def __init__(self, *, disk_mib: int = 0, log_level: str = "info") -> None:
        """``disk_mib``: the size of a tmpfs mounted for the state directory
        (0: the state stays on the temp root's file system and the run can't fill it)."""
        self.root = Path(tempfile.mkdtemp(prefix="sandhub-chaos-"))
        self.disk = self.root / "disk"
        self.disk.mkdir()
        self.mounted = False
        if disk_mib:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={disk_mib}m,mode=0755", "chaos", str(self.disk)],
                           check=True, capture_output=True)
            self.mounted = True
        self.local = private_backend_config(self.disk)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir()
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.token = internal_auth.new_token()
        self.token_file = self.root / "orchestrator-token"
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        self.orch_port, self.hub_port = _free_port(), _free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts = {name: 0 for name in SERVICES}
        self.kills = {name: 0 for name in SERVICES}
        self._log_level = log_level

    @property
    def hub_address(self) -> str:
        return f"127.0.0.1:{self.hub_port}"

    @property
    def orchestrator_address(self) -> str:
        return f"127.0.0.1:{self.orch_port}"

    @property
    def cgroup_parent(self) -> str:
        from orchestrator_service.backends.local import cgroups

        return cgroups.parent_for(self.local.state_dir)

    @property
    def veth_alias_prefix(self) -> str:
        from orchestrator_service.backends.local.network import ALIAS_PREFIX

        return f"{ALIAS_PREFIX}:{self.local.bridge}:"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDHUB_")}
        return {
            **env,
            "TMPDIR": str(self.tmp),
            "SANDHUB_STATE_DIR": str(self.disk),
            "SANDHUB_BRIDGE": self.local.bridge,
            "SANDHUB_SUBNET": self.local.subnet,
            "SANDHUB_API_KEYS": ",".join(f"{k}={t}" for k, t in TENANT_KEYS.items()),
            "SANDHUB_ORCHESTRATOR_LISTEN": self.orchestrator_address,
            "SANDHUB_ORCHESTRATOR": self.orchestrator_address,
            "SANDHUB_ORCHESTRATOR_TOKEN_FILE": str(self.token_file),
            "SANDHUB_HUB_LISTEN": self.hub_address,
            "SANDHUB_LOG_LEVEL": self._log_level,
            # The run's clients create in bursts and retry; the rate limit is
            # tested elsewhere and would only make the run slower.
            "SANDHUB_CREATE_RATE": "0",
            "SANDHUB_REAP_INTERVAL": "1",
            "SANDHUB_TOMBSTONE": "600",
            "PYTHONUNBUFFERED": "1",  # a SIGKILL must not take the last log lines with it
        }

    def pid(self, name: str) -> int:
        proc = self.procs.get(name)
        return proc.pid if proc is not None and proc.poll() is None else 0

    async def start(self, name: str, *, ready_timeout_s: float = 60.0) -> None:
        """Starts one service and waits until its health check says SERVING."""
        sandhub = str(Path(sys.executable).parent / "sandhub")
        with open(self.logs / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sandhub, "serve", "--only", name], env=self.env(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True,
            )
        self.starts[name] += 1
        address = self.orchestrator_address if name == "orchestrator" else self.hub_address
        await self._wait_serving(name, address, ready_timeout_s)

    async def _wait_serving(self, name: str, address: str, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"the {name} exited ({proc.returncode}) while starting; see {self.logs}")
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if loop.time() > deadline:
                    raise RuntimeError(f"the {name} did not serve within {timeout_s:g} s; see {self.logs}")
                await asyncio.sleep(0.1)

    async def kill(self, name: str) -> None:
        """SIGKILL, as a crash or the OOM killer would end it."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            self.kills[name] += 1
        await asyncio.to_thread(proc.wait)

    async def restart(self, name: str) -> None:
        await self.kill(name)
        await self.start(name)

    # -- the state disk -----------------------------------------------------------

    def fill_disk(self) -> int:
        """Writes a file beside the backend's state until the tmpfs is full;
        returns the bytes written."""
        assert self.mounted, "the run has no disk of its own to fill"
        written = 0
        fd = os.open(self.disk / FILL_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (1 << 20, 1 << 12, 1):
                block = b"\0" * chunk
                while True:
                    try:
                        written += os.write(fd, block)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return written

    def free_disk(self) -> None:
        (self.disk / FILL_NAME).unlink(missing_ok=True)

    # -- the end ------------------------------------------------------------------

    async def stop(self) -> None:
        """SIGTERM (a clean stop) for the live services."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)

    async def remove(self) -> None:
        """After stop(): the network, cgroup parent, tmpfs and temp root."""
        await remove_network(self.local)
        remove_cgroup_parent(self.local)
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.disk)], capture_output=True)
            self.mounted = False
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, name: str, lines: int = 30) -> str:
        return "\n".join(self._log_lines(name)[-lines:])

    def log_lines_naming(self, name: str, needle: str, lines: int = 30) -> str:
        """The first lines of a service's log (every run of it) that name ``needle``."""
        return "\n".join([line for line in self._log_lines(name) if needle in line][:lines])

    def _log_lines(self, name: str) -> list[str]:
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return []
