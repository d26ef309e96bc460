"""What a chaos run's containers left on this host, found without the
backend's own code: cgroups under the run's parent, host veths with the run's
alias, processes in those cgroups or carrying a container id the run knows,
the Hubs' exec directories and their fork servers."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_HIERARCHIES = ("", "cpu", "memory", "pids", "unified")
"""v2 at the root, or the v1 controllers the local backend uses (and a v2 mount beside them)."""
ENV_CONTAINER_ID = b"SANDHUB_CONTAINER_ID="
EXEC_DIR_PREFIX = "sandhub-exec-"
SPAWNER_MODULE = b"orchestrator_service.backends.local.spawner"


@dataclass
class HostTraces:
    cgroups: dict[str, list[str]] = field(default_factory=dict)
    """container id -> its cgroup directories."""
    veths: dict[str, str] = field(default_factory=dict)
    """container id -> host veth name."""
    processes: dict[str, list[int]] = field(default_factory=dict)
    """container id -> pids in its cgroup or with its id in their environment."""

    def container_ids(self) -> set[str]:
        return set(self.cgroups) | set(self.veths) | set(self.processes)

    def of(self, container_ids: Iterable[str]) -> list[str]:
        """Readable lines for what these containers left."""
        out = []
        for cid in sorted(set(container_ids)):
            if cid in self.cgroups:
                out.append(f"{cid}: cgroup {self.cgroups[cid][0]}")
            if cid in self.veths:
                out.append(f"{cid}: veth {self.veths[cid]}")
            if cid in self.processes:
                out.append(f"{cid}: pids {sorted(self.processes[cid])[:5]}")
        return out


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def scan(*, cgroup_parent: str, veth_alias_prefix: str, known_ids: Iterable[str] = ()) -> HostTraces:
    traces = HostTraces()
    for hierarchy in CGROUP_HIERARCHIES:
        base = CGROUP_ROOT / hierarchy / cgroup_parent
        try:
            children = [d for d in os.listdir(base) if os.path.isdir(base / d)]
        except OSError:
            continue
        for cid in children:
            traces.cgroups.setdefault(cid, []).append(str(base / cid))
    try:
        links = os.listdir("/sys/class/net")
    except OSError:
        links = []
    for name in links:
        alias = _read(f"/sys/class/net/{name}/ifalias").decode(errors="replace").strip()
        if alias.startswith(veth_alias_prefix):
            traces.veths[alias[len(veth_alias_prefix):]] = name
    known = {cid.encode() for cid in known_ids} | {cid.encode() for cid in traces.container_ids()}
    marker = f"/{cgroup_parent}/".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        owner = b""
        for line in _read(f"/proc/{pid}/cgroup").splitlines():
            path = line.split(b":", 2)[-1]
            if marker in path + b"/":
                owner = (path + b"/").split(marker, 1)[1].split(b"/", 1)[0]
                break
        if not owner:
            env = _read(f"/proc/{pid}/environ")
            at = env.find(ENV_CONTAINER_ID)
            if at >= 0:
                value = env[at + len(ENV_CONTAINER_ID):].split(b"\0", 1)[0]
                owner = value if value in known else b""
        if owner:
            traces.processes.setdefault(owner.decode(errors="replace"), []).append(int(pid))
    return traces


def exec_dirs(tmp: Path) -> list[str]:
    """The Hubs' exec directories (their fork servers' sockets) under a TMPDIR."""
    try:
        return sorted(str(tmp / d) for d in os.listdir(tmp) if d.startswith(EXEC_DIR_PREFIX))
    except OSError:
        return []


def exec_dirs_of_dead_hubs(tmp: Path) -> list[str]:
    """Exec directories under ``tmp`` that no live fork server listens in:
    what a killed Hub left (a live Hub's fork server names its socket there)."""
    live = b"\0".join(_read(f"/proc/{pid}/cmdline") for pid in fork_servers(tmp))
    return [d for d in exec_dirs(tmp) if (d + "/").encode() not in live]


def fork_servers(tmp: Path) -> list[int]:
    """Live exec fork servers (and their pre-forked helpers) whose socket is under ``tmp``."""
    found = []
    needle = str(tmp).encode() + b"/"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        cmdline = _read(f"/proc/{pid}/cmdline")
        if SPAWNER_MODULE in cmdline and needle in cmdline:
            found.append(int(pid))
    return found
