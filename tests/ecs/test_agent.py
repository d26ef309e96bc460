"""The exec agent on ECS, end to end: Hub (relaying ExecService) ->
Orchestrator (ecs backend against moto on loopback, AgentDirectoryService);
then the Hub -> a REAL sandhub-agent process at the task's ENI address and
the agent port, started with the task definition's command and the
environment of the task's RunTask overrides.

moto runs no containers and gives ENIs random 10.x addresses whatever the
subnet's CIDR, so the test's client wrapper (helpers.RecordingEcs.loopback)
answers them as 127.x: the backend and the Orchestrator are the production
code, unchanged. What only a real AWS account shows is in deploy/ecs/README.md.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from hub_service.server import RunningHub, start_hub
from orchestrator_service.backends.base import Backend, Notify
from orchestrator_service.backends.ecs.backend import EcsBackend
from orchestrator_service.backends.ecs.client import EcsApi, new_ecs_client
from orchestrator_service.server import RunningOrchestrator, start_orchestrator
from sandhub import internal_auth, rpc
from sandhub.config import HubConfig
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.internal.v1 import agents_pb2, agents_pb2_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import KEYS, orchestrator_channel
from tests.ecs.helpers import AGENT_KEY, PLACEMENTS, RecordingEcs
from tests.ecs.moto_aws import CLUSTER, Aws
from tests.ecs.test_orchestrator import orchestrator_config
from tests.integration.test_exec import A, get, put, run
from tests.kubernetes.agent_process import ListeningAgent, free_port, start_agent_as


@dataclass
class Setup:
    aws: Aws
    orchestrator: RunningOrchestrator
    hub: RunningHub
    channel: grpc.aio.Channel
    agent_port: int
    root: Path
    agents: list[ListeningAgent]

    @property
    def exec(self) -> xpb_grpc.ExecServiceStub:
        return xpb_grpc.ExecServiceStub(self.channel)

    async def create(self) -> pb.Container:
        created = await pb_grpc.OrchestratorServiceStub(self.channel).CreateContainer(
            pb.CreateContainerRequest(wait_until_running=True, labels={"app": "web"}, env={"GREETING": "hi"}),
            metadata=A)
        assert created.container.state == pb.CONTAINER_STATE_RUNNING
        return created.container

    def task(self, cid: str) -> dict[str, Any]:
        [task] = [t for t in self.aws.tasks() if {x["key"]: x["value"] for x in t["tags"]}.get(
            "sandhub:container-id") == cid]
        return task

    async def start_task_agent(self, container: pb.Container) -> ListeningAgent:
        """What the task's main container would run: the task definition's
        entryPoint + command, the RunTask overrides' environment."""
        task = self.task(container.container_id)
        definition = self.aws.client("ecs").describe_task_definition(
            taskDefinition=task["taskDefinitionArn"])["taskDefinition"]
        [main] = [c for c in definition["containerDefinitions"] if c["name"] == "main"]
        [init] = [c for c in definition["containerDefinitions"] if c["name"] == "sandhub-agent-init"]
        env, init_env = overrides(task)
        agent = await start_agent_as([*main["entryPoint"], *main["command"]], env,
                                     ip=container.network.ip_address, port=self.agent_port,
                                     root=self.root / container.container_id, install=init["command"],
                                     install_env=init_env)
        self.agents.append(agent)
        return agent


def overrides(task: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """RunTask's environment overrides: the main container's, the init container's."""
    by_name = {o["name"]: {e["name"]: e["value"] for e in o.get("environment") or ()}
               for o in task["overrides"]["containerOverrides"]}
    assert set(by_name) == {"main", "sandhub-agent-init"}
    return by_name["main"], by_name["sandhub-agent-init"]


@pytest.fixture
async def setup(aws: Aws) -> AsyncIterator[Setup]:
    port = free_port()
    config = orchestrator_config(aws)
    config = replace(config, ecs=replace(config.ecs, agent_port=port))

    def backend(notify: Notify) -> Backend:
        recording = RecordingEcs(new_ecs_client(config.ecs))
        recording.loopback = True
        return EcsBackend(config.ecs, notify=notify, placements=tuple(PLACEMENTS), limits=config.limits,
                          api=EcsApi(config.ecs, recording), agent_key=internal_auth.agent_key(config.token))

    orch = await start_orchestrator(config, backend=backend)
    hub = await start_hub(HubConfig(listen="127.0.0.1:0", orchestrator=f"127.0.0.1:{orch.port}", api_keys=KEYS,
                                    orchestrator_token=config.token))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}")
    s = Setup(aws, orch, hub, channel, port, Path(tempfile.mkdtemp(prefix="sandhub-ecs-agent-")), [])
    yield s
    await channel.close()
    await hub.stop(0)
    await orch.stop(0)
    for agent in s.agents:
        await agent.stop()


async def test_the_task_carries_the_agent_and_the_directory_gives_its_address(setup: Setup) -> None:
    container = await setup.create()
    cid = container.container_id
    task = setup.task(cid)
    assert task["clusterArn"].endswith(CLUSTER)
    env, init_env = overrides(task)
    # Only the init container (which exits) gets the credential: it leaves it
    # in a file for the agent, never in the main container's environment.
    assert init_env == {"SANDHUB_AGENT_TOKEN": internal_auth.agent_token(AGENT_KEY, cid)}
    assert "SANDHUB_AGENT_TOKEN" not in env
    assert env["SANDHUB_CONTAINER_ID"] == cid and dict(container.env) == {"GREETING": "hi"}
    directory = agents_pb2_grpc.AgentDirectoryServiceStub(orchestrator_channel(setup.orchestrator.port))
    got = await directory.GetAgentEndpoint(agents_pb2.GetAgentEndpointRequest(container_id=cid),
                                           metadata=((rpc.TENANT_KEY, "tenant-a"),))
    assert got.target == f"{container.network.ip_address}:{setup.agent_port}" and got.backend == "ecs"
    assert got.target.startswith("127.")


async def test_exec_files_and_background_processes_reach_the_tasks_agent(setup: Setup) -> None:
    container = await setup.create()
    cid = container.container_id
    agent = await setup.start_task_agent(container)
    ex = setup.exec
    r = await run(ex, cid, shell="echo hello from the task; echo $GREETING; echo ${SANDHUB_AGENT_TOKEN:-unset}")
    # The caller's env reaches commands; the agent's credential doesn't.
    assert (r.exit_status.exit_code, r.stdout) == (0, b"hello from the task\nhi\nunset\n")
    # Nor is it in the agent's own environment (/proc/1/environ) or left in a file.
    token = internal_auth.agent_token(AGENT_KEY, cid).encode()
    assert token not in Path(f"/proc/{agent.process.pid}/environ").read_bytes()
    assert not (setup.root / cid / "run" / "sandhub" / "agent-token").exists()
    blob = bytes(range(256)) * 4096
    got = await put(ex, cid, {"blob.bin": blob, "app/main.py": b"print(1)\n"}, destination="up")
    assert len(got.files) == 2 and (agent.work / "up" / "app" / "main.py").read_bytes() == b"print(1)\n"
    info, data = await get(ex, cid, "up/blob.bin")
    assert data == blob and info.size == len(blob)

    async def stdin() -> AsyncIterator[xpb.ExecRequest]:
        yield xpb.ExecRequest(start=xpb.ExecStart(container_id=cid, command=xpb.Command(argv=["wc", "-c"])))
        yield xpb.ExecRequest(stdin=b"12345")
        yield xpb.ExecRequest(close_stdin=xpb.CloseStdin())

    out = [m async for m in ex.Exec(stdin(), metadata=A)]
    assert b"".join(m.stdout for m in out).strip() == b"5" and out[-1].exit_status.exit_code == 0

    await ex.StartProcess(xpb.StartProcessRequest(
        container_id=cid, process_id="srv", command=xpb.Command(shell="echo started; sleep 0.2; echo stopped")),
        metadata=A)
    chunks = [m async for m in ex.AttachProcess(xpb.AttachProcessRequest(container_id=cid, process_id="srv",
                                                                         follow=True), metadata=A)]
    assert b"".join(m.stdout.data for m in chunks if m.WhichOneof("msg") == "stdout") == b"started\nstopped\n"
    assert chunks[-1].WhichOneof("msg") == "exit_status"


async def test_another_tasks_agent_at_the_address_gets_no_call(setup: Setup) -> None:
    """An ENI address reused by another task: its agent can't prove this
    container's credential, so the Hub sends it nothing."""
    container = await setup.create()
    task = setup.task(container.container_id)
    definition = setup.aws.client("ecs").describe_task_definition(
        taskDefinition=task["taskDefinitionArn"])["taskDefinition"]
    [main] = [c for c in definition["containerDefinitions"] if c["name"] == "main"]
    other = "cnt-othertask001"
    [init] = [c for c in definition["containerDefinitions"] if c["name"] == "sandhub-agent-init"]
    setup.agents.append(await start_agent_as(
        [*main["entryPoint"], *main["command"]], {"SANDHUB_CONTAINER_ID": other},
        ip=container.network.ip_address, port=setup.agent_port, root=setup.root / other, install=init["command"],
        install_env={"SANDHUB_AGENT_TOKEN": internal_auth.agent_token(AGENT_KEY, other)}))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await run(setup.exec, container.container_id, "echo", "secret")
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
