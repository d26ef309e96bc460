"""What happens to each container of a run, written once for every Target.

A scenario declares its metrics up front (so they are reported, in order,
even when nothing succeeded) and records one value or one failure per
container and metric: for every metric, count + failures adds up to the
number of containers (runs × containers for `ls`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sandhub.bench import host, webapp
from sandhub.bench.results import Results
from sandhub.bench.target import Created, CreateParams, FileToPut, Target, TargetError

NOT_CREATED = "skipped: the container was not created"
MEMORY_RESERVE_PREFIX = "not asked for: the host's MemAvailable"
LS_ARGV = ("ls", "/")


@dataclass(frozen=True)
class ScenarioOptions:
    create: CreateParams
    files: tuple[FileToPut, ...] = ()
    """Put into every container right after it is created (--files)."""
    runs: int = 10
    """`ls /` runs per container in the basic scenario."""
    web_server: str = "python"
    ready_timeout_s: float = 30.0
    """How long the webserver scenario waits for the first HTTP 200."""
    web_port: int = webapp.PORT
    """Where the web app listens (tests point it elsewhere)."""
    memory_reserve_mib: int = 2048
    """A create is not even asked for while the host's MemAvailable is below
    this (0: no check), so a target that needs more memory per container than
    the machine has (Docker at 1,000: a containerd-shim each) shows up as
    failed creates instead of pushing the host into its OOM killer, which
    could pick the bench or the services under test."""


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


@dataclass
class Context:
    """Shared by the jobs of one run."""

    target: Target
    results: Results
    options: ScenarioOptions
    created_ids: list[str] = field(default_factory=list)
    """Every container known to exist because of this run, for cleanup."""
    running_ids: list[str] = field(default_factory=list)
    """Those that were created RUNNING (the ones whose memory is sampled)."""

    async def create(self) -> Created | None:
        """Creates one container (and puts --files into it); records create,
        cct and put_files. None when it failed."""
        create = self.results.metrics["create"]
        cct = self.results.metrics["cct"]
        start = time.perf_counter()
        try:
            self._check_memory_reserve()
            c = await self.target.create(self.options.create)
        except TargetError as e:
            if e.container_id:
                self.created_ids.append(e.container_id)
            create.fail(e.reason)
            cct.fail(NOT_CREATED)
            if self.options.files:
                self.results.metrics["put_files"].fail(NOT_CREATED)
            return None
        create.add(_ms_since(start))
        self.created_ids.append(c.container_id)
        self.running_ids.append(c.container_id)
        if c.cct_ms is None:
            cct.fail(f"{self.target.name} does not report ready_time")
        else:
            cct.add(c.cct_ms)
        if self.options.files:
            await self.timed("put_files", self.target.put_files(c.container_id, self.options.files))
        return c

    def _check_memory_reserve(self) -> None:
        reserve = self.options.memory_reserve_mib
        if not reserve:
            return
        available = host.meminfo("MemAvailable") // 2**20
        if 0 < available < reserve:  # 0: /proc/meminfo unreadable, nothing to go by
            raise TargetError(f"{MEMORY_RESERVE_PREFIX} was below {reserve:,} MiB")

    async def timed(self, metric: str, step: Awaitable[object]) -> bool:
        """Awaits ``step``, recording its duration or its failure; True if it succeeded."""
        start = time.perf_counter()
        try:
            await step
        except TargetError as e:
            self.results.metrics[metric].fail(e.reason)
            return False
        self.results.metrics[metric].add(_ms_since(start))
        return True


def declare_common(results: Results, options: ScenarioOptions) -> None:
    results.metric("create", "ms", "create request to a RUNNING answer, as the caller sees it")
    results.metric("cct", "ms", "container creation time: ready_time - create_time, as the system reports it")
    if options.files:
        results.metric("put_files", "ms", f"upload of --files ({len(options.files)} files) into the container")


# -- create -----------------------------------------------------------------------


def declare_create(results: Results, options: ScenarioOptions) -> None:
    declare_common(results, options)


async def run_create(ctx: Context, index: int) -> None:
    await ctx.create()


# -- basic: create, then `ls /` runs -------------------------------------------------


def declare_basic(results: Results, options: ScenarioOptions) -> None:
    declare_common(results, options)
    results.metric("ls", "ms", "one `ls /` run to completion (the Hub: the Run RPC), every run")
    results.metric("ls_mean", "ms", f"mean of the {options.runs} `ls /` runs of one container")


async def run_basic(ctx: Context, index: int) -> None:
    c = await ctx.create()
    ls, mean = ctx.results.metrics["ls"], ctx.results.metrics["ls_mean"]
    if c is None:
        for _ in range(ctx.options.runs):
            ls.fail(NOT_CREATED)
        mean.fail(NOT_CREATED)
        return
    took: list[float] = []
    for _ in range(ctx.options.runs):
        start = time.perf_counter()
        try:
            result = await ctx.target.run(c.container_id, LS_ARGV)
        except TargetError as e:
            ls.fail(e.reason)
            continue
        if result.exit_code != 0:
            ls.fail(f"`ls /` exited {result.exit_code}: {result.stderr[:200].decode(errors='replace').strip()}")
            continue
        took.append(_ms_since(start))
        ls.add(took[-1])
    if len(took) == ctx.options.runs:
        mean.add(sum(took) / len(took))
    else:
        mean.fail(f"{ctx.options.runs - len(took)} of {ctx.options.runs} runs failed")


# -- webserver: create, upload an app, start it, wait for HTTP 200 --------------------


def declare_webserver(results: Results, options: ScenarioOptions) -> None:
    declare_common(results, options)
    results.metric("put_app", "ms", f"upload of the {options.web_server} web app")
    results.metric("start_app", "ms", "StartProcess of the web server")
    results.metric("first_200", "ms", "create request to the first HTTP 200 from the container's address")


async def run_webserver(ctx: Context, index: int) -> None:
    m = ctx.results.metrics
    start = time.perf_counter()
    c = await ctx.create()
    if c is None:
        for name in ("put_app", "start_app", "first_200"):
            m[name].fail(NOT_CREATED)
        return
    files, argv = webapp.app(ctx.options.web_server)
    if not await ctx.timed("put_app", ctx.target.put_files(c.container_id, files)):
        m["start_app"].fail("skipped: the app was not uploaded")
        m["first_200"].fail("skipped: the app was not uploaded")
        return
    if not await ctx.timed("start_app", ctx.target.start_process(c.container_id, "web", argv)):
        m["first_200"].fail("skipped: the app was not started")
        return
    if not c.ip_address:
        m["first_200"].fail("the container has no IP address (Container.network.ip_address is empty)")
        return
    try:
        await webapp.wait_for_200(c.ip_address, ctx.options.web_port, timeout_s=ctx.options.ready_timeout_s)
    except TargetError as e:
        m["first_200"].fail(e.reason)
        return
    m["first_200"].add(_ms_since(start))


@dataclass(frozen=True)
class Scenario:
    name: str
    declare: Callable[[Results, ScenarioOptions], None]
    run: Callable[[Context, int], Awaitable[None]]


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("create", declare_create, run_create),
        Scenario("basic", declare_basic, run_basic),
        Scenario("webserver", declare_webserver, run_webserver),
    )
}
