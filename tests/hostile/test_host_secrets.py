"""A tenant looks inside its container for anything of the host's: the servers'
environment (API keys), their command lines, host paths. Issue 11, item 1.

Before the fix, `tr '\\0' '\\n' </proc/1/environ` printed the Orchestrator's
whole environment, SANDHUB_API_KEYS included, and `ps` on the host showed
every container's env values (bwrap's --setenv). Real servers, local backend,
commands run through the Hub's ExecService as a tenant would.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator

import pytest

from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import Services, auth

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]
A = auth("key-a")
BB = "/.sandhub/busybox"


@pytest.fixture
def server_secret(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A secret in the servers' environment: the Hub and the Orchestrator run
    in this test process, so its environment is theirs."""
    value = f"server-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv("SANDHUB_API_KEYS", f"{value}=tenant-x")
    monkeypatch.setenv("SANDHUB_TEST_SECRET", value)
    yield value


async def sh(ex: xpb_grpc.ExecServiceStub, cid: str, script: str) -> str:
    r = await ex.Run(xpb.RunRequest(container_id=cid, command=xpb.Command(argv=[BB, "sh", "-c", script])),
                     metadata=A)
    assert r.exit_status.exit_code == 0, r.stderr.decode()
    return r.stdout.decode(errors="replace")


async def test_nothing_of_the_servers_is_visible_inside(services: Services, server_secret: str) -> None:
    env_secret = f"container-env-{secrets.token_hex(8)}"
    created = await services.hub_stub.CreateContainer(
        pb.CreateContainerRequest(env={"MY_TOKEN": env_secret}, wait_until_running=True), metadata=A)
    c = created.container
    assert c.state == pb.CONTAINER_STATE_RUNNING, c.state_message
    ex = xpb_grpc.ExecServiceStub(services.hub_channel)
    # Every process the container can see: its environment and command line
    # (pid 1 is the agent, which bwrap, started by the Orchestrator, execs).
    dump = await sh(ex, c.container_id, "for d in /proc/[0-9]*; do echo \"== $d\"; "
                              "tr '\\0' '\\n' <$d/environ 2>/dev/null; tr '\\0' ' ' <$d/cmdline 2>/dev/null; echo; done")
    assert "== /proc/1" in dump
    assert server_secret not in dump
    assert "SANDHUB_API_KEYS" not in dump
    # No host path: not the state or image dirs (bwrap's binds), nor the env values.
    for host_path in {str(services.state_dir), str(services.orchestrator.config.local.images_dir)}:
        assert host_path not in dump, host_path
    fds = await sh(ex, c.container_id, "for d in /proc/[0-9]*/fd/*; do echo \"$d $(readlink $d)\"; done")
    assert "/proc/1/fd/" in fds and "sandhub-bwrap-args" not in fds  # bwrap closed the memfd
    pid1 = await sh(ex, c.container_id, "tr '\\0' '\\n' </proc/1/environ")
    # pid 1 is the agent: bwrap's environment (the id) and the PWD bwrap's --chdir sets, nothing else.
    assert sorted(pid1.split()) == ["PWD=/work", f"SANDHUB_CONTAINER_ID={c.container_id}"]
    # The container's own env is where it belongs, in its processes...
    assert env_secret in await sh(ex, c.container_id, "echo $MY_TOKEN")
    # ...and on no command line on the host, where every user can read them.
    me = str(os.getpid())
    for name in os.listdir("/proc"):
        if not name.isdigit() or name == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        assert env_secret.encode() not in cmdline, f"pid {name}: {cmdline[:200]!r}"


async def test_a_command_sees_only_its_container_environment(services: Services, server_secret: str) -> None:
    created = await services.hub_stub.CreateContainer(pb.CreateContainerRequest(wait_until_running=True), metadata=A)
    ex = xpb_grpc.ExecServiceStub(services.hub_channel)
    env = await sh(ex, created.container.container_id, "env")
    names = {line.split("=", 1)[0] for line in env.splitlines() if "=" in line}
    assert server_secret not in env
    assert not any(n.startswith("SANDHUB_") and n != "SANDHUB_CONTAINER_ID" for n in names), names
