"""What a student's code can try from inside a container, and how it is stopped.

Each test creates real containers through the Hub (local backend, root) and
runs the attempt inside through the Hub's ExecService (the container's agent
starts it), so these processes carry the container's uid, cgroups,
namespaces, seccomp filter and no capabilities. Network probes go only to the
containers' own addresses and to this host's loopback.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import Services, auth, container_host_pids
from tests.container_shell import BB, ContainerShell

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


async def create(services: Services, **resources: int) -> pb.Container:
    response = await services.hub_stub.CreateContainer(
        pb.CreateContainerRequest(resources=pb.Resources(**resources), ports=[pb.Port(port=8000)],
                                  wait_until_running=True),
        metadata=auth("key-a"),
    )
    assert response.container.state == pb.CONTAINER_STATE_RUNNING, response.container.state_message
    return response.container


def host_pids_of(pid_ns: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}/ns/pid").st_ino == pid_ns:
                    found.append(int(name))
            except OSError:
                pass
    return found


def host_uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


async def test_files_processes_and_signals_of_another_container(services: Services, shell: ContainerShell) -> None:
    a, b = await create(services), await create(services)
    exit_a, _ = await shell.sh(a.container_id, "echo secret-of-a > /work/secret && chmod 600 /work/secret")
    assert exit_a.exit_code == 0
    # B has its own /work and /tmp, and sees no process but its own.
    exit_b, out = await shell.sh(b.container_id, "cat /work/secret")
    assert "secret-of-a" not in out and exit_b.exit_code != 0
    exit_b, out = await shell.sh(b.container_id, f"exec {BB} ps -o pid,args")
    rows = [line.split(None, 1)[1] for line in out.strip().splitlines()[1:]]
    # Its own init (the agent) and this ps: nothing of A's, nothing of the host's.
    assert len(rows) == 2 and rows[0].startswith("/.sandhub/sandhub-agent ") and "ps" in rows[1], out
    pid_ns_a = os.stat(f"/proc/{next(iter(host_pids_of_container(a.container_id)))}/ns/pid").st_ino
    a_host_pids = host_pids_of(pid_ns_a)
    assert a_host_pids
    # A's processes are invisible to B, by host pid and through /proc.
    for pid in a_host_pids:
        exit_b, out = await shell.sh(b.container_id, f"kill -0 {pid} 2>&1; ls /proc/{pid}/root/work 2>&1")
        assert "secret" not in out
    # Each container has its own unprivileged host uid: even a process that
    # could see A's (a shared mount, a leaked pid) can neither signal nor read it.
    uid_a, uid_b = host_uid_of(a_host_pids[0]), host_uid_of(host_pids_of_container(b.container_id)[0])
    assert uid_a != uid_b and uid_a >= 200000 and uid_b >= 200000
    as_b = ["setpriv", f"--reuid={uid_b}", f"--regid={uid_b}", "--clear-groups", "--"]
    kill = subprocess.run([*as_b, "kill", "-0", str(a_host_pids[0])], capture_output=True, text=True)
    assert kill.returncode != 0 and "not permitted" in kill.stderr
    read = subprocess.run([*as_b, "cat", f"/proc/{a_host_pids[0]}/root/work/secret"], capture_output=True, text=True)
    assert read.returncode != 0 and "secret-of-a" not in read.stdout


def host_pids_of_container(container_id: str) -> list[int]:
    return container_host_pids(container_id)


async def test_network_other_container_and_host_loopback(services: Services, shell: ContainerShell) -> None:
    a, b = await create(services), await create(services)
    assert a.network.ip_address and b.network.ip_address and a.network.ip_address != b.network.ip_address
    assert [e.address for e in a.network.endpoints] == [f"{a.network.ip_address}:8000"]
    await shell.start(a.container_id, "nc", (BB, "nc", "-ll", "-p", "8000", "-e", BB, "echo", "hi"))
    # The host reaches A at its address...
    for _ in range(100):
        try:
            with socket.create_connection((a.network.ip_address, 8000), timeout=1) as s:
                assert s.recv(10) == b"hi\n"
            break
        except OSError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the host could not reach the container's server")
    # ...B does not, nor a server on the host's loopback or the bridge address.
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    host_port = listener.getsockname()[1]
    gateway = a.network.ip_address.rsplit(".", 1)[0] + ".1"
    try:
        for target in (f"{a.network.ip_address} 8000", f"127.0.0.1 {host_port}", f"{gateway} {host_port}"):
            exit_b, out = await shell.sh(b.container_id, f"{BB} nc -w 2 {target} </dev/null && echo CONNECTED")
            assert "CONNECTED" not in out and "hi" not in out, (target, out)
    finally:
        listener.close()


async def test_http_server_inside_is_reached_at_the_reported_address(
    services: Services, shell: ContainerShell
) -> None:
    c = await create(services)
    exit_, _ = await shell.sh(c.container_id, "mkdir -p /work/site && echo '<h1>student app</h1>' > /work/site/index.html")
    assert exit_.exit_code == 0
    await shell.start(c.container_id, "web", (BB, "httpd", "-f", "-p", "8000", "-h", "/work/site"))
    url = f"http://{c.network.endpoints[0].address}/index.html"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=2) as r:
            return str(r.read().decode())

    for _ in range(100):
        try:
            assert await asyncio.to_thread(fetch) == "<h1>student app</h1>\n"
            break
        except OSError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail(f"no answer from {url}")


async def test_python_http_server_does_not_stall_on_dns(services: Services, shell: ContainerShell) -> None:
    """http.server looks up its own name at start; without egress that lookup
    must fail at once (rejected), not hang for the resolver's timeout."""
    c = await create(services)
    await shell.start(c.container_id, "py", ("python3", "-m", "http.server", "8000"))
    url = f"http://{c.network.ip_address}:8000/"
    for _ in range(60):  # 3 s; a stalled lookup takes 20
        try:
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=1).read())
            break
        except OSError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("python -m http.server did not answer")
    assert b"Directory listing" in body


async def test_fork_bomb_hits_only_its_own_pids_limit(services: Services, shell: ContainerShell) -> None:
    bomb, other = await create(services, pids=64), await create(services)
    exit_, out = await shell.sh(
        bomb.container_id,
        # 200 background sleeps want 200 processes; the limit is 64.
        f"i=0; while [ $i -lt 200 ]; do {BB} sleep 30 >/dev/null 2>&1 & i=$((i+1)); done 2>&1; echo spawned",
    )
    assert "Resource temporarily unavailable" in out or "can't fork" in out, out
    events = [*Path("/sys/fs/cgroup").glob(f"pids/sandhub/*/{bomb.container_id}/pids.events"),  # v1
              *Path("/sys/fs/cgroup").glob(f"sandhub/*/{bomb.container_id}/pids.events")]  # v2
    assert len(events) == 1 and int(events[0].read_text().split()[1]) > 0
    exit_o, out_o = await shell.sh(other.container_id, "echo still-fine")
    assert exit_o.exit_code == 0 and out_o.strip() == "still-fine"


async def test_memory_bomb_is_oom_killed_inside_and_reported(services: Services, shell: ContainerShell) -> None:
    bomb, other = await create(services, memory_mib=64), await create(services)
    exit_, _ = await shell.sh(bomb.container_id, "python3 -c 'b = bytearray(256 * 1024 * 1024); print(len(b))'")
    assert exit_.signal_number == 9 or exit_.exit_code == 137, exit_
    for _ in range(100):  # the OOM watcher looks every second
        got = (await services.hub_stub.GetContainer(pb.GetContainerRequest(container_id=bomb.container_id), metadata=auth("key-a"))).container
        if got.state_reason == "OOMKilled":
            break
        await asyncio.sleep(0.05)
    assert got.state_reason == "OOMKilled" and got.state == pb.CONTAINER_STATE_RUNNING, got
    assert "64 MiB" in got.state_message
    # The container itself, and its neighbour, go on.
    assert (await shell.sh(bomb.container_id, "echo alive"))[1].strip() == "alive"
    assert (await shell.sh(other.container_id, "echo alive"))[1].strip() == "alive"


async def test_disk_fill_is_capped(services: Services, shell: ContainerShell) -> None:
    c = await create(services, disk_mib=64)
    exit_, out = await shell.sh(c.container_id, f"{BB} dd if=/dev/zero of=/work/big bs=1M count=500 2>&1; {BB} du -m /work/big")
    assert exit_.exit_code == 0  # du ran
    assert "No space left on device" in out, out
    assert int(out.strip().splitlines()[-1].split()[0]) <= 32  # /work is half the disk


async def test_module_loading_mounting_and_privileges_are_refused(services: Services, shell: ContainerShell) -> None:
    c = await create(services)
    attempts = {
        "mount": f"{BB} mount -t tmpfs none /work",
        "insmod": f"{BB} insmod /work/none.ko",
        "write root": "echo x > /etc/sandhub-test",
        "chroot": f"{BB} chroot / true",
        "unshare": f"{BB} unshare -r true",
    }
    for name, cmd in attempts.items():
        exit_, out = await shell.sh(c.container_id, f"{cmd} 2>&1")
        assert exit_.exit_code != 0, (name, out)
    status = (await shell.sh(c.container_id, "cat /proc/self/status"))[1]
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["CapEff"].strip() == "0000000000000000"
    assert fields["CapBnd"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"
    assert not Path("/etc/sandhub-test").exists()


async def test_egress_is_granted_per_placement_by_configuration(services: Services, shell: ContainerShell) -> None:
    """The test config lets placement "internet" reach beyond the host: such a
    container gets a default route and a place in the firewall's egress set;
    a default one has neither (and so fails at once, ENETUNREACH)."""
    plain = await create(services)
    online = (await services.hub_stub.CreateContainer(
        pb.CreateContainerRequest(placement="internet", wait_until_running=True), metadata=auth("key-a"))).container
    routes = {c.container_id: (await shell.sh(c.container_id, f"{BB} ip route"))[1] for c in (plain, online)}
    assert "default via" not in routes[plain.container_id] and "default via" in routes[online.container_id], routes
    table = f"sandhub_{services.network.bridge}"
    members = subprocess.run(["nft", "list", "set", "inet", table, "egress"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    assert online.network.ip_address in members and plain.network.ip_address not in members
    _, out = await shell.sh(plain.container_id, f"{BB} nc -w 2 192.0.2.1 80 </dev/null 2>&1; echo rc=$?")
    assert "unreachable" in out.lower(), out  # refused by the kernel at once: nothing left the host
    await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=online.container_id), metadata=auth("key-a"))
    for _ in range(100):
        members = subprocess.run(["nft", "list", "set", "inet", table, "egress"], capture_output=True, text=True,
                                 check=True, timeout=60).stdout
        if online.network.ip_address not in members:
            break
        await asyncio.sleep(0.05)
    assert online.network.ip_address not in members  # the next holder of that address gets no egress


async def test_create_works_with_over_1024_fds_open_and_limits_open_files(
    services: Services, shell: ContainerShell
) -> None:
    """With ~1,000 containers the orchestrator holds over 1,024 fds, so the fds
    handed to a new sandbox are numbered above the container's open-files
    limit; applying that limit before bwrap made the init (then a shell) fail silently."""
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        c = await create(services, open_files=200)
    finally:
        for fd in held:
            os.close(fd)
    _, out = await shell.sh(c.container_id, "ulimit -n; ulimit -Hn")
    assert out.split() == ["200", "200"]
    # The container's init, the agent (it sets the limit for itself and what it starts).
    init = [p for p in host_pids_of_container(c.container_id)
            if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"/.sandhub/sandhub-agent\0")]
    assert "Max open files            200                  200" in Path(f"/proc/{init[0]}/limits").read_text()
