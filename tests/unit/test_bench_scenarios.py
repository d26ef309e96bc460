"""sandhub bench scenarios, scheduler and cleanup, driven through the Hub
target against fake Orchestrator and Exec services on real grpc.aio servers
(no root, no containers). Numbers are never asserted, only counted."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence

import pytest

from sandhub.bench.cleanup import delete_all
from sandhub.bench.hub import HubTarget
from sandhub.bench.results import Results
from sandhub.bench.scenarios import SCENARIOS, ScenarioOptions
from sandhub.bench.schedule import ScheduleStats, open_loop
from sandhub.bench.spawn import RUN_LABEL, RunOptions, run
from sandhub.bench.target import Created, CreateParams, FileToPut, RunResult, TargetError
from sandhub.exec.v1 import exec_pb2_grpc
from tests.bench_fakes import FAKE_CCT_NS, FakeExec, FakeOrchestrator, serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_results(scenario: str, n: int) -> Results:
    return Results(command="spawn", target="hub", target_detail="", scenario=scenario, params={"n": n})


async def bench(
    scenario: str, orchestrator: FakeOrchestrator, exec_servicer: exec_pb2_grpc.ExecServiceServicer, *,
    n: int, options: ScenarioOptions | None = None,
) -> Results:
    server, address = await serve(orchestrator, exec_servicer)
    try:
        target = HubTarget(address, api_key="k", timeout_s=10)
        opts = options or ScenarioOptions(create=CreateParams(image="", cpu_millicores=0, memory_mib=0))
        return await run(target, SCENARIOS[scenario], opts, RunOptions(n=n, interval_s=0.01, settle_s=0),
                         new_results(scenario, n))
    finally:
        await server.stop(0)


async def test_create_records_latency_and_cct_then_deletes_everything() -> None:
    orch = FakeOrchestrator()
    r = await bench("create", orch, FakeExec(), n=5)
    assert r.metrics["create"].failed == 0 and len(r.metrics["create"].values) == 5
    assert r.metrics["cct"].values == [FAKE_CCT_NS / 1e6] * 5
    assert all(v > 0 for v in r.metrics["create"].values)
    assert len(r.container_ids) == 5 and not r.leftovers and not r.failed
    assert orch.alive() == []
    run_ids = {c.labels[RUN_LABEL] for c in orch.containers.values()}
    assert run_ids == {r.params["run_id"]}


async def test_no_create_is_asked_for_below_the_memory_reserve() -> None:
    orch = FakeOrchestrator()
    reserve = 2**40  # MiB: more than any host has
    opts = ScenarioOptions(create=CreateParams(image="", cpu_millicores=0, memory_mib=0), memory_reserve_mib=reserve)
    r = await bench("basic", orch, FakeExec(), n=3, options=opts)
    assert dict(r.metrics["create"].failures) == {
        f"not asked for: the host's MemAvailable was below {reserve:,} MiB": 3}
    assert orch.containers == {} and r.failed


async def test_basic_runs_ls_ten_times_per_container() -> None:
    orch, ex = FakeOrchestrator(), FakeExec()
    r = await bench("basic", orch, ex, n=3)
    assert len(ex.runs) == 30 and {tuple(argv) for _, argv in ex.runs} == {("ls", "/")}
    assert {cid for cid, _ in ex.runs} == set(r.container_ids)
    assert len(r.metrics["ls"].values) == 30 and r.metrics["ls"].failed == 0
    assert len(r.metrics["ls_mean"].values) == 3
    assert not r.failed and orch.alive() == []


async def test_basic_counts_an_unimplemented_run_as_a_failure() -> None:
    orch = FakeOrchestrator()
    r = await bench("basic", orch, exec_pb2_grpc.ExecServiceServicer(), n=2)  # the generated base: UNIMPLEMENTED
    ls = r.metrics["ls"]
    assert ls.values == [] and ls.failed == 20
    assert all(reason.startswith("UNIMPLEMENTED") for reason in ls.failures)
    assert r.metrics["ls_mean"].failed == 2
    assert r.failed and orch.alive() == []


async def test_webserver_uploads_starts_and_waits_for_http_200() -> None:
    orch, ex = FakeOrchestrator(), FakeExec(http_port=free_port())
    options = ScenarioOptions(
        create=CreateParams(image="", cpu_millicores=0, memory_mib=0),
        files=(FileToPut("data.txt", b"x" * 100),),
        web_port=ex.http_port,
    )
    try:
        r = await bench("webserver", orch, ex, n=2, options=options)
    finally:
        await ex.close()
    assert not r.failed, r.metrics
    assert len(r.metrics["first_200"].values) == 2 and len(r.metrics["put_files"].values) == 2
    for cid in r.container_ids:
        assert ex.files[cid]["data.txt"] == b"x" * 100
        assert b"serve_forever" in ex.files[cid]["app.py"]
    assert [argv for _, _, argv in ex.processes] == [["python3", "app.py"]] * 2


async def test_webserver_without_an_ip_address_fails_clearly() -> None:
    orch = FakeOrchestrator(ip_address="")
    r = await bench("webserver", orch, FakeExec(), n=1)
    assert "no IP address" in next(iter(r.metrics["first_200"].failures))
    assert r.failed


async def test_interrupted_run_deletes_even_the_container_whose_answer_never_came() -> None:
    orch = FakeOrchestrator(hang_on=3)
    server, address = await serve(orch, FakeExec())
    results = new_results("create", 10)
    opts = ScenarioOptions(create=CreateParams(image="", cpu_millicores=0, memory_mib=0))
    try:
        task = asyncio.create_task(run(HubTarget(address, api_key="k", timeout_s=10), SCENARIOS["create"], opts,
                                       RunOptions(n=10, interval_s=0.05, settle_s=0), results))
        await asyncio.wait_for(orch.hanging.wait(), 10)
        task.cancel()
        await task
    finally:
        await server.stop(0)
    assert results.interrupted and results.failed
    assert orch.creates >= 3 and orch.alive() == []
    assert set(results.container_ids) == set(orch.containers)  # the hung one was found by its label


async def test_unreachable_hub_is_a_clear_error() -> None:
    target = HubTarget(f"127.0.0.1:{free_port()}", api_key="k", timeout_s=2)
    with pytest.raises(TargetError, match="cannot reach the Hub"):
        await run(target, SCENARIOS["create"], ScenarioOptions(create=CreateParams("", 0, 0)),
                  RunOptions(n=1, interval_s=0), new_results("create", 1))


async def test_open_loop_issues_every_job_in_order_and_respects_the_cap() -> None:
    started: list[int] = []
    running = 0
    most = 0

    async def job(i: int) -> None:
        nonlocal running, most
        started.append(i)
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.02)
        running -= 1

    stats = ScheduleStats()
    await open_loop(12, 0.001, job, concurrency_cap=3, stats=stats)
    assert started == list(range(12))
    assert most <= 3
    assert stats.issued == stats.finished == 12 and len(stats.lags_s) == 12


async def test_open_loop_does_not_wait_for_earlier_jobs() -> None:
    """Job 1 starts while job 0 is still running: an open loop."""
    gate = asyncio.Event()
    seen: list[int] = []

    async def job(i: int) -> None:
        seen.append(i)
        if i == 0:
            await gate.wait()
        else:
            gate.set()

    await asyncio.wait_for(open_loop(2, 0.001, job, concurrency_cap=10), 5)
    assert seen == [0, 1]


class FlakyTarget:
    """Deletes fail once per container; a deleted container is still listed
    once more (TERMINATING) before it is gone. ``labelled`` ones exist but the
    bench never heard of them."""

    name = "fake"
    detail = "fake"
    cgroup_parent = ""

    def __init__(self, ids: Sequence[str], labelled: Sequence[str]) -> None:
        self.alive_ids = set(ids) | set(labelled)
        self.failed_once: set[str] = set()
        self.deleting: set[str] = set()

    async def start(self) -> None: ...

    async def close(self) -> list[str]:
        return []

    async def create(self, params: CreateParams) -> Created:
        raise NotImplementedError

    async def put_files(self, container_id: str, files: Sequence[FileToPut]) -> None: ...

    async def run(self, container_id: str, argv: Sequence[str]) -> RunResult:
        raise NotImplementedError

    async def start_process(self, container_id: str, process_id: str, argv: Sequence[str]) -> None: ...

    async def delete(self, container_id: str) -> None:
        if container_id not in self.failed_once:
            self.failed_once.add(container_id)
            raise TargetError("UNAVAILABLE: try again")
        self.deleting.add(container_id)

    async def alive(self, labels: Mapping[str, str]) -> list[str]:
        listed = sorted(self.alive_ids)
        self.alive_ids -= self.deleting
        self.deleting.clear()
        return listed


async def test_delete_all_retries_failed_deletes_and_finds_labelled_containers() -> None:
    target = FlakyTarget(["cnt-a"], labelled=["cnt-b"])
    deleted, left = await delete_all(target, ["cnt-a"], {RUN_LABEL: "x"}, poll_s=0.001, timeout_s=10)
    assert deleted == ["cnt-a", "cnt-b"] and left == []


async def test_delete_all_reports_what_it_could_not_delete() -> None:
    target = FlakyTarget(["cnt-a"], labelled=[])
    target.failed_once = set()

    async def always_fail(container_id: str) -> None:
        raise TargetError("UNAVAILABLE: down")

    target.delete = always_fail  # type: ignore[method-assign]
    deleted, left = await delete_all(target, ["cnt-a"], {}, poll_s=0.001, timeout_s=0.05)
    assert deleted == [] and left == ["cnt-a: UNAVAILABLE: down"]
