"""The local backend runs sandhub-agent as each container's pid 1 (issue 14).

Real servers (the `services` fixture: local backend, root), calls through the
Hub's ExecService, which relays them to the agent over its unix socket. What
the agent starts is the container's by construction: its cgroup (so pids.max
stops a fork bomb inside), its unprivileged host uid, its namespaces.
"""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from orchestrator_service.server import start_orchestrator
from sandhub import internal_auth, rpc
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.internal.v1 import agents_pb2 as apb
from sandhub.internal.v1 import agents_pb2_grpc as apb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import (ORCHESTRATOR_TOKEN, PrivateNetwork, Services, auth, container_host_pids,
                            orchestrator_channel, orchestrator_config, traversable)

pytestmark = pytest.mark.root
A = auth("key-a")


async def create(services: Services, **resources: int) -> pb.Container:
    made = await services.hub_stub.CreateContainer(
        pb.CreateContainerRequest(resources=pb.Resources(**resources), wait_until_running=True), metadata=A)
    assert made.container.state == pb.CONTAINER_STATE_RUNNING, made.container.state_message
    return made.container


async def sh(ex: xpb_grpc.ExecServiceStub, cid: str, script: str) -> xpb.RunResponse:
    return await ex.Run(xpb.RunRequest(container_id=cid, command=xpb.Command(shell=script),
                                       timeout=duration_pb2.Duration(seconds=30)), metadata=A)


async def endpoint(port: int, cid: str, *, tenant: str = "tenant-a") -> apb.GetAgentEndpointResponse:
    async with orchestrator_channel(port) as channel:
        return await apb_grpc.AgentDirectoryServiceStub(channel).GetAgentEndpoint(
            apb.GetAgentEndpointRequest(container_id=cid), metadata=((rpc.TENANT_KEY, tenant),) if tenant else ())


def host_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


async def test_the_agent_is_pid_1_and_its_commands_are_the_containers(services: Services) -> None:
    ex = xpb_grpc.ExecServiceStub(services.hub_channel)
    c = await create(services)
    r = await sh(ex, c.container_id, "echo $PPID; tr '\\0' ' ' </proc/1/cmdline")
    ppid, pid1 = r.stdout.decode().splitlines()
    assert ppid == "1" and pid1.startswith("/.sandhub/sandhub-agent ")
    # On the host: the agent (the sandbox's pid-1) and the command share the
    # container's cgroups and its unprivileged uid.
    pids = container_host_pids(c.container_id)
    agent = [p for p in pids if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"/.sandhub/sandhub-agent\0")]
    assert len(agent) == 1
    uid = host_status(agent[0])["Uid"].split()[0]
    assert int(uid) >= services.orchestrator.config.local.uid_base
    cgroups = Path(f"/proc/{agent[0]}/cgroup").read_text()
    assert c.container_id in cgroups
    # A command seen from the host while it runs: same cgroups, same uid.
    run = asyncio.ensure_future(sh(ex, c.container_id, "exec sleep 3"))
    for _ in range(200):
        sleepers = [p for p in container_host_pids(c.container_id)
                    if Path(f"/proc/{p}/cmdline").read_bytes() == b"sleep\x003\x00"]
        if sleepers:
            break
        await asyncio.sleep(0.02)
    assert sleepers, "the command did not show up"
    assert Path(f"/proc/{sleepers[0]}/cgroup").read_text() == cgroups
    assert host_status(sleepers[0])["Uid"].split()[0] == uid
    assert host_status(sleepers[0])["Seccomp"] == "2"  # the container's filter
    run.cancel()


async def test_commands_inherit_no_descriptor_but_their_stdio(services: Services) -> None:
    """Nothing of the launch (bwrap's stderr pipe, the agent's socket, token or
    env memfds) is open in a command: only 0, 1 and 2."""
    ex = xpb_grpc.ExecServiceStub(services.hub_channel)
    c = await create(services)
    r = await sh(ex, c.container_id, "ls /proc/$$/fd")  # the shell's own, listed by a child
    assert r.stdout.decode().split() == ["0", "1", "2"], r.stdout


async def test_pids_max_stops_a_fork_bomb_and_the_agent_goes_on(services: Services) -> None:
    ex = xpb_grpc.ExecServiceStub(services.hub_channel)
    bomb, other = await create(services, pids=64), await create(services)
    r = await sh(ex, bomb.container_id,
                 "i=0; while [ $i -lt 200 ]; do /.sandhub/busybox sleep 30 >/dev/null 2>&1 & i=$((i+1)); done 2>&1; "
                 "echo spawned")
    out = (r.stdout + r.stderr).decode()
    assert "Resource temporarily unavailable" in out or "fork" in out.lower(), out  # dash: "Cannot fork"
    events = [*Path("/sys/fs/cgroup").glob(f"pids/sandhub/*/{bomb.container_id}/pids.events"),  # v1
              *Path("/sys/fs/cgroup").glob(f"sandhub/*/{bomb.container_id}/pids.events")]  # v2
    assert len(events) == 1 and int(events[0].read_text().split()[1]) > 0
    # The Run ended with its command, and its group (the sleeps) with it: the
    # agent serves this container again, and the other one all along.
    for cid in (bomb.container_id, other.container_id):
        for _ in range(100):
            try:
                r = await sh(ex, cid, "echo still-fine")
                break
            except grpc.aio.AioRpcError as e:  # the sleeps may take a moment to go
                assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, e
                await asyncio.sleep(0.05)
        assert r.stdout == b"still-fine\n"


async def test_the_socket_is_roots_and_goes_with_the_container(services: Services) -> None:
    c = await create(services)
    ep = await endpoint(services.orchestrator.port, c.container_id)
    assert ep.backend == "local" and ep.state == pb.CONTAINER_STATE_RUNNING and ep.target.startswith("unix:/")
    sock = Path(ep.target.removeprefix("unix:"))
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700 and sock.parent.stat().st_uid == 0
    # Inside, nothing names it: the agent got it as an open fd.
    ex = xpb_grpc.ExecServiceStub(services.hub_channel)
    r = await sh(ex, c.container_id, f"ls -d {sock.parent} 2>&1; cat /proc/1/cmdline | tr '\\0' ' '")
    assert str(sock) not in r.stdout.decode().split("\n")[0] or b"No such file" in r.stdout
    assert b"--listen fd:" in r.stdout
    await services.hub_stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id), metadata=A)
    for _ in range(200):
        if not sock.exists():
            break
        await asyncio.sleep(0.02)
    assert not sock.exists()


async def test_the_hub_does_not_serve_the_directory(services: Services) -> None:
    c = await create(services)
    stub = apb_grpc.AgentDirectoryServiceStub(services.hub_channel)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetAgentEndpoint(apb.GetAgentEndpointRequest(container_id=c.container_id), metadata=A)
    assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_agents_outlive_an_orchestrator_restart_and_orphans_go(tmp_path: Path) -> None:
    """An Orchestrator of its own (the restart must not touch the fixture's)."""
    net = PrivateNetwork.new()
    traversable(tmp_path)
    config = orchestrator_config(tmp_path, net)
    orch = await start_orchestrator(config)
    try:
        async with orchestrator_channel(orch.port) as channel:
            made = await pb_grpc.OrchestratorServiceStub(channel).CreateContainer(
                pb.CreateContainerRequest(wait_until_running=True))
        cid = made.container.container_id
        ep = await endpoint(orch.port, cid, tenant="")
        sock = Path(ep.target.removeprefix("unix:"))
        orphan = sock.with_name("cnt-orphan000000.sock")
        orphan.touch()
        # The restart: the first Orchestrator stops (its containers run on), a
        # new one with the same state adopts them and removes what no container owns.
        await orch.stop(0)
        orch = await start_orchestrator(config)
        assert not orphan.exists() and sock.exists()
        # Still listening, on the same socket; the credential is the
        # Orchestrator token's derivation, nothing kept in memory.
        assert (await endpoint(orch.port, cid, tenant="")).target == ep.target
        token = internal_auth.agent_token(internal_auth.agent_key(ORCHESTRATOR_TOKEN), cid)
        nonce = internal_auth.new_agent_nonce()
        async with grpc.aio.insecure_channel(ep.target) as channel:
            call = xpb_grpc.ExecServiceStub(channel).Run(
                xpb.RunRequest(container_id=cid, command=xpb.Command(argv=["echo", "adopted"])),
                metadata=internal_auth.agent_call_metadata(token, "/sandhub.exec.v1.ExecService/Run", nonce))
            assert (await call).stdout == b"adopted\n"
            header = dict(await call.initial_metadata())
        assert internal_auth.proof_ok(token, nonce, header[internal_auth.AGENT_PROOF_KEY])
        await orch.containers.delete(cid, tenant=None, grace_period_s=0)
        for _ in range(500):
            if (await orch.containers.get(cid, tenant=None)).state.value == "TERMINATED":
                break
            await asyncio.sleep(0.02)
        assert not sock.exists()
    finally:
        await orch.stop(0)
        await net.teardown()
