"""What the bench reads from this host: the machine, its free memory, and the
cgroups and processes belonging to containers (for the memory sample and to
check that nothing was left behind). Blocking reads; call through a thread."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")
SYS_NET = Path("/sys/class/net")
CONTAINER_ENV_MARKER = b"SANDHUB_CONTAINER_ID="
"""bwrap's command line carries `--setenv SANDHUB_CONTAINER_ID <id>`: how its
processes outside the container's cgroup (the bwrap parent) are found."""


def machine() -> dict[str, Any]:
    """A short description of where the numbers were taken."""
    model = ""
    try:
        for line in (PROC / "cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count() or 0,
        "cpu_model": model,
        "memory_total_mib": meminfo("MemTotal") // 2**20 if meminfo("MemTotal") else 0,
        "kernel": platform.release(),
        "cgroup": cgroup_version(),
        "python": platform.python_version(),
    }


def meminfo(key: str) -> int:
    """A /proc/meminfo field in bytes; 0 if missing."""
    try:
        for line in (PROC / "meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == key:
                return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cgroup_version(root: Path = CGROUP_ROOT) -> str:
    if (root / "cgroup.controllers").exists():
        return "v2"
    if (root / "memory" / "cgroup.procs").exists():
        return "v1"
    return ""


def cgroup_index(parent: str, root: Path = CGROUP_ROOT) -> dict[str, list[Path]]:
    """Cgroup directories under ``parent`` (on v2 ``root/parent``, on v1
    ``root/<controller>/parent``) by name, one or two levels down: the local
    backend puts a container at ``parent/<id>`` or, with one cgroup parent
    per orchestrator, at ``parent/<instance>/<id>``."""
    tops = [root / parent]
    try:
        tops += [c / parent for c in root.iterdir() if c.is_dir() and not c.is_symlink()]
    except OSError:
        pass
    index: dict[str, list[Path]] = {}
    for top in tops:
        for level1 in _subdirs(top):
            index.setdefault(level1.name, []).append(level1)
            for level2 in _subdirs(level1):
                index.setdefault(level2.name, []).append(level2)
    return index


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except OSError:
        return []


def memory_cgroup(dirs: Iterable[Path]) -> tuple[Path, str] | None:
    """Of a container's cgroup directories, the memory one and its usage file."""
    for d in dirs:
        for usage in ("memory.usage_in_bytes", "memory.current"):
            if (d / usage).exists():
                return d, usage
    return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def container_processes(container_ids: Iterable[str], parent: str) -> dict[str, set[int]]:
    """Host pids per container: those in its memory cgroup, plus any process
    whose environment names it (bwrap's parent, outside the cgroup) or whose
    command line does (Docker's containerd-shim for that container)."""
    wanted = set(container_ids)
    found: dict[str, set[int]] = {cid: set() for cid in wanted}
    index = cgroup_index(parent)
    for cid in wanted:
        mem = memory_cgroup(index.get(cid, []))
        if mem is not None:
            try:
                found[cid].update(int(p) for p in (mem[0] / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                pass
    wanted_args = {cid.encode() for cid in wanted if len(cid) >= 12}
    for pid, cmdline, environ in _cmdlines():
        for var in environ.split(b"\x00"):  # bwrap's parent: its environment is the container id
            if var.startswith(CONTAINER_ENV_MARKER):
                cid = var[len(CONTAINER_ENV_MARKER):].decode(errors="replace")
                if cid in wanted:
                    found[cid].add(pid)
        # A helper given the id as an argument of its own: Docker's
        # containerd-shim-runc-v2 -id <id>, one per container, outside its cgroup.
        for arg in wanted_args.intersection(cmdline.split(b"\x00")):
            found[arg.decode()].add(pid)
    return found


def _cmdlines() -> Iterable[tuple[int, bytes, bytes]]:
    """Every process's command line and environment."""
    for name in os.listdir(PROC):
        if not name.isdigit():
            continue
        try:
            yield int(name), (PROC / name / "cmdline").read_bytes(), (PROC / name / "environ").read_bytes()
        except OSError:
            continue


def pss_bytes(pid: int) -> int | None:
    """The process's proportional set size, or None if it is gone or unreadable."""
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class ContainerMemory:
    cgroup_bytes: int | None
    """None when none of the containers has a memory cgroup here."""
    pss_bytes: int | None
    processes: int


def container_memory(container_ids: Iterable[str], parent: str) -> ContainerMemory:
    ids = list(container_ids)
    cgroup_total: int | None = None
    index = cgroup_index(parent)
    for cid in ids:
        mem = memory_cgroup(index.get(cid, []))
        usage = _read_int(mem[0] / mem[1]) if mem else None
        if usage is not None:
            cgroup_total = (cgroup_total or 0) + usage
    pids = set().union(*container_processes(ids, parent).values()) if ids else set()
    pss = [v for v in map(pss_bytes, pids) if v is not None]
    return ContainerMemory(cgroup_total, sum(pss) if pss else None, len(pss))


def leftovers(container_ids: Iterable[str], parent: str) -> list[str]:
    """What remains on the host of these local-backend containers: cgroup
    directories, host-side veths and processes, one line each."""
    from orchestrator_service.backends.local.network import veth_name

    ids = list(container_ids)
    if not ids:
        return []
    index = cgroup_index(parent)
    found = [f"{cid}: cgroup {d}" for cid in ids for d in index.get(cid, [])]
    found.extend(f"{cid}: veth {veth_name(cid)}" for cid in ids if (SYS_NET / veth_name(cid)).exists())
    for cid, pids in sorted(container_processes(ids, parent).items()):
        found.extend(f"{cid}: process {pid}" for pid in sorted(pids))
    return found
