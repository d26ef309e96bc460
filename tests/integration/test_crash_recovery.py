"""A create the orchestrator was in the middle of when it died is retried
with its request_id and gets a working container (issue 12, item 5).

Simulated crash: the record a create writes before it starts anything (PENDING)
is written to the state directory, as an orchestrator killed right after
writing it leaves it; then a real orchestrator starts in this process on that
state (the local backend, real sandboxes; root needed) and adopts it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator_service.backends.local import cgroups
from orchestrator_service.backends.local.store import Record, Runtime, Store
from orchestrator_service.model import CREATE_INTERRUPTED, Container, State, new_container_id, utcnow
from orchestrator_service.server import RunningOrchestrator, start_orchestrator
from orchestrator_service.validation import RawCreate, build_spec
from sandhub.config import OrchestratorConfig
from tests.conftest import PrivateNetwork, eventually, orchestrator_config
from tests.container_shell import agent_shell

pytestmark = pytest.mark.root

RAW = RawCreate(image="", cpu_millicores=0, memory_mib=0, pids=0, disk_mib=0, open_files=0, env={"A": "1"},
                labels={"app": "x"}, ttl_s=0, ports=(), placement="", request_id="req-crashed-1")


def crashed_record(config: OrchestratorConfig, raw: RawCreate, tenant: str) -> Container:
    """Writes what a create leaves on disk when the orchestrator dies before
    the sandbox is RUNNING: its PENDING record."""
    spec = build_spec(raw, tenant=tenant, limits=config.limits, placements=config.placements,
                      default_image=config.local.default_image)
    container = Container.from_spec(spec, id=new_container_id(), backend="local", now=utcnow())
    store = Store(config.local.state_dir)
    store.prepare()
    store.save(Record(container, Runtime()))
    return container


@pytest.fixture
async def crashed(tmp_path: Path) -> AsyncIterator[tuple[RunningOrchestrator, OrchestratorConfig, Container]]:
    if os.geteuid() != 0:
        pytest.fail("these tests create sandboxes and need root (CI runs as root)")
    net = PrivateNetwork.new()
    config = orchestrator_config(tmp_path, net)
    lost = crashed_record(config, RAW, "t")
    orch = await start_orchestrator(config)
    try:
        yield orch, config, lost
    finally:
        for c in await orch.containers.backend.list():  # type: ignore[union-attr]
            if c.state.alive:
                await orch.containers.delete(c.id, tenant=None, grace_period_s=0)
        await eventually(lambda: orch.containers.backend.list(),  # type: ignore[union-attr]
                         lambda cs: all(not c.state.alive and c.state is not State.TERMINATING for c in cs))
        await orch.stop(0)
        await net.teardown()


async def test_a_create_cut_short_by_a_crash_is_started_again_under_its_request_id(
    crashed: tuple[RunningOrchestrator, OrchestratorConfig, Container],
) -> None:
    orch, config, lost = crashed
    # Adopted as what it is: cleaned up, FAILED, and saying so.
    seen = await orch.containers.get(lost.id, tenant=None)
    assert seen.state is State.FAILED and seen.state_reason == CREATE_INTERRUPTED
    assert "same request_id" in seen.state_message

    # A retry asking for something else is not this create: it gets what the
    # request_id made, as any retry does.
    other = await orch.containers.create(replace(RAW, labels={"app": "y"}), tenant="t", wait_until_running=True)
    assert other.id == lost.id and other.state is State.FAILED
    # Another tenant's request_id is another request.
    assert (await orch.containers.create(RAW, tenant="u", wait_until_running=True)).id != lost.id

    # The retry: a working container under the same request_id (a new id).
    again = await orch.containers.create(RAW, tenant="t", wait_until_running=True)
    assert again.state is State.RUNNING, again
    assert again.id != lost.id and again.request_id == RAW.request_id and again.labels == {"app": "x"}
    async with agent_shell(orch.containers.backend, again.id, orchestrator_token=config.token) as shell:
        reply = await shell.run(again.id, ["sh", "-c", "echo $A; echo ok"])
    assert (reply.exit_status.exit_code, reply.exit_status.signal_number) == (0, 0)
    assert reply.stdout == b"1\nok\n"

    # Idempotent from here on: the same request_id is that container, and
    # the old record is gone (one container per request_id, none FAILED).
    assert (await orch.containers.create(RAW, tenant="t", wait_until_running=True)).id == again.id
    mine = [c for c in await orch.containers.backend.list()  # type: ignore[union-attr]
            if c.tenant == "t" and c.request_id == RAW.request_id]
    assert [c.id for c in mine] == [again.id]


async def test_what_started_in_a_crashed_creates_cgroup_is_killed_at_adoption(tmp_path: Path) -> None:
    """The orchestrator dies after putting the held init in the container's
    cgroup; the init then goes on and execs the agent, which no longer looks
    like a bwrap. Adopting the PENDING record must leave nothing running in
    that cgroup, nor the cgroup (seen in the chaos test: an orphaned pid)."""
    if os.geteuid() != 0:
        pytest.fail("these tests create cgroups and need root (CI runs as root)")
    net = PrivateNetwork.new()
    config = orchestrator_config(tmp_path, net)
    lost = crashed_record(config, RAW, "t")
    groups = cgroups.Cgroups(cgroups.detect(), parent=cgroups.parent_for(config.local.state_dir))
    groups.prepare()
    groups.create(lost.id, cgroups.Limits(cpu_millicores=500, memory_mib=64, pids=64))
    left = subprocess.Popen(["sleep", "600"])
    try:
        groups.add(lost.id, left.pid)
        assert groups.processes(lost.id) == [left.pid]
        orch = await start_orchestrator(config)
        try:
            assert left.wait(timeout=10) == -9
            assert groups.processes(lost.id) == [] and not any(d.exists() for d in groups.dirs(lost.id))
            seen = await orch.containers.get(lost.id, tenant=None)
            assert seen.state is State.FAILED and seen.state_reason == CREATE_INTERRUPTED
        finally:
            await orch.stop(0)
    finally:
        left.kill()
        left.wait()
        await net.teardown()
