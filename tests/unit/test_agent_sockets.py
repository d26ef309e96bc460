"""Where the local backend binds each container's agent socket (agent_sockets.py)."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator_service.backends.local.agent_sockets import MAX_SUN_PATH, ROOT_BASE, AgentSockets, directory_for
from sandhub.config import LocalBackendConfig

LONG = Path("/tmp") / ("a-long-checkout-" * 12) / "state"


def test_a_socket_fits_whatever_the_length_of_the_configured_directories() -> None:
    config = LocalBackendConfig(state_dir=LONG, runtime_dir=LONG / "run")
    for root in (True, False):
        path = AgentSockets(directory_for(config, root=root)).path("cnt-" + "x" * 12)
        assert len(os.fsencode(path)) <= MAX_SUN_PATH, path
    assert directory_for(config, root=True).parent == ROOT_BASE


def test_each_state_directory_has_its_own_socket_directory() -> None:
    one = directory_for(LocalBackendConfig(state_dir=LONG / "one"), root=True)
    two = directory_for(LocalBackendConfig(state_dir=LONG / "two"), root=True)
    assert one != two and one.parent == two.parent
    # The same state directory, however spelled, finds its sockets again after a restart.
    assert directory_for(LocalBackendConfig(state_dir=LONG / "one" / ".." / "one"), root=True) == one


def test_release_keeps_a_directory_that_still_holds_sockets(tmp_path: Path) -> None:
    sockets = AgentSockets(tmp_path / "base" / "instance")
    sockets.prepare()
    sockets.bind("cnt-a").close()
    sockets.release()
    assert sockets.present() == ["cnt-a"]
    sockets.remove("cnt-a")
    sockets.release()
    assert not (tmp_path / "base" / "instance").exists()
