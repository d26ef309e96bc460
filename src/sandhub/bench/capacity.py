"""`sandhub bench capacity`: how many containers one host keeps alive at once.

Starts a Hub and an Orchestrator of its own (local backend, private network
device and /19 subnet, temp state), then creates containers through the Hub
and keeps every one of them alive until ``--alive`` are running. At each mark
(``--marks``, e.g. 1,000 / 3,000 / 5,000 alive) it reports the create
latency of the creates since the previous mark (p50/p99), the failures, the
host's memory per container (MemAvailable drop / alive, and the PSS of the
containers' own processes / alive), this process's open
fds and threads, the number of host veths, and whether a sample of the alive
containers is still reached from the host at its address (a TCP connect to a
closed port answered by a reset is "reached": the container's own kernel
answered). Then it deletes them all and removes its network.

Only containers and a network of its own are touched. The per-tenant
container quota and create rate are lifted for the bench's own Orchestrator
(the Limits are printed): the subject is the host, not the quota.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from sandhub.bench import host
from sandhub.bench.stats import percentile
from sandhub.bench.target import CreateParams, TargetError

API_KEY = "capacity-bench"
SAMPLE = 25
"""Containers probed from the host at each mark."""
PROBE_PORT = 9
MAX_FAILURES = 20
"""Failed creates after which the bench stops (the limit is then reported)."""
"""Nothing listens there: a reset back is the container's kernel answering."""


@dataclass
class Mark:
    alive: int
    create_p50_ms: float
    create_p99_ms: float
    create_max_ms: float
    creates: int
    failures: int
    mem_available_mib: int
    mem_per_container_mib: float
    pss_per_container_mib: float | None
    """The containers' own processes (agent, launcher, what runs inside), proportional set size."""
    open_fds: int
    threads: int
    host_veths: int
    reached: int
    probed: int
    elapsed_s: float


@dataclass
class Capacity:
    target_alive: int
    concurrency: int
    limits: dict[str, Any]
    marks: list[Mark] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stopped_because: str = ""
    delete_s: float = 0.0
    leftovers: list[str] = field(default_factory=list)
    host_limits: dict[str, Any] = field(default_factory=dict)


def add_parser(sub: Any) -> None:
    c = sub.add_parser("capacity", help="keep --alive containers alive at once through a Hub of its own, "
                                        "create latency and memory at each mark")
    c.add_argument("--alive", type=int, default=5000, help="containers to hold alive at once (default 5000)")
    c.add_argument("--marks", default="1000,3000,5000",
                   help="alive counts to report at, comma-separated (default 1000,3000,5000)")
    c.add_argument("--concurrency", type=int, default=4, help="creates in flight at once (default 4)")
    c.add_argument("--mem", type=int, default=64, help="MiB limit of each container (default 64)")
    c.add_argument("--memory-reserve", type=int, default=1024, metavar="MIB",
                   help="stop creating when the host's MemAvailable falls below this (default 1024)")
    c.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    c.set_defaults(func=cmd_capacity)


def cmd_capacity(args: argparse.Namespace) -> int:
    from sandhub import logs

    logs.configure(level="warning")
    marks = sorted({int(m) for m in args.marks.split(",") if m.strip()} | {args.alive})
    result = asyncio.run(measure(alive=args.alive, marks=marks, concurrency=args.concurrency,
                                 memory_mib=args.mem, memory_reserve_mib=args.memory_reserve))
    print(json.dumps(dataclasses.asdict(result), indent=2) if args.json else text(result))
    return 1 if result.failures or result.leftovers or result.stopped_because else 0


def host_limits() -> dict[str, Any]:
    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return "?"

    return {
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "pid_max": read("/proc/sys/kernel/pid_max"),
        "threads_max": read("/proc/sys/kernel/threads-max"),
        "neigh_gc_thresh3": read("/proc/sys/net/ipv4/neigh/default/gc_thresh3"),
        "cpus": os.cpu_count(),
        "mem_total_mib": host.meminfo("MemTotal") >> 20,
    }


def _count(path: str) -> int:
    try:
        return len(os.listdir(path))
    except OSError:
        return -1


def _host_veths(group: int) -> int:
    n = 0
    for name in os.listdir("/sys/class/net"):
        if name.startswith("sh-"):
            try:
                with open(f"/sys/class/net/{name}/netdev_group") as f:
                    n += int(f.read()) == group
            except (OSError, ValueError):
                pass
    return n


async def reached(address: str, port: int = PROBE_PORT, *, timeout_s: float = 3.0) -> bool:
    """True if the container's kernel answers at ``address`` (a reset from a
    closed port counts: the address works); False on timeout or unreachable."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout_s)
    except ConnectionRefusedError:
        return True
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def measure(*, alive: int, marks: list[int], concurrency: int, memory_mib: int,
                  memory_reserve_mib: int) -> Capacity:
    from orchestrator_service.backends.local.network import interface_group
    from sandhub.bench.local import LocalHubTarget
    from sandhub.config import Limits

    limits = Limits(max_containers_per_tenant=alive + 100, create_rate_per_s=0)
    result = Capacity(target_alive=alive, concurrency=concurrency, host_limits=host_limits(),
                      limits={"max_containers_per_tenant": limits.max_containers_per_tenant,
                              "create_rate_per_s": limits.create_rate_per_s})
    target = LocalHubTarget(api_key=API_KEY, timeout_s=120, limits=limits)
    await target.start()
    group = interface_group(target.local_config.bridge)
    created: dict[str, str] = {}  # id -> ip, of every container to delete at the end ("" if its create failed)
    alive_now = [0]
    latencies: list[float] = []
    failures_since = 0
    mem0 = host.meminfo("MemAvailable")
    started = time.monotonic()
    params = CreateParams(image="", cpu_millicores=0, memory_mib=memory_mib, labels={"bench": "capacity"})
    pending_marks = list(marks)
    lock = asyncio.Lock()

    async def one() -> None:
        nonlocal failures_since
        t0 = time.perf_counter()
        try:
            c = await target.create(params)
        except TargetError as e:
            result.failures.append(e.reason)
            failures_since += 1
            if e.container_id:
                created[e.container_id] = ""
            return
        latencies.append((time.perf_counter() - t0) * 1000)
        created[c.container_id] = c.ip_address
        alive_now[0] += 1

    async def worker() -> None:
        while True:
            async with lock:
                if alive_now[0] + in_flight[0] >= alive or result.stopped_because:
                    return
                if len(result.failures) >= MAX_FAILURES:
                    result.stopped_because = f"{len(result.failures)} failed creates at {len(created)} alive"
                    return
                if host.meminfo("MemAvailable") >> 20 < memory_reserve_mib:
                    result.stopped_because = f"MemAvailable below {memory_reserve_mib} MiB at {len(created)} alive"
                    return
                in_flight[0] += 1
            try:
                await one()
            finally:
                in_flight[0] -= 1
            await check_marks()

    mark_start = [0]
    in_flight = [0]

    async def check_marks(final: bool = False) -> None:
        nonlocal failures_since
        ok = [cid for cid, ip in created.items() if ip]
        while pending_marks and ok and (len(ok) >= pending_marks[0] or final):
            pending_marks.pop(0)
            if final:
                pending_marks.clear()
            window = latencies[mark_start[0]:] or [0.0]
            mark_start[0] = len(latencies)
            sample = random.sample([created[c] for c in ok], min(SAMPLE, len(ok)))
            answered = sum(await asyncio.gather(*(reached(ip, timeout_s=2) for ip in sample)))
            mem = host.meminfo("MemAvailable")
            used = await asyncio.to_thread(host.container_memory, ok, target.cgroup_parent)
            result.marks.append(Mark(
                alive=len(ok), create_p50_ms=round(percentile(window, 50), 1),
                create_p99_ms=round(percentile(window, 99), 1), create_max_ms=round(max(window), 1),
                creates=len(window), failures=failures_since, mem_available_mib=mem >> 20,
                mem_per_container_mib=round((mem0 - mem) / 2**20 / len(ok), 2),
                pss_per_container_mib=None if used.pss_bytes is None else round(used.pss_bytes / 2**20 / len(ok), 2),
                open_fds=_count("/proc/self/fd"), threads=_count("/proc/self/task"),
                host_veths=_host_veths(group), reached=answered, probed=len(sample),
                elapsed_s=round(time.monotonic() - started, 1),
            ))
            failures_since = 0
            print(f"capacity: {result.marks[-1]}", file=sys.stderr, flush=True)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await check_marks(final=True)  # stopped short of a mark: report where it stopped
    finally:
        t0 = time.monotonic()
        ids = list(created)
        sem = asyncio.Semaphore(concurrency)  # under the Hub's per-tenant call cap

        async def delete(cid: str) -> None:
            async with sem:
                try:
                    await target.delete(cid)
                except TargetError as e:
                    result.failures.append(f"delete {cid}: {e.reason}")

        await asyncio.gather(*(delete(c) for c in ids))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and await target.alive({"bench": "capacity"}):
            await asyncio.sleep(0.5)
        result.delete_s = round(time.monotonic() - t0, 1)
        result.leftovers = await target.close()
        if _host_veths(group):
            result.leftovers.append(f"{_host_veths(group)} host veths")
    return result


def text(r: Capacity) -> str:
    lines = [
        f"capacity: {r.target_alive} alive containers wanted, {r.concurrency} creates in flight; "
        f"Orchestrator limits {r.limits}; host {r.host_limits}",
        f"{'alive':>6} {'creates':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'fail':>4} "
        f"{'MiB/ctr':>7} {'PSS/ctr':>7} {'avail MiB':>9} {'fds':>6} {'thr':>4} {'veths':>6} {'reached':>8} {'t s':>6}",
    ]
    for m in r.marks:
        lines.append(
            f"{m.alive:>6} {m.creates:>7} {m.create_p50_ms:>7} {m.create_p99_ms:>7} {m.create_max_ms:>7} "
            f"{m.failures:>4} {m.mem_per_container_mib:>7} {m.pss_per_container_mib or '-':>7} "
            f"{m.mem_available_mib:>9} {m.open_fds:>6} {m.threads:>4} "
            f"{m.host_veths:>6} {m.reached:>3}/{m.probed:<4} {m.elapsed_s:>6}"
        )
    lines.append(f"failures: {len(r.failures)}" + (f" (first: {r.failures[0]})" if r.failures else ""))
    if r.stopped_because:
        lines.append(f"stopped: {r.stopped_because}")
    lines.append(f"deleted all in {r.delete_s} s; leftovers: {r.leftovers or 'none'}")
    return "\n".join(lines)

