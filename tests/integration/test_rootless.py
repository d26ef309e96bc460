"""Without root (a developer's laptop) the local backend degrades and says so.

Run as root (CI does), these tests drop to the unprivileged uid 65534 with
setpriv, so the non-root path is exercised on every run, not only on laptops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import ORCHESTRATOR_TOKEN, agent_for_others, sync_orchestrator_channel, traversable
from tests.integration.test_restart import free_port, wait_for

pytestmark = pytest.mark.root
NOBODY = "65534"


def as_nobody(*argv: str) -> list[str]:
    """argv run as uid 65534. When this checkout is not readable by that uid
    (a clone under /root, say), run it in a user namespace where we are 65534
    instead: geteuid() is then non-zero and the host's cgroups and network are
    out of reach just the same, while files stay readable."""
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    probe = subprocess.run([*drop, sys.executable, "-c", "import sandhub"], capture_output=True, timeout=60)
    if probe.returncode == 0:
        return [*drop, *argv]
    return ["unshare", "--user", f"--map-user={NOBODY}", f"--map-group={NOBODY}", "--", *argv]


@pytest.fixture
def shared_tmp(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.fail("this test switches to an unprivileged uid and needs root to do it (CI runs as root)")
    traversable(tmp_path).chmod(0o777)
    return tmp_path


def test_doctor_names_what_is_missing(shared_tmp: Path) -> None:
    env = dict(os.environ, SANDHUB_STATE_DIR=str(shared_tmp / "state"), SANDHUB_AGENT=str(agent_for_others(shared_tmp)))
    as_root = subprocess.run([sys.executable, "-m", "sandhub.cli.main", "doctor", "--json"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert as_root.returncode == 0, as_root.stdout + as_root.stderr
    assert all(c["ok"] for c in json.loads(as_root.stdout))

    rootless = subprocess.run(as_nobody(sys.executable, "-m", "sandhub.cli.main", "doctor", "--json"),
                              capture_output=True, text=True, env=env, timeout=60)
    assert rootless.returncode == 1
    checks = {c["name"]: c for c in json.loads(rootless.stdout)}
    assert not checks["root"]["ok"] and "share your uid" in checks["root"]["detail"]
    assert not checks["cgroups"]["ok"] and "NOT enforced" in checks["cgroups"]["detail"]
    assert checks["bubblewrap"]["ok"] and checks["seccomp"]["ok"]


def test_containers_run_without_root_and_the_log_says_what_is_off(shared_tmp: Path) -> None:
    port = free_port()
    log = shared_tmp / "orchestrator.log"
    env = dict(os.environ, SANDHUB_STATE_DIR=str(shared_tmp / "state"), SANDHUB_ORCHESTRATOR_TOKEN=ORCHESTRATOR_TOKEN,
               SANDHUB_AGENT=str(agent_for_others(shared_tmp)))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            as_nobody(sys.executable, "-m", "sandhub.cli.main", "serve", "--only", "orchestrator",
                      "--orchestrator-listen", f"127.0.0.1:{port}"),
            env=env, stdout=out, stderr=out,
        )
    try:
        channel = sync_orchestrator_channel(port)
        grpc.channel_ready_future(channel).result(timeout=20)
        stub = pb_grpc.OrchestratorServiceStub(channel)
        c = stub.CreateContainer(pb.CreateContainerRequest(wait_until_running=True)).container
        assert c.state == pb.CONTAINER_STATE_RUNNING, c.state_message
        assert c.network.ip_address == ""  # no bridge without root
        started = next(json.loads(line) for line in log.read_text().splitlines() if '"local.started"' in line)
        assert "NOT enforced" in started["cgroups"]
        assert started["network"].startswith("off (not root)")
        assert "share it" in started["users"]
        stub.DeleteContainer(pb.DeleteContainerRequest(container_id=c.container_id))
        assert wait_for(lambda: stub.GetContainer(pb.GetContainerRequest(container_id=c.container_id)).container.state
                        == pb.CONTAINER_STATE_TERMINATED)
        channel.close()
    finally:
        proc.terminate()  # our own child, by pid
        proc.wait(timeout=20)
