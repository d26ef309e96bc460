"""One bench run: start the target, spawn containers on an open-loop schedule
through a scenario, sample their idle memory, then delete everything it
created — also when interrupted (Ctrl-C cancels the run, cleanup still runs)
or when something fails."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, replace

from sandhub.bench import host
from sandhub.bench.cleanup import delete_all
from sandhub.bench.progress import Progress
from sandhub.bench.results import MemorySample, Results
from sandhub.bench.scenarios import Context, Scenario, ScenarioOptions
from sandhub.bench.schedule import ScheduleStats, open_loop
from sandhub.bench.target import Target

RUN_LABEL = "bench-run"
"""Every container of a run carries RUN_LABEL=<run id>, so cleanup finds even
those whose create answer never arrived."""


@dataclass(frozen=True)
class RunOptions:
    n: int
    interval_s: float
    concurrency_cap: int = 1024
    keep: bool = False
    """Leave the containers alive (and report their ids) instead of deleting them."""
    settle_s: float = 1.0
    """Pause after the last container is up before memory is sampled, so
    start-up allocations that are freed right away don't count."""
    cleanup_concurrency: int = 32
    """Deletes in flight at once: fast, without flooding the backend."""
    cleanup_timeout_s: float = 300.0


def new_run_id() -> str:
    return "b" + secrets.token_hex(5)


async def run(
    target: Target,
    scenario: Scenario,
    options: ScenarioOptions,
    run_options: RunOptions,
    results: Results,
    *,
    progress: Progress | None = None,
    run_id: str = "",
) -> Results:
    """Fills ``results`` and returns it. Raises TargetError when the target
    can't even start; every later failure is recorded in ``results``."""
    run_id = run_id or new_run_id()
    labels = {RUN_LABEL: run_id}
    options = replace(options, create=replace(options.create, labels={**options.create.labels, **labels}))
    ctx = Context(target, results, options)
    scenario.declare(results, options)
    results.params["run_id"] = run_id
    results.target_detail = target.detail
    show = progress or Progress(run_options.n, enabled=False)
    stats = ScheduleStats()

    def changed(s: ScheduleStats) -> None:
        failed = max((m.failed for m in results.metrics.values()), default=0)
        show.update(done=s.finished, in_flight=s.in_flight, failed=failed)

    try:
        await target.start()
    except BaseException:
        await target.close()  # whatever it had started (a temp dir, servers)
        raise
    results.target_detail = target.detail
    try:
        available_before = await asyncio.to_thread(host.meminfo, "MemAvailable")
        start = time.perf_counter()
        try:
            await open_loop(run_options.n, run_options.interval_s, lambda i: scenario.run(ctx, i),
                            concurrency_cap=run_options.concurrency_cap, stats=stats, on_change=changed)
        except asyncio.CancelledError:
            _uncancel()
            results.interrupted = True
            show.say(f"\ninterrupted: cleaning up (Ctrl-C again to abandon {len(ctx.created_ids)} containers)")
        finally:
            results.wall_s = time.perf_counter() - start
            results.max_issue_lag_ms = stats.max_lag_s * 1000
            results.container_ids = sorted(set(ctx.created_ids))
            show.close()
        if not results.interrupted and target.cgroup_parent and ctx.running_ids:
            await asyncio.sleep(run_options.settle_s)
            results.memory = await sample_memory(ctx.running_ids, target.cgroup_parent, available_before)
    finally:
        await _finish(target, ctx, labels, run_options, results, show)
    return results


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


async def sample_memory(container_ids: list[str], cgroup_parent: str, available_before: int) -> MemorySample:
    used = await asyncio.to_thread(host.container_memory, container_ids, cgroup_parent)
    available_after = await asyncio.to_thread(host.meminfo, "MemAvailable")
    return MemorySample(
        containers=len(container_ids),
        cgroup_bytes=used.cgroup_bytes,
        pss_bytes=used.pss_bytes,
        processes=used.processes,
        host_available_delta_bytes=available_before - available_after if available_before and available_after else None,
    )


async def _finish(
    target: Target, ctx: Context, labels: dict[str, str], run_options: RunOptions, results: Results, show: Progress
) -> None:
    """Deletes what the run created (unless --keep), closes the target and
    checks the host for anything left of those containers."""
    deleted: list[str] = []
    try:
        if run_options.keep:
            results.kept = sorted(await target.alive(labels))
        else:
            if ctx.created_ids:
                show.say(f"deleting {len(set(ctx.created_ids))} containers")
            deleted, left = await delete_all(
                target, ctx.created_ids, labels,
                concurrency=run_options.cleanup_concurrency, timeout_s=run_options.cleanup_timeout_s,
            )
            results.leftovers.extend(left)
    finally:
        swept = await target.close()
        results.leftovers.extend(f"{cid}: still alive at close, deleted by the target itself" for cid in swept)
    ids = sorted(set(ctx.created_ids) | set(deleted) | set(swept) | set(results.kept))
    results.container_ids = ids
    if not run_options.keep and target.cgroup_parent:
        results.leftovers.extend(await asyncio.to_thread(host.leftovers, ids, target.cgroup_parent))
