"""Issue 12, Build: a bounded chaos run in `make test` (root; real services).

The Hub and the Orchestrator run as `sandhub serve --only ...` processes of
their own; four clients of two tenants create, upload and run commands while
each service is killed with SIGKILL and started again, then both at the end;
the state disk (a tmpfs the run mounts) is filled, used and freed. Then the
invariants of sandhub/bench/chaos.py: nothing lost, no duplicate, no orphan,
nothing left after everything is deleted, every failed call a specific code
(never INTERNAL or UNKNOWN), and a full disk answered as such. The same
scenario runs for longer as `make soak` (`sandhub bench soak`), which prints
the figures; here they are printed too, and only the invariants asserted."""

from __future__ import annotations

import os

import pytest

from sandhub.bench.chaos import ChaosOptions, run_chaos, text

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the chaos run creates namespaces, cgroups and a tmpfs and needs root (CI runs as root)")


async def test_kill_9_of_each_service_and_a_full_disk_lose_and_leave_nothing() -> None:
    result = await run_chaos(ChaosOptions(duration_s=16, clients=4, kill_every_s=5, full_disk=True))
    report = text(result)
    print(report)
    for note in result.notes:
        print(note)
    assert result.creates >= 10 and result.execs >= 10, report  # the burst did happen
    assert sum(result.kills.values()) >= 4, report  # and was interrupted: each service at least twice
    assert result.held(), report
