"""Every request type of the Hub's public services, fuzzed with random and
boundary values and hostile stream sequences, against a real Hub and
Orchestrator on the local backend (root). Fixed seed, bounded count: no
INTERNAL or UNKNOWN, no hang, no other tenant's container answered, bounded
memory, and the services still answer plain calls afterwards.

`sandhub bench fuzz --seed N --requests N` runs the same fuzzer longer; a
failure here prints its seed and index, and `--seed S --index I` replays it.
"""

from __future__ import annotations

import pytest

from sandhub.bench import fuzz
from sandhub.bench.fuzz_calls import Aim, generate, methods
from tests.conftest import Services, auth
from tests.integration.test_lifecycle import create

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]
SEED = 20240611
REQUESTS = 1500
A = auth("key-a")
B = auth("key-b")


def test_every_rpc_and_stream_strategy_is_generated() -> None:
    """The fixed-seed run reaches every RPC, and requests are pure functions of
    (seed, index): a reported failure replays."""
    aim = Aim(own=("cnt-aaaaaaaaaaaa",), foreign=("cnt-bbbbbbbbbbbb",))
    calls = [generate(SEED, i, aim) for i in range(REQUESTS)]
    assert {c.method for c in calls} == {m.name for m in methods()}
    assert {c.strategy for c in calls if c.method == "PutFiles"} >= {"tar", "huge-chunk", "data-first", "cancel"}
    assert {c.strategy for c in calls if c.method == "Exec"} >= {"stdin-first", "resize", "signals", "no-close"}
    assert any(c.strategy == "wire" for c in calls) and any(c.foreign for c in calls)
    again = generate(SEED, 123, aim)
    assert [m.SerializeToString() for m in again.messages] == [m.SerializeToString() for m in calls[123].messages]


async def test_fuzz_fixed_seed(services: Services) -> None:
    own = await fuzz.prepare(services.hub_channel, A, containers=2)
    foreign = (await create(services, md=B, labels={"fuzz": "1"})).container_id
    report = await fuzz.fuzz(services.hub_channel, A, tenant="tenant-a", aim=Aim(own=own, foreign=(foreign,)),
                             seed=SEED, requests=REQUESTS, concurrency=4)
    print(fuzz.text(report))
    assert report.requests == REQUESTS
    assert not report.failures, "\n".join(str(f) for f in report.failures[:30])
