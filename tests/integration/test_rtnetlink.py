"""rtnetlink.py against the kernel, in a network namespace made here: the
requests do what they say, a refused one names itself and the kernel's
reason, and entering a namespace leaves the calling thread where it was."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from orchestrator_service.backends.local.rtnetlink import NetlinkError, Rtnl

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]


@pytest.fixture
def netns_pid() -> Iterator[int]:
    if os.geteuid() != 0:
        pytest.fail("needs root to make a network namespace (CI runs as root)")
    proc = subprocess.Popen(["unshare", "--net", "--", "sleep", "60"])
    try:
        # Wait until the child is in its own namespace (after unshare's exec).
        for _ in range(200):
            if os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            time.sleep(0.01)
        yield proc.pid
    finally:
        proc.kill()  # by pid: only what this test started
        proc.wait()


def inside(pid: int, *args: str) -> str:
    return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", *args],
                          capture_output=True, text=True, check=True).stdout


def test_requests_inside_a_namespace_and_the_callers_thread_stays_out(netns_pid: int) -> None:
    before = os.readlink("/proc/thread-self/ns/net")
    netns = os.open(f"/proc/{netns_pid}/ns/net", os.O_RDONLY)
    try:
        rt = Rtnl.open_in(netns)
    finally:
        os.close(netns)  # the socket stays in that namespace on its own
    with rt:
        assert os.readlink("/proc/thread-self/ns/net") == before
        rt.set_up(1)  # lo
        rt.add_address(1, "10.250.0.7", 8)
        with pytest.raises(NetlinkError) as refused:
            rt.add_address(1, "10.250.0.7", 8)
        assert refused.value.errno == errno.EEXIST and "add address 10.250.0.7/8" in str(refused.value)
        with pytest.raises(NetlinkError) as refused:
            rt.add_address(9999, "10.250.0.8", 8)
        assert refused.value.errno == errno.ENODEV
        rt.add_default_route("10.250.0.1", 1)
        assert rt.delete_link("no-such-link") is False
    out = inside(netns_pid, "-o", "addr", "show", "dev", "lo")
    assert "10.250.0.7/8" in out
    assert "default via 10.250.0.1 dev lo" in inside(netns_pid, "route", "show")
    assert "10.250.0.7" not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout


def test_entering_something_that_is_not_a_namespace_is_a_clear_error() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="setns"):
            Rtnl.open_in(fd)
    finally:
        os.close(fd)
