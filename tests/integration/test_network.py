"""Container networking on a host bridge (backends/local/network.py), for real.

"Containers" here are processes in fresh network namespaces (``unshare --net``)
running a tiny TCP server; probes from inside a container run through
``nsenter --net``. Everything uses a bridge and subnets of its own (shtest0,
10.231.0.0/24, 10.232.x) so a dev server on sandhub0 is not disturbed, and all
traffic stays on this machine: the "outside world" is one more namespace
behind a veth. Only processes started here are killed, by pid.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import select
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from orchestrator_service.backends.local.network import (
    AddressesExhausted,
    HostNetwork,
    NetworkConfig,
    NetworkError,
    veth_name,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

BRIDGE = "shtest0"
SUBNET = "10.231.0.0/24"
GATEWAY = "10.231.0.1"
PORT = 8000
# The "outside": a namespace behind a veth. The host end's address is one more
# host address (must be unreachable from containers), the far end is beyond
# the host (reachable only with allow_egress).
OUT_HOST_IF = "shtesto0"
OUT_HOST_IP = "10.232.0.1"
OUT_FAR_IP = "10.232.0.2"
PROBE_TIMEOUT_S = 1.0

SERVER = r"""
import socket, sys
name = sys.argv[1].encode()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(b"hello from " + name + b"\n")
    finally:
        c.close()
"""

PROBE = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    c.settimeout(float(sys.argv[3]))
    print("ok:" + c.recv(100).decode().strip())
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error:" + (e.strerror or str(e)))
"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


def nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], check=True, capture_output=True, text=True, timeout=60).stdout


def exists(ifname: str) -> bool:
    return os.path.exists(f"/sys/class/net/{ifname}")


@dataclass
class Box:
    """A process in a network namespace of its own, serving on PORT."""

    name: str
    proc: subprocess.Popen[str]
    container_id: str = ""
    ip: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_box(name: str) -> Box:
    # `unshare --net` without --fork execs the server in the new namespace,
    # so the Popen pid is the server itself, inside that namespace.
    proc = subprocess.Popen(
        ["unshare", "--net", "--", sys.executable, "-c", SERVER, name, str(PORT)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    if not ready or proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        pytest.fail(f"box {name} did not start")
    return Box(name, proc, container_id=f"cnt-{secrets.token_hex(6)}")


def stop_box(box: Box) -> None:
    if box.proc.poll() is None:
        box.proc.kill()  # by pid: only the process we started
    box.proc.wait(timeout=10)


async def probe(box: Box, host: str, port: int = PORT) -> str:
    """Connects from inside ``box`` to host:port; "ok:<greeting>", "timeout", "refused" or "error:..."."""
    proc = await asyncio.create_subprocess_exec(
        "nsenter", f"--net=/proc/{box.pid}/ns/net", sys.executable, "-c", PROBE, host, str(port),
        str(PROBE_TIMEOUT_S),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT_S + 10)
    return out.decode().strip()


async def fetch_from_host(host: str, port: int = PORT) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT_S * 3)
    try:
        return (await asyncio.wait_for(reader.readline(), PROBE_TIMEOUT_S * 3)).decode().strip()
    finally:
        writer.close()


def host_ipv4_addresses() -> list[str]:
    """Every IPv4 address of the host except loopback (incl. the bridge's)."""
    out = ip("-4", "-o", "addr", "show").stdout
    addrs = [line.split()[3].split("/")[0] for line in out.splitlines()]
    return [a for a in addrs if not a.startswith("127.")]


@pytest.fixture(autouse=True)
def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests create bridges, veths and namespaces and need root (CI runs as root)")


@pytest.fixture(autouse=True)
def exclusive() -> Iterator[None]:
    """One test of this module at a time on this machine: two runs (say, two
    checkouts testing at once) would share the bridge name and subnets, and
    each one's cleanup would pull the other's veths away."""
    with open("/tmp/sandhub-test-network.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture
async def net() -> AsyncIterator[HostNetwork]:
    network = HostNetwork(NetworkConfig(bridge=BRIDGE, subnet=SUBNET))
    await network.teardown()  # whatever an interrupted earlier run left
    await network.setup()
    try:
        yield network
    finally:
        await network.teardown()
    assert not exists(BRIDGE)
    assert "sandhub_shtest0" not in nft_tables()


@pytest.fixture
def boxes() -> Iterator[tuple[Box, Box]]:
    a = start_box("a")
    try:
        b = start_box("b")
    except BaseException:
        stop_box(a)
        raise
    try:
        yield a, b
    finally:
        stop_box(a)
        stop_box(b)


@pytest.fixture
def outside() -> Iterator[Box]:
    """A server beyond the host: a namespace at OUT_FAR_IP behind a veth whose
    host end holds OUT_HOST_IP (a host address of its own)."""
    ip("link", "del", "dev", OUT_HOST_IF, check=False)
    box = start_box("outside")
    try:
        ip("link", "add", "name", OUT_HOST_IF, "type", "veth", "peer", "name", "eth0", "netns", str(box.pid))
        ip("addr", "add", f"{OUT_HOST_IP}/30", "dev", OUT_HOST_IF)
        ip("link", "set", "dev", OUT_HOST_IF, "up")
        subprocess.run(
            ["nsenter", f"--net=/proc/{box.pid}/ns/net", "ip", "-batch", "-"],
            input=f"link set lo up\naddr add {OUT_FAR_IP}/30 dev eth0\nlink set eth0 up\n",
            check=True, text=True, timeout=10,
        )
        yield box
    finally:
        stop_box(box)
        ip("link", "del", "dev", OUT_HOST_IF, check=False)


@pytest.fixture
def ip_forward() -> Iterator[None]:
    """Restores net.ipv4.ip_forward afterwards (allow_egress turns it on)."""
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as f:
        before = f.read().strip()
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(before)


async def attach(net: HostNetwork, box: Box, taken: set[str]) -> None:
    box.ip = net.allocate(taken)
    taken.add(box.ip)
    await net.attach(container_id=box.container_id, pid=box.pid, ip=box.ip)


async def test_host_reaches_containers_and_containers_reach_nothing(
    net: HostNetwork, boxes: tuple[Box, Box], outside: Box
) -> None:
    a, b = boxes
    taken: set[str] = set()
    await attach(net, a, taken)
    await attach(net, b, taken)
    assert (a.ip, b.ip) == ("10.231.0.2", "10.231.0.3")

    # The host opens connections to containers, like to a pod IP.
    assert await fetch_from_host(a.ip) == "hello from a"
    assert await fetch_from_host(b.ip) == "hello from b"

    # The host side: a routed veth of no bridge, NOARP, tagged with the
    # container id; a /32 route and a permanent neighbour entry lead to it.
    veth = veth_name(a.container_id)
    assert veth == "sh-" + a.container_id[4:] and len(veth) == 15
    assert not os.path.exists(f"/sys/class/net/{veth}/master")
    assert "NOARP" in ip("link", "show", "dev", veth).stdout
    assert ip("route", "show", f"{a.ip}/32").stdout.split() == ["10.231.0.2", "dev", veth, "scope", "link", "src", GATEWAY]
    assert "PERMANENT" in ip("neigh", "show", a.ip, "dev", veth).stdout
    assert net.leftovers() == sorted([veth, veth_name(b.container_id)])
    assert net.container_of(veth) == a.container_id

    # A listener on every host address (bridge IP, eth0's, the outside veth's).
    async def greet(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hello from host\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(greet, host="0.0.0.0", port=0)
    host_port = server.sockets[0].getsockname()[1]
    try:
        host_addrs = host_ipv4_addresses()
        assert GATEWAY in host_addrs and OUT_HOST_IP in host_addrs
        for addr in host_addrs:  # the listener itself works
            assert await fetch_from_host(addr, host_port) == "hello from host"

        results = await asyncio.gather(
            probe(a, b.ip),  # another container
            probe(b, a.ip),
            probe(a, OUT_FAR_IP),  # beyond the host (no egress)
            *(probe(a, addr, host_port) for addr in host_addrs),  # the host itself
        )
        assert not any(r.startswith("ok") for r in results), results

        # The negative results above are the firewall's doing: without our
        # inet table, A does reach the host...
        subprocess.run(["nft", "delete", "table", "inet", "sandhub_shtest0"], check=True, timeout=10)
        assert await probe(a, GATEWAY, host_port) == "ok:hello from host"
        # ...and setup is idempotent and puts it back.
        await net.setup()
        await net.setup()
        assert not (await probe(a, GATEWAY, host_port)).startswith("ok")
        assert await fetch_from_host(a.ip) == "hello from a"
    finally:
        server.close()
        await server.wait_closed()

    # Detach removes the veth and the container's eth0; it is idempotent.
    await net.detach(container_id=a.container_id)
    assert not exists(veth)
    assert net.leftovers() == [veth_name(b.container_id)]
    inside = subprocess.run(
        ["nsenter", f"--net=/proc/{a.pid}/ns/net", "ip", "-o", "link"], capture_output=True, text=True, check=True
    ).stdout
    assert "eth0" not in inside
    await net.detach(container_id=a.container_id)

    # Its address is free again, and the next container gets it and works.
    taken.discard(a.ip)
    assert net.allocate(taken) == a.ip
    await net.attach(container_id=a.container_id, pid=a.pid, ip=a.ip)
    assert await fetch_from_host(a.ip) == "hello from a"


async def test_egress_only_when_allowed(
    net: HostNetwork, boxes: tuple[Box, Box], outside: Box, ip_forward: None
) -> None:
    a, b = boxes
    await attach(net, b, set())
    egress = HostNetwork(NetworkConfig(bridge=BRIDGE, subnet=SUBNET, allow_egress=True))
    await egress.setup()
    await attach(egress, a, {b.ip})
    # Attached without egress, b has no default route: it fails at once.
    assert (await probe(b, OUT_FAR_IP)).startswith("error:Network is unreachable")
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read().strip() == "1"
    assert await probe(a, OUT_FAR_IP) == "ok:hello from outside"
    # Even with egress, the host and its other addresses stay out of reach.
    assert not (await probe(a, OUT_HOST_IP)).startswith("ok")
    assert not (await probe(a, GATEWAY)).startswith("ok")

    # Back to no egress with ip_forward still on: the forward rule stops it.
    await net.setup()
    assert not (await probe(a, OUT_FAR_IP)).startswith("ok")
    assert await fetch_from_host(a.ip) == "hello from a"


async def test_egress_per_container(
    net: HostNetwork, boxes: tuple[Box, Box], outside: Box, ip_forward: None
) -> None:
    a, b = boxes
    a.ip, b.ip = "10.231.0.2", "10.231.0.3"
    await net.attach(container_id=a.container_id, pid=a.pid, ip=a.ip, egress=True)
    await net.attach(container_id=b.container_id, pid=b.pid, ip=b.ip)
    assert await probe(a, OUT_FAR_IP) == "ok:hello from outside"
    assert not (await probe(b, OUT_FAR_IP)).startswith("ok")
    # Egress never opens the host or the other container.
    assert not (await probe(a, OUT_HOST_IP)).startswith("ok")
    assert not (await probe(a, b.ip)).startswith("ok")
    # Detach takes the permission away: the next container at that address has none.
    await net.detach(container_id=a.container_id, ip=a.ip)
    await net.detach(container_id=a.container_id, ip=a.ip)  # idempotent
    await net.attach(container_id=a.container_id, pid=a.pid, ip=a.ip)
    assert not (await probe(a, OUT_FAR_IP)).startswith("ok")


async def test_attach_failures_leave_nothing(net: HostNetwork, boxes: tuple[Box, Box]) -> None:
    a, _ = boxes
    with pytest.raises(NetworkError, match="host's network namespace"):
        await net.attach(container_id="cnt-000000000001", pid=os.getpid(), ip="10.231.0.9")
    with pytest.raises(ValueError):
        await net.attach(container_id="cnt-000000000001", pid=a.pid, ip=GATEWAY)
    with pytest.raises(ValueError):
        await net.attach(container_id="cnt-000000000001", pid=a.pid, ip="10.9.9.9")
    # The namespace already has an eth0: the inside cannot be built.
    subprocess.run(
        ["nsenter", f"--net=/proc/{a.pid}/ns/net", "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "x0"],
        check=True, timeout=10,
    )
    with pytest.raises(NetworkError, match="attach cnt-000000000001"):
        await net.attach(container_id="cnt-000000000001", pid=a.pid, ip="10.231.0.9")
    assert not exists(veth_name("cnt-000000000001"))
    assert net.leftovers() == []


async def test_a_cancelled_attach_leaves_nothing(net: HostNetwork, boxes: tuple[Box, Box]) -> None:
    """The requests run in a worker thread that a cancel can't stop: attach
    waits for it, then removes what it made, so no veth appears afterwards."""
    a, _ = boxes
    veth = veth_name("cnt-000000000002")
    outcomes = []
    for delay in (0, 0, 0.0005, 0.001, 0.002, 0.004, 0.05):
        task = asyncio.create_task(net.attach(container_id="cnt-000000000002", pid=a.pid, ip="10.231.0.9"))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            outcomes.append("cancelled")
            assert not exists(veth), delay
        else:  # it was done before the cancel: attached, as asked
            outcomes.append("attached")
            assert exists(veth)
            await net.detach(container_id="cnt-000000000002")
    assert outcomes[:2] == ["cancelled", "cancelled"] and outcomes[-1] == "attached", outcomes
    assert net.leftovers() == []


async def test_allocate() -> None:
    net = HostNetwork(NetworkConfig(bridge=BRIDGE, subnet="10.231.0.0/29"))
    taken: set[str] = set()
    got = []
    for _ in range(5):  # .2 - .6: not .0 (network), .1 (bridge), .7 (broadcast)
        got.append(net.allocate(taken))
        taken.add(got[-1])
    assert got == [f"10.231.0.{i}" for i in range(2, 7)]
    with pytest.raises(AddressesExhausted, match="no free container address in 10.231.0.0/29"):
        net.allocate(taken)
    taken.discard("10.231.0.4")  # released
    assert net.allocate(taken) == "10.231.0.4"
    # Stray entries (other subnets, garbage) do not matter.
    assert net.allocate({"10.231.0.2", "192.168.1.3", "nonsense"}) == "10.231.0.3"
    with pytest.raises(ValueError):
        NetworkConfig(bridge="far-too-long-name0")
    with pytest.raises(ValueError):
        NetworkConfig(subnet="10.231.0.1/24")
    with pytest.raises(ValueError):
        NetworkConfig(subnet="fd00::/64")
    assert veth_name("cnt-abcdefghijkl") == "sh-abcdefghijkl"
    assert len(veth_name("some-other-id-format-entirely")) == 15


async def test_attach_detach_timings(net: HostNetwork, boxes: tuple[Box, Box]) -> None:
    a, _ = boxes
    attach_ms, detach_ms = [], []
    for i in range(20):
        cid = f"cnt-timing{i:06d}"
        t0 = time.perf_counter()
        await net.attach(container_id=cid, pid=a.pid, ip=f"10.231.0.{10 + i}")
        t1 = time.perf_counter()
        await net.detach(container_id=cid)
        t2 = time.perf_counter()
        attach_ms.append((t1 - t0) * 1000)
        detach_ms.append((t2 - t1) * 1000)
    print(
        f"\nattach ms: median {statistics.median(attach_ms):.1f} min {min(attach_ms):.1f} max {max(attach_ms):.1f}"
        f"\ndetach ms: median {statistics.median(detach_ms):.1f} min {min(detach_ms):.1f} max {max(detach_ms):.1f}"
        f"\nattach: {' '.join(f'{x:.1f}' for x in attach_ms)}"
        f"\ndetach: {' '.join(f'{x:.1f}' for x in detach_ms)}"
    )
    assert net.leftovers() == []


async def test_veth_goes_with_the_namespace(net: HostNetwork) -> None:
    box = start_box("short-lived")
    try:
        await net.attach(container_id=box.container_id, pid=box.pid, ip="10.231.0.2")
        assert net.leftovers() == [veth_name(box.container_id)]
    finally:
        stop_box(box)
    # The kernel deletes the pair once the namespace is gone (asynchronously).
    deadline = time.monotonic() + 10
    while net.leftovers() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert net.leftovers() == []
    await net.detach(container_id=box.container_id)  # nothing to do, no error
