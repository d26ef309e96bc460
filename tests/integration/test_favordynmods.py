"""The Orchestrator turns on the host's cgroup favordynmods (a speed-up of
every move into a cgroup) by mounting cgroup2 in a private mount namespace.
Host-wide and, on this kernel, until reboot: which is what a start of the
local backend does on every CI run anyway."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator_service.backends.local import cgroups

pytestmark = pytest.mark.root


def test_turned_on_keeping_the_other_options_and_leaving_no_mount(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to mount cgroup2 (CI runs as root)")
    on, before = cgroups.favordynmods_state()
    if on is None:
        pytest.fail("this kernel has no favordynmods (Linux 6.0+); CI's has")
    status = cgroups.favor_dynmods(enable=True, scratch=tmp_path / "mnt")
    assert status.startswith("on"), status
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounts  # mounted only inside the private namespace
    assert list((tmp_path / "mnt").iterdir()) == []  # its mount point removed
    on, after = cgroups.favordynmods_state()
    if before is not None:  # a visible cgroup2 mount shows the hierarchy's options
        assert on and set(before) | {"favordynmods"} == set(after or [])
    assert cgroups.favor_dynmods(enable=False, scratch=tmp_path / "mnt") == "on"  # already: nothing to do
