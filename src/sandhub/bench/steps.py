"""Where CCT and `ls /` go, step by step, in wall-clock time.

py-spy (`sandhub bench matrix`'s Hub CPU phase can record it) shows where the
services spend CPU; but a create mostly *waits* (for bwrap, for `ip`), which
a sampling profiler does not see. This wraps the local backend's steps with
timers, in this process only, and runs creates and `ls /` on the floor:

    .venv/bin/python -m sandhub.bench.steps [-n 50] [--interval 0.1] [--runs 5]

It reaches into the backend's internals (the functions it wraps are named
below); when they are renamed it fails loudly rather than measuring nothing.
The product is not changed: only the wrapped references in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sandhub.bench.stats import percentile

Timings = dict[str, list[float]]


Undo = list[tuple[Any, str, Any]]
"""(owner, name, original) of every wrapped reference, to put back."""


def _wrap_sync(owner: Any, name: str, label: str, timings: Timings, undo: Undo) -> None:
    original = getattr(owner, name)
    undo.append((owner, name, original))

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            timings[label].append((time.perf_counter() - start) * 1000)

    setattr(owner, name, timed)


def _wrap_async(owner: Any, name: str, label: Callable[..., str] | str, timings: Timings, undo: Undo) -> None:
    original = getattr(owner, name)
    undo.append((owner, name, original))

    @functools.wraps(original)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            key = label(*args, **kwargs) if callable(label) else label
            timings[key].append((time.perf_counter() - start) * 1000)

    setattr(owner, name, timed)


class _ModuleProxy:
    """A module's attributes, some of them replaced on this object only."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def restore(undo: Undo) -> None:
    for owner, name, original in reversed(undo):
        setattr(owner, name, original)


def instrument(timings: Timings) -> Undo:
    """Wraps the steps with timers; returns what restore() puts back."""
    undo: Undo = []
    from orchestrator_service.backends.local import backend, cgroups, network, nettools, sandbox, store, veth

    _wrap_async(backend.LocalBackend, "create", "create: LocalBackend.create, all of it (= CCT)", timings, undo)
    # sandbox's own reference to the subprocess module, so Popen calls
    # elsewhere (`ip`) are not counted as bwrap's.
    proxy = _ModuleProxy(getattr(sandbox, "subprocess"))
    undo.append((sandbox, "subprocess", getattr(sandbox, "subprocess")))
    setattr(sandbox, "subprocess", proxy)
    _wrap_sync(proxy, "Popen", "create: start bwrap (Popen: fork+exec, blocks the event loop)", timings, undo)
    _wrap_async(sandbox, "_read_pipe",
                lambda fd, *, first_byte_only: "create: wait for bwrap's ready byte (mounts, seccomp, init)"
                if first_byte_only else "create: wait for bwrap's info (namespaces made, pid 1 held)", timings, undo)
    _wrap_sync(cgroups.Cgroups, "create", "create: cgroup mkdir + limits (hold)", timings, undo)
    _wrap_sync(cgroups.Cgroups, "add", "create: cgroup add pid (hold)", timings, undo)
    _wrap_async(network.HostNetwork, "attach", "create: network attach, all of it (hold)", timings, undo)
    _wrap_sync(veth, "attach_veth",
               "create: network: rtnetlink requests (worker thread: veth, up, neighbour, route; inside: addr, neighbour, up)",
               timings, undo)
    _wrap_async(nettools, "run", "create: network: ip or nft run (network setup, egress)", timings, undo)
    _wrap_sync(store.Store, "save", "create: record write (store.save, every state change)", timings, undo)
    return undo


async def measure(n: int, interval_s: float, runs: int) -> Timings:
    from sandhub.bench.floor import FloorTarget
    from sandhub.bench.target import CreateParams, TargetError

    timings: Timings = defaultdict(list)
    undo = instrument(timings)
    target = FloorTarget()
    ids: list[str] = []
    try:
        await target.start()
        async def one(i: int) -> None:
            await asyncio.sleep(i * interval_s)
            try:
                c = await target.create(CreateParams(image="", cpu_millicores=0, memory_mib=0))
            except TargetError as e:
                if e.container_id:
                    ids.append(e.container_id)
                return
            ids.append(c.container_id)
            for _ in range(runs):
                start = time.perf_counter()
                await target.run(c.container_id, ("ls", "/"))
                timings["ls: whole run through the agent's socket (floor)"].append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for cid in ids:
            await target.delete(cid)
        await target.close()
        restore(undo)
    return timings


def table(timings: Timings) -> list[str]:
    lines = [f"{'step':<90} {'count':>6} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8}"]
    for label in sorted(timings):
        v = timings[label]
        lines.append(f"{label:<90} {len(v):>6} {percentile(v, 50):>8.2f} {percentile(v, 90):>8.2f} "
                     f"{sum(v) / len(v):>8.2f}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m sandhub.bench.steps", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=50)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--runs", type=int, default=5, help="`ls /` per container")
    args = p.parse_args()
    from sandhub import logs

    logs.configure(level="warning")
    print("\n".join(table(asyncio.run(measure(args.n, args.interval, args.runs)))))


if __name__ == "__main__":
    main()

