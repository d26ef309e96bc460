"""The Orchestrator turns on the host's cgroup favordynmods (a speed-up of
every move into a cgroup) by mounting cgroup2 in a private mount namespace.
Host-wide and, on this kernel, until reboot: which is what a start of the
local backend does on every CI run anyway. An earlier test's Orchestrator
has usually turned it on already, so the mount itself is tested directly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator_service.backends.local import cgroups

pytestmark = pytest.mark.root


def test_the_private_mount_sets_the_option_and_leaves_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to mount cgroup2 (CI runs as root)")
    on, before = cgroups.favordynmods_state()
    if on is None:
        pytest.fail("this kernel has no favordynmods (Linux 6.0+); CI's has")
    options = [o for o in (before or []) if o != "favordynmods"]
    assert cgroups.mount_cgroup2_privately([*options, "favordynmods"], tmp_path / "mnt") == ""
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()  # only inside the private namespace
    assert list((tmp_path / "mnt").iterdir()) == []  # its mount point removed
    on, after = cgroups.favordynmods_state()
    if before is not None:  # a visible cgroup2 mount shows the hierarchy's options, the others kept
        assert on and set(after or []) == set(options) | {"favordynmods"}
    # Asked for again, nothing is left to do; refused options say why.
    assert cgroups.favor_dynmods(enable=True, scratch=tmp_path / "again") == "on"
    assert cgroups.mount_cgroup2_privately(["no-such-option"], tmp_path / "mnt") != ""
    assert cgroups.favordynmods_state()[0] == on  # a refused mount changed nothing


def test_the_backend_says_how_it_stands(tmp_path: Path) -> None:
    status = cgroups.favor_dynmods(enable=False, scratch=tmp_path)
    on, _ = cgroups.favordynmods_state()
    if on:
        assert status == "on"
    else:  # left alone, as configured
        assert status.startswith(("off (configured)", "not supported")) and not cgroups.favordynmods_state()[0]
