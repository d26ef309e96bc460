"""What a chaos run's containers left on this host, found without the
backend's own code: cgroups under the run's parent, host veths with the run's
alias, processes in those cgroups or carrying a container id the run knows."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_HIERARCHIES = ("", "cpu", "memory", "pids", "unified")
"""v2 at the root, or the v1 controllers the local backend uses (and a v2 mount beside them)."""
ENV_CONTAINER_ID = b"SANDHUB_CONTAINER_ID="


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
