"""Docker Engine as a bench target: the bench starts a dockerd of its own
(dockerd.py), imports a tiny busybox image, and creates, enters and deletes
containers through Docker's Engine API, as a caller of Docker would.

The containers get what a sandhub container gets by default: the same CPU,
memory, pids and open-files limits, a read-only root with size-capped tmpfs
/tmp and /work, uid 1000, no capabilities, no_new_privs (plus Docker's own
seccomp profile), and an address on a bridge of the bench's own (no iptables
rules: containers on it are not isolated from each other, which sandhub's
are) or, with ``network="none"``, only loopback.

create = POST /containers/create + POST /containers/{id}/start + GET
/containers/{id}/json (for the address and the times). CCT as Docker itself
reports it is State.StartedAt - Created. `ls /` is what `docker exec` does:
POST /containers/{id}/exec, POST /exec/{id}/start (attached, output read to
the end), GET /exec/{id}/json for the exit code.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import secrets
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from sandhub.bench.docker_api import (
    ContainerSpec,
    DockerApiError,
    DockerClient,
    Request,
    container_body,
    demux,
    exec_body,
    json_request,
    label_filter,
    parse_time,
)
from sandhub.bench.dockerd import IMAGE, DaemonInfo, DockerdError, PrivateDockerd, busybox_rootfs_tar
from sandhub.bench.target import Created, CreateParams, FileToPut, RunResult, TargetError, not_running
from sandhub.config import Limits

BENCH_NET_RANGE = ipaddress.IPv4Network("10.224.0.0/12")
"""The bench's own address range (local.py picks /20s from it too)."""
PROC_ROUTE = Path("/proc/net/route")


def routed_networks(route_table: str) -> list[ipaddress.IPv4Network]:
    """Destinations of the host's IPv4 routes (/proc/net/route: little-endian hex)."""
    nets = []
    for line in route_table.splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        try:
            dest = ipaddress.IPv4Address(int(f[1], 16).to_bytes(4, "little"))
            mask = ipaddress.IPv4Address(int(f[7], 16).to_bytes(4, "little"))
            nets.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
        except ValueError:
            continue
    return nets


def free_subnet(taken: Sequence[ipaddress.IPv4Network], prefix: int = 20, tries: int = 64) -> str:
    """A random /``prefix`` of the bench range that no route already covers
    (0.0.0.0/0, the default route, doesn't count)."""
    subnets: list[ipaddress.IPv4Network] = list(BENCH_NET_RANGE.subnets(new_prefix=prefix))
    for _ in range(tries):
        net = subnets[secrets.randbelow(len(subnets))]
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return str(net)
    raise TargetError("no free /20 left in 10.224.0.0/12 for Docker's bench network")


async def remove_link(name: str) -> None:
    """Deletes the network interface ``name`` if it is still there."""
    if not (Path("/sys/class/net") / name).exists():
        return
    proc = await asyncio.create_subprocess_exec("ip", "link", "del", "dev", name, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    await proc.wait()


class DockerTarget:
    name = "docker"

    def __init__(self, *, dockerd: str = "", network: str = "bridge", limits: Limits | None = None,
                 timeout_s: float = 60.0) -> None:
        """``network``: "bridge" (a bridge network of the bench's own, an
        address per container like sandhub's) or "none"."""
        if network not in ("bridge", "none"):
            raise ValueError(f"network must be bridge or none, not {network!r}")
        self._token = secrets.token_hex(4)
        self.cgroup_parent = f"shbd-{self._token}"
        """Where dockerd puts each container's cgroup (named by its full id)."""
        self._daemon = PrivateDockerd(dockerd=dockerd, cgroup_parent=self.cgroup_parent)
        self._network_mode = network
        self._network = ""
        self._limits = limits or Limits()
        self._timeout_s = timeout_s
        self._client: DockerClient | None = None
        self.info: DaemonInfo | None = None

    @property
    def detail(self) -> str:
        if self.info is None:
            return "Docker Engine (a private dockerd started by the bench)"
        net = f"bridge network {self._network}" if self._network else "no network (loopback only)"
        return (f"Docker Engine {self.info.version} (private dockerd, {self.info.storage_driver}, "
                f"cgroup {self.info.cgroup_driver}/{self.info.cgroup_version}), image {IMAGE}, {net}")

    async def start(self) -> None:
        try:
            self.info = await self._daemon.start()
            self._client = self._daemon.client
            await self._daemon.import_image(busybox_rootfs_tar())
        except (DockerdError, DockerApiError) as e:
            raise TargetError(f"Docker: {getattr(e, 'reason', None) or e}") from None
        if self._network_mode == "bridge":
            await self._create_network()

    async def _create_network(self) -> None:
        assert self._client is not None
        try:
            route_table = PROC_ROUTE.read_text()
        except OSError:
            route_table = ""
        subnet = free_subnet(routed_networks(route_table))
        name = f"shbd-{self._token}"
        body = {
            "Name": name, "Driver": "bridge", "CheckDuplicate": True,
            "IPAM": {"Config": [{"Subnet": subnet}]},
            "Options": {"com.docker.network.bridge.name": name},
        }
        try:
            await self._client.checked(json_request("POST", "/networks/create", body))
        except DockerApiError as e:
            raise TargetError(f"Docker: could not create its bench network: {e.message}") from None
        self._network = name

    async def close(self) -> list[str]:
        swept: list[str] = []
        if self._client is not None:
            try:
                resp = await self._client.checked(Request("GET", "/containers/json", {"all": "1"}))
                swept = [str(c["Id"]) for c in resp.json() or []]
                for cid in swept:
                    await self.delete(cid)
            except (DockerApiError, TargetError):
                pass  # stopping the daemon below removes its data anyway
            if self._network:
                try:
                    await self._client.call(Request("DELETE", f"/networks/{self._network}"))
                except DockerApiError:
                    pass  # removed below
        await self._daemon.stop()
        if self._network:
            await remove_link(self._network)  # dockerd leaves its bridges when it stops
        self._client = None
        return swept

    def _spec(self, params: CreateParams) -> ContainerSpec:
        lim = self._limits
        half = max(lim.default_disk_mib // 2, 1)
        return ContainerSpec(
            image=params.image or IMAGE,
            cmd=("/bin/sleep", "inf"),
            labels=params.labels,
            memory_mib=params.memory_mib or lim.default_memory_mib,
            cpu_millicores=params.cpu_millicores or lim.default_cpu_millicores,
            pids=lim.default_pids,
            open_files=lim.default_open_files,
            tmpfs_mib={"/tmp": half, "/work": half},
            network=self._network or "none",
        )

    async def _checked(self, req: Request, ok: Sequence[int] = (200, 201, 204)) -> object:
        assert self._client is not None
        try:
            return (await self._client.checked(req, ok=ok)).json()
        except DockerApiError as e:
            raise TargetError(f"Docker: {e.message}") from None

    async def create(self, params: CreateParams) -> Created:
        created = await self._checked(json_request("POST", "/containers/create", container_body(self._spec(params))))
        assert isinstance(created, dict)
        cid = str(created["Id"])
        try:
            await self._checked(Request("POST", f"/containers/{cid}/start"), ok=(204, 304))
            c = await self._checked(Request("GET", f"/containers/{cid}/json"))
        except TargetError as e:
            raise TargetError(e.reason, container_id=cid) from None
        assert isinstance(c, dict)
        state = c.get("State") or {}
        if not state.get("Running"):
            raise TargetError(not_running(str(state.get("Status", "?")), "", str(state.get("Error", ""))),
                              container_id=cid)
        cct = (parse_time(state["StartedAt"]) - parse_time(c["Created"])) * 1000
        networks = (c.get("NetworkSettings") or {}).get("Networks") or {}
        ip = str((networks.get(self._network) or {}).get("IPAddress", "")) if self._network else ""
        return Created(container_id=cid, cct_ms=cct, ip_address=ip)

    async def run(self, container_id: str, argv: Sequence[str]) -> RunResult:
        assert self._client is not None
        made = await self._checked(json_request("POST", f"/containers/{container_id}/exec", exec_body(argv)))
        assert isinstance(made, dict)
        exec_id = str(made["Id"])
        try:
            resp = await self._client.call(json_request("POST", f"/exec/{exec_id}/start", {"Detach": False, "Tty": False}))
        except DockerApiError as e:
            raise TargetError(f"Docker: {e.message}") from None
        if resp.status not in (200, 101):
            raise TargetError(f"Docker: exec start answered {resp.status}")
        out, err = demux(resp.body)
        inspect = await self._checked(Request("GET", f"/exec/{exec_id}/json"))
        assert isinstance(inspect, dict)
        code = inspect.get("ExitCode")
        return RunResult(exit_code=-1 if code is None else int(code), stdout=out, stderr=err)

    async def put_files(self, container_id: str, files: Sequence[FileToPut]) -> None:
        """A tar into /work through the archive API. Docker writes it into the
        container's root filesystem, not the tmpfs mounted there (and refuses a
        read-only root), so uploads fail with Docker's own message."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for f in files:
                info = tarfile.TarInfo(f.path)
                info.size, info.mode = len(f.data), f.mode
                tar.addfile(info, io.BytesIO(f.data))
        await self._checked(Request("PUT", f"/containers/{container_id}/archive", {"path": "/work"}, buf.getvalue(),
                                    content_type="application/x-tar"))

    async def start_process(self, container_id: str, process_id: str, argv: Sequence[str]) -> None:
        made = await self._checked(json_request("POST", f"/containers/{container_id}/exec", exec_body(argv, detach=True)))
        assert isinstance(made, dict)
        await self._checked(json_request("POST", f"/exec/{made['Id']}/start", {"Detach": True, "Tty": False}))

    async def delete(self, container_id: str) -> None:
        await self._checked(Request("DELETE", f"/containers/{container_id}", {"force": "1", "v": "1"}),
                            ok=(204, 404))

    async def alive(self, labels: Mapping[str, str]) -> list[str]:
        found = await self._checked(Request("GET", "/containers/json", label_filter(labels)))
        return [str(c["Id"]) for c in found or []] if isinstance(found, list) else []
