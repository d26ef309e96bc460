"""The exec agent on Kubernetes, end to end: Hub (relaying ExecService) ->
Orchestrator (kubernetes backend, AgentDirectoryService) -> REAL kube-apiserver
+ KWOK; then the Hub -> a REAL sandhub-agent process at the pod's IP and the
agent port. KWOK runs no containers: the test starts the agent with the
command and environment stored in the pod, listening on the pod IP KWOK gave
(a loopback address from the node's podCIDR, conftest.py)."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from kubernetes import client

from hub_service.server import RunningHub, start_hub
from orchestrator_service.backends.kubernetes import objects as o
from orchestrator_service.server import RunningOrchestrator, start_orchestrator
from sandhub import internal_auth, rpc
from sandhub.config import HubConfig
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.internal.v1 import agents_pb2, agents_pb2_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import KEYS, ORCHESTRATOR_TOKEN, orchestrator_channel
from tests.integration.test_exec import A, get, put, run
from tests.kubernetes.agent_process import ListeningAgent, free_port, start_agent_as
from tests.kubernetes.conftest import POD_CIDR
from tests.kubernetes.control_plane import ControlPlane
from tests.kubernetes.helpers import AGENT_KEY
from tests.kubernetes.test_orchestrator import orchestrator_config

pytestmark = pytest.mark.kubernetes


@dataclass
class Cluster:
    orchestrator: RunningOrchestrator
    hub: RunningHub
    channel: grpc.aio.Channel
    kube: client.ApiClient
    namespace: str
    agent_port: int
    root: Path
    agents: list[ListeningAgent]

    @property
    def exec(self) -> xpb_grpc.ExecServiceStub:
        return xpb_grpc.ExecServiceStub(self.channel)

    async def create(self) -> pb.Container:
        created = await pb_grpc.OrchestratorServiceStub(self.channel).CreateContainer(
            pb.CreateContainerRequest(wait_until_running=True, labels={"app": "web"}), metadata=A)
        assert created.container.state == pb.CONTAINER_STATE_RUNNING
        return created.container

    def pod(self, cid: str) -> client.V1Pod:
        return client.CoreV1Api(self.kube).read_namespaced_pod(cid, self.namespace)

    async def start_pod_agent(self, cid: str) -> ListeningAgent:
        """What the pod's main container would run, from the stored pod."""
        pod = self.pod(cid)
        main, [init] = pod.spec.containers[0], pod.spec.init_containers
        env = {e.name: e.value for e in main.env}
        agent = await start_agent_as(list(main.command), env, ip=pod.status.pod_ip, port=self.agent_port,
                                     root=self.root / cid, install=init.command,
                                     install_env={e.name: e.value for e in init.env})
        # The main container runs the copy its init container installed.
        assert agent.binary == self.root / cid / "sandhub" / "sandhub-agent"
        self.agents.append(agent)
        return agent


@pytest.fixture
async def cluster(control_plane: ControlPlane, namespace: str, kube: client.ApiClient) -> AsyncIterator[Cluster]:
    port = free_port()
    config = orchestrator_config(control_plane, namespace)
    config = replace(config, reap_interval_s=5.0, kubernetes=replace(config.kubernetes, agent_port=port))
    orch = await start_orchestrator(config)
    hub = await start_hub(HubConfig(listen="127.0.0.1:0", orchestrator=f"127.0.0.1:{orch.port}", api_keys=KEYS,
                                    orchestrator_token=config.token))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}")
    c = Cluster(orch, hub, channel, kube, namespace, port, Path(tempfile.mkdtemp(prefix="sandhub-k8s-agent-")),
                [])
    yield c
    await channel.close()
    await hub.stop(0)
    await orch.stop(0)
    for agent in c.agents:
        await agent.stop()


async def test_the_pod_carries_the_agent_and_the_directory_gives_its_address(cluster: Cluster) -> None:
    container = await cluster.create()
    cid = container.container_id
    pod = cluster.pod(cid)
    [init] = pod.spec.init_containers
    # The init container (which exits) holds the credential and leaves it in
    # the state volume for the agent; the main container's environment never does.
    assert (init.name, init.command) == (o.AGENT_INIT, [
        "/sandhub-agent", "install", "--token-env", "SANDHUB_AGENT_TOKEN", "--token-file", "/run/sandhub/agent-token",
        "/sandhub/sandhub-agent"])
    assert {e.name: e.value for e in init.env} == {"SANDHUB_AGENT_TOKEN": internal_auth.agent_token(AGENT_KEY, cid)}
    assert {m.mount_path for m in init.volume_mounts} == {"/sandhub", "/run/sandhub"}
    volumes = {v.name: v for v in pod.spec.volumes}
    assert volumes[o.AGENT_VOLUME].empty_dir.medium == "Memory"
    main = pod.spec.containers[0]
    assert main.command == ["/sandhub/sandhub-agent", "--listen", f"tcp:0.0.0.0:{cluster.agent_port}",
                            "--state-dir", "/run/sandhub", "--token-file", "/run/sandhub/agent-token",
                            "--container-id", cid]
    mounts = {m.name: m for m in main.volume_mounts}
    assert (mounts[o.AGENT_VOLUME].mount_path, mounts[o.AGENT_VOLUME].read_only) == ("/sandhub", True)
    env = {e.name: e.value for e in main.env}
    assert "SANDHUB_AGENT_TOKEN" not in env
    assert main.readiness_probe.tcp_socket.port == cluster.agent_port
    # The caller never sees the credential.
    assert "SANDHUB_AGENT_TOKEN" not in container.env
    # The Orchestrator's directory names the pod's IP (loopback here) and the agent port.
    directory = agents_pb2_grpc.AgentDirectoryServiceStub(orchestrator_channel(cluster.orchestrator.port))
    got = await directory.GetAgentEndpoint(agents_pb2.GetAgentEndpointRequest(container_id=cid),
                                           metadata=((rpc.TENANT_KEY, "tenant-a"),))
    assert got.target == f"{pod.status.pod_ip}:{cluster.agent_port}" and got.backend == "kubernetes"
    assert got.target.startswith(POD_CIDR.split(".0.0/")[0] + ".")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await directory.GetAgentEndpoint(agents_pb2.GetAgentEndpointRequest(container_id=cid),
                                         metadata=((rpc.TENANT_KEY, "tenant-b"),))
    assert e.value.code() is grpc.StatusCode.NOT_FOUND


async def test_exec_files_and_background_processes_reach_the_pods_agent(cluster: Cluster) -> None:
    cid = (await cluster.create()).container_id
    agent = await cluster.start_pod_agent(cid)
    ex = cluster.exec
    r = await run(ex, cid, "echo", "hello from the pod")
    assert (r.exit_status.exit_code, r.stdout) == (0, b"hello from the pod\n")
    # The credential is in no file and no environment of the running container.
    token = internal_auth.agent_token(AGENT_KEY, cid).encode()
    assert token not in Path(f"/proc/{agent.process.pid}/environ").read_bytes()
    assert not (cluster.root / cid / "run" / "sandhub" / "agent-token").exists()
    # Files land in the agent's work dir (/work in a real pod).
    blob = bytes(range(256)) * 4096
    got = await put(ex, cid, {"app/main.py": b"print('hi')\n", "blob.bin": blob}, destination="up")
    assert got.files[1].sha256 == hashlib.sha256(blob).hexdigest()
    assert (agent.work / "up" / "app" / "main.py").read_bytes() == b"print('hi')\n"
    info, data = await get(ex, cid, "up/blob.bin")
    assert data == blob and info.size == len(blob)

    async def stdin() -> AsyncIterator[xpb.ExecRequest]:
        yield xpb.ExecRequest(start=xpb.ExecStart(container_id=cid, command=xpb.Command(argv=["cat"])))
        yield xpb.ExecRequest(stdin=b"typed ")
        yield xpb.ExecRequest(stdin=b"in")
        yield xpb.ExecRequest(close_stdin=xpb.CloseStdin())

    out = [m async for m in ex.Exec(stdin(), metadata=A)]
    assert b"".join(m.stdout for m in out) == b"typed in" and out[-1].exit_status.exit_code == 0

    started = await ex.StartProcess(xpb.StartProcessRequest(
        container_id=cid, process_id="web", command=xpb.Command(shell="echo up; sleep 0.2; echo down")), metadata=A)
    assert started.created
    chunks = [m async for m in ex.AttachProcess(xpb.AttachProcessRequest(container_id=cid, process_id="web",
                                                                         follow=True), metadata=A)]
    assert b"".join(m.stdout.data for m in chunks if m.WhichOneof("msg") == "stdout") == b"up\ndown\n"
    listed = await ex.ListProcesses(xpb.ListProcessesRequest(container_id=cid), metadata=A)
    assert [p.process_id for p in listed.processes] == ["web"]


async def test_an_agent_with_another_pods_credential_gets_no_call(cluster: Cluster) -> None:
    """A pod IP handed on to another container: whatever listens there without
    this container's credential can't prove it, so the Hub sends it nothing."""
    cid = (await cluster.create()).container_id
    pod = cluster.pod(cid)
    main = pod.spec.containers[0]
    [init] = pod.spec.init_containers
    env = {e.name: e.value for e in main.env}
    cluster.agents.append(await start_agent_as(
        list(main.command), env, ip=pod.status.pod_ip, port=cluster.agent_port, root=cluster.root / cid,
        install=init.command,
        install_env={"SANDHUB_AGENT_TOKEN": internal_auth.agent_token(AGENT_KEY, "cnt-someoneelse1")}))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await run(cluster.exec, cid, "echo", "secret")
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_a_pod_whose_agent_is_not_listening_is_unavailable(cluster: Cluster) -> None:
    cid = (await cluster.create()).container_id
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await run(cluster.exec, cid, "echo", "hi")
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
