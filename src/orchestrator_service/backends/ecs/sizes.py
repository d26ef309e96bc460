"""Fargate's task sizes: cpu/memory requests rounded up to a pair it runs.

Fargate runs a task only at fixed (vCPU, memory) pairs; anything else is
refused at RunTask. A request is rounded up to the smallest valid pair that
holds it (what Fargate bills, and what Get reports). A request that no pair
within the operator's limits holds is INVALID_ARGUMENT naming the nearest
pairs, so the caller can pick one. EC2 capacity runs any size: no rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sandhub.errors import InvalidField

CPU_UNITS_PER_CORE = 1024
"""ECS counts CPU in units, 1,024 to a vCPU; sandhub in millicores, 1,000 to a core."""


def _steps(low: int, high: int, step: int) -> tuple[int, ...]:
    return tuple(range(low, high + 1, step))


FARGATE_SIZES: dict[int, tuple[int, ...]] = {
    256: (512, 1024, 2048),
    512: _steps(1024, 4096, 1024),
    1024: _steps(2048, 8192, 1024),
    2048: _steps(4096, 16384, 1024),
    4096: _steps(8192, 30720, 1024),
    8192: _steps(16384, 61440, 4096),
    16384: _steps(32768, 122880, 8192),
}
"""CPU units -> the memory sizes (MiB) Fargate runs with them (Linux, platform 1.4)."""


@dataclass(frozen=True)
class TaskSize:
    cpu_units: int
    memory_mib: int

    @property
    def cpu_millicores(self) -> int:
        return self.cpu_units * 1000 // CPU_UNITS_PER_CORE

    def __str__(self) -> str:
        return f"{self.cpu_millicores}m/{self.memory_mib}MiB"


def to_units(cpu_millicores: int) -> int:
    return -(-cpu_millicores * CPU_UNITS_PER_CORE // 1000)


def fargate_size(cpu_millicores: int, memory_mib: int, *, max_cpu_millicores: int, max_memory_mib: int) -> TaskSize:
    """The smallest Fargate pair holding the request, within the limits."""
    units = to_units(cpu_millicores)
    for cpu, memories in FARGATE_SIZES.items():
        if cpu < units:
            continue
        memory = next((m for m in memories if m >= memory_mib), None)
        if memory is None:
            continue
        size = TaskSize(cpu, memory)
        if size.cpu_millicores <= max_cpu_millicores and memory <= max_memory_mib:
            return size
        break  # larger pairs only get further past the limits
    raise _impossible(cpu_millicores, memory_mib, max_cpu_millicores, max_memory_mib)


def _impossible(cpu_millicores: int, memory_mib: int, max_cpu: int, max_memory: int) -> InvalidField:
    allowed = [TaskSize(c, m) for c, ms in FARGATE_SIZES.items() for m in ms
               if TaskSize(c, m).cpu_millicores <= max_cpu and m <= max_memory]
    # Nearest: the pairs that fall least short of the request (in ratio, cpu
    # and memory alike), then those that overshoot it least.
    def shortfall(s: TaskSize) -> tuple[float, float]:
        cpu, memory = math.log(s.cpu_millicores / cpu_millicores), math.log(s.memory_mib / memory_mib)
        return -min(0.0, cpu) - min(0.0, memory), max(0.0, cpu) + max(0.0, memory)

    allowed.sort(key=shortfall)
    # The cpu fits some pair: the memory is what no pair with it holds.
    fits_cpu = any(to_units(cpu_millicores) <= s.cpu_units for s in allowed)
    field = "resources.memory_mib" if fits_cpu else "resources.cpu_millicores"
    nearest = ", ".join(str(s) for s in allowed[:3])
    return InvalidField(field, f"Fargate runs no task of {cpu_millicores} millicores with {memory_mib} MiB "
                               f"within this installation's limits; nearest sizes (cpu/memory): {nearest}")
