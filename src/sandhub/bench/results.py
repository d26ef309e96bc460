"""What a bench run measured: named metrics with their values and failures."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Metric:
    name: str
    unit: str
    description: str
    values: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    """Reason -> how many times; a reason is short and the same for the same cause."""

    def add(self, value: float) -> None:
        self.values.append(value)

    def fail(self, reason: str) -> None:
        self.failures[reason] += 1

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


@dataclass(frozen=True)
class MemorySample:
    """Memory held by idle containers, three ways, since each misses something."""

    containers: int
    """Alive containers when sampled."""
    cgroup_bytes: int | None
    """Sum of the containers' memory cgroups' usage (memory.usage_in_bytes on
    v1, memory.current on v2): their processes, tmpfs and kernel memory charged
    to them. None when the containers have no cgroups on this host."""
    pss_bytes: int | None
    """Sum of the proportional set size of the containers' processes, including
    the bwrap parent that lives outside the cgroup."""
    processes: int
    host_available_delta_bytes: int | None
    """How much the host's MemAvailable fell between before the first create and
    the sample: everything, including namespaces, page tables and the
    orchestrator's own records (and anything else the host did meanwhile)."""

    def per_container_mib(self) -> dict[str, float | None]:
        def mib(v: int | None) -> float | None:
            return None if v is None or not self.containers else v / self.containers / 2**20

        return {
            "cgroup": mib(self.cgroup_bytes),
            "pss": mib(self.pss_bytes),
            "host_available_delta": mib(self.host_available_delta_bytes),
        }


@dataclass
class Results:
    command: str
    """"spawn" or "floor"."""
    target: str
    """Which system was measured: "hub", "floor" (later "docker")."""
    target_detail: str
    scenario: str
    params: dict[str, Any]
    metrics: dict[str, Metric] = field(default_factory=dict)
    memory: MemorySample | None = None
    container_ids: list[str] = field(default_factory=list)
    """Containers that exist (or existed) because of this run."""
    leftovers: list[str] = field(default_factory=list)
    """Anything still there after cleanup: container ids, cgroups or pids."""
    kept: list[str] = field(default_factory=list)
    """Containers left alive on purpose (--keep)."""
    interrupted: bool = False
    wall_s: float = 0.0
    max_issue_lag_ms: float = 0.0
    """How late the scheduler issued its latest request; large means the
    client itself could not keep the open loop's pace (or --concurrency-cap held it)."""
    machine: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str, unit: str, description: str) -> Metric:
        """Declares a metric (in report order) or returns the declared one."""
        if name not in self.metrics:
            self.metrics[name] = Metric(name, unit, description)
        return self.metrics[name]

    @property
    def failed(self) -> bool:
        return self.interrupted or bool(self.leftovers) or any(m.failed for m in self.metrics.values())
