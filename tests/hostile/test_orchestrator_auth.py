"""Issue 11, item 2: the Orchestrator's port admits only the Hub and the operator.

A local user (or a pod that reaches the port) tries it as a hostile tenant
would: no credential, a wrong token, a Hub API key, a forged x-sandhub-tenant.
Each is UNAUTHENTICATED before any handler runs, and nothing happens; with the
token it works, and the Hub works end to end without forwarding the caller's
own x-sandhub-tenant or token. Real servers (the `services` fixture: local
backend, root)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from structlog.testing import capture_logs

from hub_service.server import start_hub
from orchestrator_service.server import start_orchestrator
from sandhub import internal_auth, rpc
from sandhub.config import ConfigError, HubConfig, load_hub, load_orchestrator
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import ORCHESTRATOR_TOKEN, Services, auth, hub_config, orchestrator_config
from tests.integration.test_lifecycle import reason_of

pytestmark = pytest.mark.root
A = auth("key-a")
WRONG = "x" * len(ORCHESTRATOR_TOKEN)
ATTEMPTS = {
    "no metadata": (),
    "wrong token": internal_auth.metadata(WRONG),
    "a Hub API key": auth("key-a"),
    "a Hub API key as the token": internal_auth.metadata("key-a"),
    "a forged tenant": ((rpc.TENANT_KEY, "tenant-a"),),
    "a forged tenant and a wrong token": ((rpc.TENANT_KEY, "tenant-a"), *internal_auth.metadata(WRONG)),
    "the token twice, one wrong": (*internal_auth.metadata(ORCHESTRATOR_TOKEN), *internal_auth.metadata(WRONG)),
}
EXPECTED_REASON = {"no metadata": "MISSING_CREDENTIALS", "a Hub API key": "MISSING_CREDENTIALS",
                   "a forged tenant": "MISSING_CREDENTIALS"}


@pytest.fixture
async def plain(services: Services) -> AsyncIterator[pb_grpc.OrchestratorServiceStub]:
    """What an attacker on this host has: the port, and a plain channel."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{services.orchestrator.port}") as channel:
        yield pb_grpc.OrchestratorServiceStub(channel)


async def expect_refused(call: Awaitable[object], attempt: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED, (attempt, e.value)
    assert reason_of(e.value)[0] == EXPECTED_REASON.get(attempt, "INVALID_CREDENTIALS"), attempt
    assert internal_auth.TOKEN_KEY in (e.value.details() or "")


@pytest.mark.parametrize("attempt", list(ATTEMPTS))
async def test_without_the_token_every_call_is_unauthenticated(
    services: Services, plain: pb_grpc.OrchestratorServiceStub, attempt: str
) -> None:
    mine = await services.hub_stub.CreateContainer(pb.CreateContainerRequest(labels={"app": "web"}), metadata=A)
    stub, md = plain, ATTEMPTS[attempt]
    with capture_logs() as logs:
        await expect_refused(stub.ListContainers(pb.ListContainersRequest(), metadata=md), attempt)
        await expect_refused(stub.GetContainer(pb.GetContainerRequest(container_id=mine.container.container_id), metadata=md), attempt)
        await expect_refused(stub.CreateContainer(pb.CreateContainerRequest(labels={"by": "attacker"}), metadata=md),
                             attempt)
        await expect_refused(stub.DeleteContainer(pb.DeleteContainerRequest(container_id=mine.container.container_id), metadata=md),
                             attempt)

        async def watch() -> None:
            async for _ in stub.WatchContainers(pb.WatchContainersRequest(), metadata=md):
                pass

        await expect_refused(watch(), attempt)
    # Nothing happened: no container made, the victim's still running.
    everything = await services.orchestrator_stub.ListContainers(pb.ListContainersRequest())
    assert [c.container_id for c in everything.containers] == [mine.container.container_id]
    assert everything.containers[0].state in (pb.CONTAINER_STATE_PENDING, pb.CONTAINER_STATE_RUNNING)
    # Each refusal is logged, with why, and no token (right or wrong) in any log event.
    refused = [e for e in logs if e["event"] == "orchestrator.call_refused"]
    assert len(refused) == 5 and all(e["reason"] and e["peer"] for e in refused)
    assert ORCHESTRATOR_TOKEN not in repr(logs) and WRONG not in repr(logs)


async def test_with_the_token_the_operator_sees_every_tenant(
    services: Services, plain: pb_grpc.OrchestratorServiceStub
) -> None:
    a = await services.hub_stub.CreateContainer(pb.CreateContainerRequest(), metadata=A)
    b = await services.hub_stub.CreateContainer(pb.CreateContainerRequest(), metadata=auth("key-b"))
    stub = plain
    md = internal_auth.metadata(ORCHESTRATOR_TOKEN)
    listed = await stub.ListContainers(pb.ListContainersRequest(), metadata=md)
    assert {c.container_id for c in listed.containers} == {a.container.container_id, b.container.container_id}
    # The Hub's way: the token and the tenant.
    scoped = await stub.ListContainers(pb.ListContainersRequest(), metadata=(*md, (rpc.TENANT_KEY, "tenant-b")))
    assert [c.container_id for c in scoped.containers] == [b.container.container_id]


async def test_health_and_reflection_stay_open(services: Services) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{services.orchestrator.port}")
    try:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        listed = [s.name async for r in call for s in r.list_services_response.service]
        assert "sandhub.orchestrator.v1.OrchestratorService" in listed
    finally:
        await channel.close()


async def test_the_hub_works_and_forwards_no_callers_tenant_or_token(services: Services) -> None:
    """A tenant who adds x-sandhub-tenant (another tenant's) or a token to its
    Hub call gets its own tenant's view: the Hub builds the outgoing metadata."""
    b = await services.hub_stub.CreateContainer(pb.CreateContainerRequest(), metadata=auth("key-b"))
    forged = (*A, (rpc.TENANT_KEY, "tenant-b"), *internal_auth.metadata(WRONG))
    a = await services.hub_stub.CreateContainer(pb.CreateContainerRequest(wait_until_running=True), metadata=forged)
    assert a.container.tenant == "tenant-a" and a.container.state == pb.CONTAINER_STATE_RUNNING
    listed = await services.hub_stub.ListContainers(pb.ListContainersRequest(), metadata=forged)
    assert [c.container_id for c in listed.containers] == [a.container.container_id]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await services.hub_stub.GetContainer(pb.GetContainerRequest(container_id=b.container.container_id), metadata=forged)
    assert e.value.code() is grpc.StatusCode.NOT_FOUND


async def test_a_hub_with_the_wrong_token_is_unavailable_to_tenants_not_unauthenticated(services: Services) -> None:
    hub = await start_hub(hub_config(services.orchestrator, orchestrator_token=WRONG))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}")
    try:
        with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.OrchestratorServiceStub(channel).ListContainers(pb.ListContainersRequest(), metadata=A)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE  # the tenant's key was fine
        assert any(x["event"] == "hub.orchestrator_refused_token" for x in logs)
        assert WRONG not in repr(logs)
    finally:
        await channel.close()
        await hub.stop(0)


async def test_neither_service_starts_without_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SANDHUB_ORCHESTRATOR_TOKEN"):
        await start_orchestrator(orchestrator_config(tmp_path, token=""))
    with pytest.raises(ConfigError, match="at least 32"):
        await start_orchestrator(orchestrator_config(tmp_path, token="short"))
    with pytest.raises(ConfigError, match="SANDHUB_ORCHESTRATOR_TOKEN"):
        await start_hub(HubConfig(listen="127.0.0.1:0", api_keys={"k": "t"}))


def test_the_token_is_read_from_a_file_or_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(ORCHESTRATOR_TOKEN + "\n")
    env = {"SANDHUB_ORCHESTRATOR_TOKEN_FILE": str(path)}
    assert load_orchestrator(env).token == load_hub(env).orchestrator_token == ORCHESTRATOR_TOKEN
    assert load_orchestrator({"SANDHUB_ORCHESTRATOR_TOKEN": ORCHESTRATOR_TOKEN}).token == ORCHESTRATOR_TOKEN
    assert load_hub({}).orchestrator_token == ""
    assert ORCHESTRATOR_TOKEN not in repr(load_orchestrator(env)) + repr(load_hub(env))
    with pytest.raises(ConfigError, match="set only one"):
        load_hub({**env, "SANDHUB_ORCHESTRATOR_TOKEN": ORCHESTRATOR_TOKEN})
    with pytest.raises(ConfigError, match="SANDHUB_ORCHESTRATOR_TOKEN: .*at least 32") as e:
        load_orchestrator({"SANDHUB_ORCHESTRATOR_TOKEN": "with a space " * 4})
    assert "with a space" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_orchestrator({"SANDHUB_ORCHESTRATOR_TOKEN_FILE": str(tmp_path / "missing")})


def test_serve_only_orchestrator_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDHUB_")}
    proc = subprocess.run(
        [sys.executable, "-m", "sandhub.cli.main", "serve", "--only", "orchestrator", "--dev",
         "--orchestrator-listen", "127.0.0.1:0"],
        env={**env, "SANDHUB_STATE_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no orchestrator token" in proc.stderr and "SANDHUB_ORCHESTRATOR_TOKEN_FILE" in proc.stderr


async def test_the_cli_reaches_the_orchestrator_only_with_the_token(services: Services, tmp_path: Path) -> None:
    """The operator's path: `sandhub list --orchestrator ADDRESS` with the token
    (here from a file) sees every tenant; without it the CLI says what is missing."""
    a = await services.hub_stub.CreateContainer(pb.CreateContainerRequest(), metadata=A)
    token_file = tmp_path / "token"
    token_file.write_text(ORCHESTRATOR_TOKEN)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SANDHUB_")}

    async def cli(**env: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "sandhub.cli.main", "list", "--json",
                "--orchestrator", f"127.0.0.1:{services.orchestrator.port}"]
        return await asyncio.to_thread(subprocess.run, argv, env={**base, **env}, capture_output=True, text=True,
                                       timeout=60)

    ok = await cli(SANDHUB_ORCHESTRATOR_TOKEN_FILE=str(token_file))
    assert ok.returncode == 0, ok.stderr
    assert [c["containerId"] for c in json.loads(ok.stdout)["containers"]] == [a.container.container_id]
    missing = await cli(SANDHUB_API_KEY="key-a")
    assert missing.returncode != 0 and "needs the token" in missing.stderr
    wrong = await cli(SANDHUB_ORCHESTRATOR_TOKEN=WRONG)
    assert wrong.returncode == 5 and "UNAUTHENTICATED" in wrong.stderr, wrong.stderr
