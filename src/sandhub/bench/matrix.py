"""`sandhub bench matrix`: the original table, every target side by side.

Cells are (mode, n): "burst" asks for a container every 0.1 s, "gradual"
every 1 s, n containers each; every cell runs the basic scenario (create,
then 10 × `ls /` per container) on each target, one target after the other,
before the next cell starts, so the targets see the same machine within
minutes of each other and the ratios stay honest on a noisy host. The order
of the targets rotates from cell to cell so none always goes first.

Each run is a plain bench run (spawn.run): its containers are deleted at its
end, also on Ctrl-C, which stops the matrix after that cleanup.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from sandhub.bench import host, report
from sandhub.bench.progress import Progress
from sandhub.bench.results import Results
from sandhub.bench.scenarios import NOT_CREATED, SCENARIOS, ScenarioOptions
from sandhub.bench.spawn import RunOptions, run
from sandhub.bench.target import CreateParams, Target, TargetError

MODES = {"burst": 0.1, "gradual": 1.0}
TARGETS = ("hub", "floor", "docker")
MEASURED = ("hub", "floor")
"""Targets whose failed containers fail the matrix (exit 1). Docker is the
reference: its failures under load (no answer in time, or not asked for
because the host's memory ran low) are a result, shown in the table and the
Failures section; Docker not running at all still fails the matrix."""


@dataclass(frozen=True)
class Cell:
    mode: str
    n: int

    @property
    def interval_s(self) -> float:
        return MODES[self.mode]


def cells(burst_sizes: Sequence[int], gradual_sizes: Sequence[int]) -> list[Cell]:
    return [Cell("burst", n) for n in burst_sizes] + [Cell("gradual", n) for n in gradual_sizes]


def estimated_s(plan: Sequence[Cell], targets: int) -> float:
    """The schedule alone (n × interval per run), a lower bound of the wall time."""
    return sum(c.n * c.interval_s for c in plan) * targets


def rotated(targets: Sequence[str], i: int) -> list[str]:
    k = i % len(targets) if targets else 0
    return list(targets[k:]) + list(targets[:k])


@dataclass(frozen=True)
class MatrixOptions:
    burst_sizes: tuple[int, ...] = (1, 20, 100, 1000)
    gradual_sizes: tuple[int, ...] = (1, 20, 100, 1000)
    targets: tuple[str, ...] = TARGETS
    runs: int = 10
    cpu_millicores: int = 0
    memory_mib: int = 0
    rpc_calls: int = 1000
    """Run and GetContainer calls for Hub CPU per 1,000 RPCs; 0 skips it."""
    docker_network: str = "bridge"
    settle_s: float = 1.0
    memory_reserve_mib: int = 2048
    """No create is asked for while the host's MemAvailable is below this."""


def summarize_cell(cell: Cell, out: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one run that the table needs, from report.to_json."""
    metrics = out["metrics"]

    def summary(name: str, key: str) -> float | None:
        s = (metrics.get(name) or {}).get("summary")
        return None if not s else float(s[key])

    return {
        "mode": cell.mode, "n": cell.n, "interval_s": cell.interval_s, "target": out["target"],
        "target_detail": out["target_detail"],
        "cct_p50_ms": summary("cct", "p50"), "cct_p99_ms": summary("cct", "p99"),
        "cct_count": (metrics.get("cct") or {}).get("count", 0),
        "create_p50_ms": summary("create", "p50"), "create_p99_ms": summary("create", "p99"),
        "ls_mean_ms": summary("ls", "mean"), "ls_p50_ms": summary("ls", "p50"), "ls_p99_ms": summary("ls", "p99"),
        "failures": failed_containers(metrics),
        "failure_reasons": grouped_reasons(metrics),
        "leftovers": len(out["leftovers"]), "interrupted": out["interrupted"],
        "wall_s": out["wall_s"], "max_issue_lag_ms": out["max_issue_lag_ms"],
        "memory": out["memory"],
        "cct_values": (metrics.get("cct") or {}).get("values", []),
        "container_ids": out["container_ids"],
        "error": "",
    }


def failed_containers(metrics: dict[str, Any]) -> int:
    """Containers of the run that failed: not created, or created with an
    `ls /` that failed (one count per container, however many steps failed)."""
    created_failed = int((metrics.get("create") or {}).get("failures", 0))
    ls_failed = sum(int(count) for reason, count in ((metrics.get("ls_mean") or {}).get("failure_reasons") or {}).items()
                    if reason != NOT_CREATED)
    return created_failed + ls_failed


_REQUEST_ID = re.compile(r"(request id )[0-9a-f]{8,}")


def grouped_reasons(metrics: dict[str, Any]) -> dict[str, int]:
    """"metric: reason" -> count, request ids blanked so that one cause over
    many calls is one line (the Hub's INTERNAL errors quote theirs). Steps
    skipped because an earlier one failed are left out: the earlier one is
    the cause, and is listed."""
    out: dict[str, int] = {}
    for name, m in metrics.items():
        for reason, count in m["failure_reasons"].items():
            if reason.startswith("skipped:"):
                continue
            key = name + ": " + _REQUEST_ID.sub(r"\1...", reason)
            out[key] = out.get(key, 0) + count
    return out


def failed_cell(cell: Cell, target: str, reason: str) -> dict[str, Any]:
    return {"mode": cell.mode, "n": cell.n, "interval_s": cell.interval_s, "target": target,
            "target_detail": "", "error": reason, "failures": 0, "failure_reasons": {}, "leftovers": 0,
            "interrupted": False, "cct_values": [], "container_ids": [], "memory": None}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


@dataclass
class Matrix:
    options: MatrixOptions
    command: str
    started: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    rpc_cpu: dict[str, Any] | None = None
    interrupted: bool = False
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        o = self.options
        return {
            "command": self.command, "started": self.started, "machine": self.machine,
            "options": {"burst_sizes": list(o.burst_sizes), "gradual_sizes": list(o.gradual_sizes),
                        "targets": list(o.targets), "runs": o.runs, "cpu_millicores": o.cpu_millicores,
                        "memory_mib": o.memory_mib, "rpc_calls": o.rpc_calls, "docker_network": o.docker_network,
                        "memory_reserve_mib": o.memory_reserve_mib},
            "runs": self.runs, "rpc_cpu": self.rpc_cpu, "interrupted": self.interrupted,
            "wall_s": round(self.wall_s, 1), "notes": self.notes,
        }

    @property
    def failed(self) -> bool:
        """Interrupted, a target not run, anything left behind, or a failed
        container of a measured target (MEASURED; Docker's are results)."""
        return self.interrupted or any(
            r["error"] or r["leftovers"] or (r["failures"] and r["target"] in MEASURED) for r in self.runs)


TargetFactory = Callable[[str], Target]


def default_factory(options: MatrixOptions) -> TargetFactory:
    def make(name: str) -> Target:
        if name == "hub":
            from sandhub.bench.local import LocalHubTarget

            return LocalHubTarget(api_key="dev-key", timeout_s=120)
        if name == "floor":
            from sandhub.bench.floor import FloorTarget

            return FloorTarget()
        if name == "docker":
            from sandhub.bench.docker import DockerTarget

            return DockerTarget(network=options.docker_network)
        raise ValueError(f"unknown target {name!r}")

    return make


async def run_matrix(matrix: Matrix, *, factory: TargetFactory | None = None, say: Callable[[str], None] = print,
                     progress: bool = False) -> Matrix:
    """Fills ``matrix``; stops early (interrupted) on cancellation, after the
    interrupted run cleaned up."""
    o = matrix.options
    make = factory or default_factory(o)
    matrix.started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    matrix.machine = {**host.machine(), "load_before": load_average()}
    scenario = SCENARIOS["basic"]
    options = ScenarioOptions(create=CreateParams(image="", cpu_millicores=o.cpu_millicores, memory_mib=o.memory_mib),
                              runs=o.runs, memory_reserve_mib=o.memory_reserve_mib)
    start = time.perf_counter()
    plan = cells(o.burst_sizes, o.gradual_sizes)
    try:
        for i, cell in enumerate(plan):
            for name in rotated(o.targets, i):
                say(f"{cell.mode} x {cell.n}: {name}")
                results = Results(command="matrix", target=name, target_detail="", scenario="basic",
                                  params={"n": cell.n, "interval_s": cell.interval_s, "runs": o.runs},
                                  machine=matrix.machine)
                try:
                    await run(make(name), scenario, options,
                              RunOptions(n=cell.n, interval_s=cell.interval_s, settle_s=o.settle_s), results,
                              progress=Progress(cell.n, enabled=progress))
                except TargetError as e:
                    matrix.runs.append(failed_cell(cell, name, e.reason))
                    say(f"  {name} unavailable: {e.reason}")
                    continue
                row = summarize_cell(cell, report.to_json(results))
                matrix.runs.append(row)
                say(f"  CCT p50 {_ms(row['cct_p50_ms'])} p99 {_ms(row['cct_p99_ms'])}, "
                    f"ls mean {_ms(row['ls_mean_ms'])}, failures {row['failures']}, left {row['leftovers']}")
                for reason, count in sorted(row["failure_reasons"].items(), key=lambda kv: -kv[1])[:3]:
                    say(f"    {count} x {reason}")
                if results.interrupted:
                    matrix.interrupted = True
                    return matrix
        if o.rpc_calls and "hub" in o.targets:
            from sandhub.bench import rpc_cpu

            say(f"Hub CPU: {o.rpc_calls} Run and {o.rpc_calls} GetContainer calls on servers of their own")
            try:
                matrix.rpc_cpu = (await rpc_cpu.measure(calls=o.rpc_calls)).to_json()
            except TargetError as e:
                matrix.notes.append(f"Hub CPU per 1,000 RPCs not measured: {e.reason}")
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        matrix.interrupted = True
    finally:
        matrix.wall_s = time.perf_counter() - start
        matrix.machine["load_after"] = load_average()
    return matrix


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def with_sizes(options: MatrixOptions, *, burst: Sequence[int] | None, gradual: Sequence[int] | None) -> MatrixOptions:
    return replace(options, burst_sizes=tuple(burst if burst is not None else options.burst_sizes),
                   gradual_sizes=tuple(gradual if gradual is not None else options.gradual_sizes))
