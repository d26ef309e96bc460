"""More containers than one bridge has ports, each with its own routed address (network.py, veth.py).

One Linux bridge holds at most 1,024 ports, so the old design failed every
create from about the 1,020th container on. Here:

- 1,100 network namespaces (``unshare --net`` processes, as in
  test_network.py) are attached to one HostNetwork: every one is reached from
  the host at its address, and two at the far ends of the range, one of them
  with egress (a default route, so its packets do reach the host's routing),
  still cannot reach each other.
- Containers made through the real Hub and Orchestrator are routed (no
  bridge port), each serves HTTP to the host, none reaches another, egress
  placements included; a delete releases the veth, route and address.
- An Orchestrator restarted over running containers adopts them with their
  addresses and routes, and the next container gets a fresh address.

All traffic stays on this host: the host and namespaces made here.
Only processes started here are killed, by pid.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from orchestrator_service.backends.local.network import HostNetwork, NetworkConfig, veth_name
from orchestrator_service.backends.local.veth import mac_of
from orchestrator_service.server import start_orchestrator
from sandhub.bench.capacity import reached
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import PrivateNetwork, Services, auth, orchestrator_channel, orchestrator_config, traversable
from tests.container_shell import BB, ContainerShell
from tests.integration.test_network import OUT_FAR_IP, Box, fetch_from_host, outside, probe, start_box, stop_box

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]
__all__ = ["outside"]  # a fixture of test_network.py used here

NAME = "shscale0"
SUBNET = "10.233.0.0/21"  # 2,046 addresses
MANY = 1100
"""More than a bridge's 1,024 ports."""


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture
def exclusive() -> Iterator[None]:
    with open("/tmp/sandhub-test-network-scale.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture
def ip_forward() -> Iterator[None]:
    """On during the test, so only the firewall stops container-to-container
    forwarding; restored afterwards."""
    path = "/proc/sys/net/ipv4/ip_forward"
    before = Path(path).read_text().strip()
    Path(path).write_text("1")
    try:
        yield
    finally:
        Path(path).write_text(before)


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """MANY processes, each alone in a network namespace of its own."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(MANY):
            procs.append(subprocess.Popen(["unshare", "--net", "--", "sleep", "600"], stdin=subprocess.DEVNULL))
        # unshare execs sleep in the new namespace: wait until each has.
        host_ns = os.stat("/proc/self/ns/net").st_ino
        for p in procs:
            for _ in range(200):
                if os.stat(f"/proc/{p.pid}/ns/net").st_ino != host_ns:
                    break
                time.sleep(0.01)
            else:
                pytest.fail(f"pid {p.pid} never left the host's network namespace")
        yield procs
    finally:
        for p in procs:
            p.kill()  # by pid: only the processes started here
        for p in procs:
            p.wait(timeout=30)


async def test_more_containers_than_a_bridge_has_ports(
    exclusive: None, ip_forward: None, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    net = HostNetwork(NetworkConfig(bridge=NAME, subnet=SUBNET))
    await net.teardown()  # whatever an interrupted earlier run left
    await net.setup()
    first, last = start_box("first"), start_box("last")
    try:
        taken: set[str] = set()
        first.ip = net.allocate(taken)
        taken.add(first.ip)
        await net.attach(container_id=first.container_id, pid=first.pid, ip=first.ip, egress=True)
        addresses = []
        for i, p in enumerate(sleepers):
            address = net.allocate(taken)
            taken.add(address)
            await net.attach(container_id=f"cnt-scale{i:07d}", pid=p.pid, ip=address)
            addresses.append(address)
        last.ip = net.allocate(taken)
        await net.attach(container_id=last.container_id, pid=last.pid, ip=last.ip)
        assert len(net.leftovers()) == MANY + 2
        assert not os.listdir(f"/sys/class/net/{NAME}/brif")  # nothing on the bridge: each veth is routed

        # Every one answers the host at its own address.
        results = await asyncio.gather(*(reached(a) for a in addresses))
        assert results.count(True) == MANY, [a for a, ok in zip(addresses, results) if not ok][:10]
        assert await fetch_from_host(first.ip) == "hello from first"
        assert await fetch_from_host(last.ip) == "hello from last"

        # The first has egress (a default route): its packets to the last do
        # reach the host's routing, and the firewall drops them; the last
        # has no route at all. Neither reaches the other, nor the host.
        assert "default via" in subprocess.run(
            ["nsenter", f"--net=/proc/{first.pid}/ns/net", "ip", "route"], capture_output=True, text=True, check=True
        ).stdout
        outcomes = await asyncio.gather(probe(first, last.ip), probe(last, first.ip),
                                        probe(first, addresses[500], 9), probe(first, net.gateway, 22))
        assert not any(o.startswith("ok") or o == "refused" for o in outcomes), outcomes
        # ...and it is the container-to-container rule that dropped them.
        chain = subprocess.run(["nft", "list", "chain", "inet", f"sandhub_{NAME}", "forward"],
                               capture_output=True, text=True, check=True).stdout
        dropped = re.search(r"counter packets (\d+) .*no container to container", chain)
        assert dropped and int(dropped.group(1)) > 0, chain
    finally:
        stop_box(first)
        stop_box(last)
        await net.teardown()
    assert not os.path.exists(f"/sys/class/net/{NAME}") and net.leftovers() == []
    assert SUBNET.rsplit(".", 1)[0] not in ip("route")


async def create(services: Services, placement: str = "") -> pb.Container:
    response = await services.hub_stub.CreateContainer(
        pb.CreateContainerRequest(placement=placement, ports=[pb.Port(port=8000)], wait_until_running=True),
        metadata=auth("key-a"),
    )
    container: pb.Container = response.container
    assert container.state == pb.CONTAINER_STATE_RUNNING, container.state_message
    return container


async def serve(shell: ContainerShell, c: pb.Container) -> None:
    """busybox httpd inside ``c`` answering with its id, reached from the host."""
    exit_, _ = await shell.sh(c.container_id, f"mkdir -p /work/site && echo {c.container_id} > /work/site/index.html")
    assert exit_.exit_code == 0
    await shell.start(c.container_id, "web", (BB, "httpd", "-f", "-p", "8000", "-h", "/work/site"))
    for _ in range(100):
        if await http_get(c.network.ip_address) == c.container_id:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"the host could not reach {c.container_id} at {c.network.ip_address}:8000")


async def http_get(address: str) -> str:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, 8000), 2)
    except (OSError, asyncio.TimeoutError):
        return ""
    try:
        writer.write(b"GET /index.html HTTP/1.0\r\n\r\n")
        body = await asyncio.wait_for(reader.read(), 2)
        return body.decode(errors="replace").rsplit("\r\n\r\n", 1)[-1].strip()
    finally:
        writer.close()


async def test_containers_through_the_hub_are_routed_reachable_and_isolated(
    services: Services, shell: ContainerShell, ip_forward: None
) -> None:
    made = [await create(services), await create(services), await create(services, "internet"),
            await create(services, "internet")]
    for c in made:
        await serve(shell, c)
        veth = veth_name(c.container_id)
        assert not os.path.exists(f"/sys/class/net/{veth}/master")  # no bridge port: routed
        assert veth in ip("route", "show", f"{c.network.ip_address}/32")
    # No container reaches another, egress placements (default route via the host) included.
    for c in made:
        targets = " ".join(o.network.ip_address for o in made if o.container_id != c.container_id)
        _, out = await shell.sh(c.container_id, f"for t in {targets}; do {BB} nc -w 2 $t 8000 </dev/null && echo REACHED $t; "
                                        f"{BB} wget -q -T 2 -O - http://$t:8000/index.html && echo REACHED $t; done; true")
        assert "REACHED" not in out and not any(o.container_id in out for o in made), (c.container_id, out)

    # A delete releases the veth, its route and the address; the next container gets it and works.
    gone = made[1]
    await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=gone.container_id), metadata=auth("key-a"))
    for _ in range(200):
        got = await services.hub_stub.GetContainer(pb.GetContainerRequest(container_id=gone.container_id), metadata=auth("key-a"))
        if got.container.state == pb.CONTAINER_STATE_TERMINATED:
            break
        await asyncio.sleep(0.05)
    assert not os.path.exists(f"/sys/class/net/{veth_name(gone.container_id)}")
    assert ip("route", "show", f"{gone.network.ip_address}/32").strip() == ""
    again = await create(services)
    assert again.network.ip_address == gone.network.ip_address
    await serve(shell, again)


async def test_a_restarted_orchestrator_adopts_routed_containers(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (CI runs as root)")
    net = PrivateNetwork.new()
    traversable(tmp_path)
    config = orchestrator_config(tmp_path, net)
    orch = await start_orchestrator(config)
    try:
        channel = orchestrator_channel(orch.port)
        stub = pb_grpc.OrchestratorServiceStub(channel)
        made = [(await stub.CreateContainer(pb.CreateContainerRequest(wait_until_running=True))).container
                for _ in range(3)]
        assert all(c.state == pb.CONTAINER_STATE_RUNNING for c in made)
        assert all([await reached(c.network.ip_address) for c in made])
        await channel.close()
        await orch.stop(0)

        orch = await start_orchestrator(config)
        channel = orchestrator_channel(orch.port)
        stub = pb_grpc.OrchestratorServiceStub(channel)
        for c in made:
            got = (await stub.GetContainer(pb.GetContainerRequest(container_id=c.container_id))).container
            assert got.state == pb.CONTAINER_STATE_RUNNING and got.network.ip_address == c.network.ip_address
            assert await reached(c.network.ip_address)
            assert veth_name(c.container_id) in ip("route", "show", f"{c.network.ip_address}/32")
        fresh = (await stub.CreateContainer(pb.CreateContainerRequest(wait_until_running=True))).container
        assert fresh.network.ip_address not in {c.network.ip_address for c in made}
        assert await reached(fresh.network.ip_address)
        for c in [*made, fresh]:
            await stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id))
        for _ in range(200):
            listed = (await stub.ListContainers(pb.ListContainersRequest(page_size=100))).containers
            if all(c.state == pb.CONTAINER_STATE_TERMINATED for c in listed):
                break
            await asyncio.sleep(0.05)
        await channel.close()
    except grpc.aio.AioRpcError as e:
        pytest.fail(f"{e.code()}: {e.details()}")
    finally:
        await orch.stop(0)
        await net.teardown()
    assert not [v for v in os.listdir("/sys/class/net") if v.startswith("sh-") and
                Path(f"/sys/class/net/{v}/ifalias").read_text().startswith(f"sandhub:{net.bridge}:")]



@pytest.fixture
def network_lock() -> Iterator[None]:
    """test_network.py's lock: the "outside" namespace's names and addresses are fixed."""
    with open("/tmp/sandhub-test-network.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


async def test_a_container_cannot_borrow_another_ones_address_for_egress(
    exclusive: None, network_lock: None, ip_forward: None, outside: Box
) -> None:
    """Every container pair meets at the host's routing, so a container that
    could set its own source address (root inside its namespace, as these
    boxes are) might pass for another one with egress: the reverse-path rule
    drops whatever does not come from the sender's own address."""
    net = HostNetwork(NetworkConfig(bridge=NAME, subnet=SUBNET))
    await net.teardown()
    await net.setup()
    a, b = start_box("a"), start_box("b")
    try:
        a.ip, b.ip = "10.233.0.2", "10.233.0.3"
        await net.attach(container_id=a.container_id, pid=a.pid, ip=a.ip)
        await net.attach(container_id=b.container_id, pid=b.pid, ip=b.ip, egress=True)
        assert await probe(b, OUT_FAR_IP) == "ok:hello from outside"
        assert not (await probe(a, OUT_FAR_IP)).startswith("ok")
        # A takes B's address as its own and routes everything via the gateway.
        subprocess.run(["nsenter", f"--net=/proc/{a.pid}/ns/net", "ip", "-batch", "-"], check=True, text=True,
                       input=f"addr flush dev eth0\naddr add {b.ip} peer {net.gateway}/32 dev eth0\n"
                             # (the last address gone took the gateway's neighbour entry with it)
                             f"neigh replace {net.gateway} lladdr {mac_of(ipaddress.IPv4Address(net.gateway))} "
                             f"dev eth0 nud permanent\n"
                             f"route add default via {net.gateway} dev eth0\n", timeout=10)
        assert not (await probe(a, OUT_FAR_IP)).startswith("ok")
        chain = subprocess.run(["nft", "list", "chain", "inet", f"sandhub_{NAME}", "prerouting"],
                               capture_output=True, text=True, check=True).stdout
        dropped = re.search(r"counter packets (\d+) .*not the container's own address", chain)
        assert dropped and int(dropped.group(1)) > 0, chain
    finally:
        stop_box(a)
        stop_box(b)
        await net.teardown()
