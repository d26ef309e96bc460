"""A Docker daemon of the bench's own: private socket, data root, exec root,
pidfile, trust key and cgroup parent, under one temp directory, so it never
meets a Docker already serving on this host and leaves nothing behind.

Host changes are kept off: no default bridge (``--bridge=none``), no
iptables rules, no IP forwarding or masquerading toggled, no userland proxy.
dockerd starts its own containerd (state under the exec root). What dockerd
and containerd create at fixed paths whatever the flags (/run/docker/plugins,
/run/containerd/s for shim sockets) is removed at stop if it did not exist
before and is empty.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sandhub.bench.docker_api import DockerApiError, DockerClient, Request

FIXED_DIRS = ("/run/docker/plugins", "/run/docker", "/run/containerd/s", "/run/containerd", "/etc/docker")
"""Created by dockerd/containerd at fixed paths (children before parents)."""
CGROUP_ROOT = Path("/sys/fs/cgroup")
IMAGE = "sandhub-bench-busybox:1"
APPLETS = ("sh", "ls", "sleep", "cat", "echo", "env", "id", "mkdir", "rm", "true", "false", "wget", "httpd")


class DockerdError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def find_dockerd() -> str:
    """The dockerd binary, or "" when Docker Engine is not installed."""
    return shutil.which("dockerd") or next((p for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd") if os.access(p, os.X_OK)), "")


def dockerd_argv(dockerd: str, root: Path, cgroup_parent: str) -> list[str]:
    """The command line of a private daemon under ``root``."""
    return [
        dockerd,
        f"--host=unix://{root / 'docker.sock'}",
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--pidfile={root / 'docker.pid'}",
        f"--config-file={root / 'daemon.json'}",
        f"--cgroup-parent=/{cgroup_parent}",
        "--exec-opt=native.cgroupdriver=cgroupfs",
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-forward=false",
        "--ip-masq=false",
        "--userland-proxy=false",
        "--log-level=warn",
    ]


def daemon_json(root: Path) -> dict[str, object]:
    """What has no flag: the trust key would otherwise go to /etc/docker."""
    return {"deprecated-key-path": str(root / "key.json")}


def busybox_rootfs_tar(busybox: str = "/bin/busybox", applets: Iterable[str] = APPLETS) -> bytes:
    """A root filesystem like `docker export` gives: a static busybox, its
    applet links, and the directories containers mount over."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "etc", "tmp", "work", "proc", "sys", "dev"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in applets:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        passwd = b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/work:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        tar.addfile(info, io.BytesIO(passwd))
    return buf.getvalue()


@dataclass(frozen=True)
class DaemonInfo:
    version: str
    storage_driver: str
    cgroup_driver: str
    cgroup_version: str


class PrivateDockerd:
    def __init__(self, *, dockerd: str = "", cgroup_parent: str, start_timeout_s: float = 60.0) -> None:
        self._dockerd = dockerd or find_dockerd()
        self.cgroup_parent = cgroup_parent
        self._start_timeout_s = start_timeout_s
        self.root: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._existed = {d: os.path.lexists(d) for d in FIXED_DIRS}
        self.client: DockerClient | None = None

    @property
    def socket(self) -> str:
        assert self.root is not None
        return str(self.root / "docker.sock")

    async def start(self) -> DaemonInfo:
        if not self._dockerd:
            raise DockerdError("dockerd not found: install Debian's docker.io (`make bench` does, as root)")
        if os.geteuid() != 0:
            raise DockerdError("a private dockerd needs root")
        # Short: unix socket paths are limited to 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="shbd-", dir="/tmp"))
        (self.root / "daemon.json").write_text(json.dumps(daemon_json(self.root)))
        log = (self.root / "dockerd.log").open("wb")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *dockerd_argv(self._dockerd, self.root, self.cgroup_parent),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        finally:
            log.close()
        self.client = DockerClient(self.socket, timeout_s=60)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout_s
        while True:
            if self._proc.returncode is not None:
                raise DockerdError(f"dockerd exited {self._proc.returncode}: {self.log_tail()}")
            try:
                resp = await self.client.call(Request("GET", "/_ping"), timeout_s=2)
                if resp.status == 200:
                    break
            except DockerApiError:
                pass
            if loop.time() > deadline:
                raise DockerdError(f"dockerd did not answer within {self._start_timeout_s:g}s: {self.log_tail()}")
            await asyncio.sleep(0.1)
        info = (await self.client.checked(Request("GET", "/info"))).json()
        return DaemonInfo(
            version=str(info.get("ServerVersion", "?")),
            storage_driver=str(info.get("Driver", "?")),
            cgroup_driver=str(info.get("CgroupDriver", "?")),
            cgroup_version=str(info.get("CgroupVersion", "?")),
        )

    def log_tail(self, lines: int = 5) -> str:
        """The daemon's last error or warning lines: why it failed."""
        if self.root is None:
            return ""
        try:
            text = (self.root / "dockerd.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        picked = [line for line in text if "level=error" in line or "level=fatal" in line or "failed" in line]
        return " | ".join((picked or text)[-lines:])[:800]

    async def import_image(self, tar: bytes, name: str = IMAGE) -> None:
        assert self.client is not None
        repo, _, tag = name.partition(":")
        req = Request("POST", "/images/create", {"fromSrc": "-", "repo": repo, "tag": tag or "latest"}, tar,
                      content_type="application/x-tar")
        resp = await self.client.checked(req)
        for line in resp.body.splitlines():  # a stream of progress objects
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("error"):
                raise DockerdError(f"image import failed: {event['error']}")

    async def stop(self, timeout_s: float = 30.0) -> list[str]:
        """Stops the daemon and its containerd, removes every trace; returns
        what could not be removed."""
        problems: list[str] = []
        if self._proc is not None and self._proc.returncode is None:
            containerd_pid = self._containerd_pid()
            self._proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), timeout_s)
            except TimeoutError:
                problems.append(f"dockerd {self._proc.pid} ignored SIGTERM for {timeout_s:g}s: killed")
                self._proc.kill()
                await self._proc.wait()
            if containerd_pid and _alive(containerd_pid):
                await _kill_pid(containerd_pid)
        if self.root is not None:
            problems += await asyncio.to_thread(self._remove_root, self.root)
        problems += self._remove_cgroup_parent()
        for d in FIXED_DIRS:
            if not self._existed[d]:
                try:
                    os.rmdir(d)
                except OSError:
                    pass  # not empty (someone else's daemon) or already gone
        return problems

    def _containerd_pid(self) -> int:
        assert self.root is not None
        for name in ("containerd.pid",):
            try:
                return int((self.root / "exec" / "containerd" / name).read_text().strip())
            except (OSError, ValueError):
                pass
        return 0

    @staticmethod
    def _remove_root(root: Path) -> list[str]:
        """Unmounts what dockerd left mounted under ``root`` (deepest first), then deletes it."""
        problems = []
        for mount in sorted(mounts_under(root), key=len, reverse=True):
            if subprocess.run(["umount", "-l", mount], capture_output=True).returncode != 0:
                problems.append(f"could not unmount {mount}")
        shutil.rmtree(root, ignore_errors=True)
        if root.exists():
            problems.append(f"could not remove {root}")
        return problems

    def _remove_cgroup_parent(self) -> list[str]:
        problems = []
        for parent in [CGROUP_ROOT / self.cgroup_parent, *CGROUP_ROOT.glob(f"*/{self.cgroup_parent}")]:
            if not parent.is_dir():
                continue
            for child in [p for p in parent.iterdir() if p.is_dir()]:
                try:
                    child.rmdir()
                except OSError:
                    problems.append(f"cgroup {child} still in use")
            try:
                parent.rmdir()
            except OSError:
                problems.append(f"cgroup {parent} not removed")
        return problems


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` (from /proc/self/mountinfo; octal escapes decoded)."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].encode().decode("unicode_escape")
        if point == str(root) or point.startswith(prefix):
            found.append(point)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not _alive(pid):
                return
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
