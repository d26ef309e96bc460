"""Per-container cgroups: CPU quota, memory (OOM inside the container only) and pids.

Works on cgroup v2 (one hierarchy, /sys/fs/cgroup/sandhub/<instance>/<id>) and
on v1 (a directory per controller, /sys/fs/cgroup/<controller>/sandhub/<instance>/<id>).
<instance> is derived from the state directory, so two orchestrators on one
host (two checkouts testing at once) never take each other's cgroups for
orphans. The
sandbox's pid-1 is moved in while bwrap holds it before it starts anything,
so every process of the container is born inside.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PARENT = "sandhub"
CFS_PERIOD_US = 100_000
V1_CONTROLLERS = ("cpu", "memory", "pids")


@dataclass(frozen=True)
class Limits:
    cpu_millicores: int
    memory_mib: int
    pids: int


def parent_for(state_dir: Path) -> str:
    """The cgroup parent of the containers of the orchestrator using ``state_dir``."""
    digest = hashlib.sha256(str(state_dir.absolute()).encode()).hexdigest()[:10]
    return f"{PARENT}/{digest}"


def detect(root: Path = ROOT) -> str:
    """"v2", "v1" or "" (no usable cgroups: limits can't be enforced)."""
    controllers = root / "cgroup.controllers"
    if controllers.exists() and {"memory", "pids"} <= set(controllers.read_text().split()):
        return "v2"
    if all((root / c / "cgroup.procs").exists() for c in V1_CONTROLLERS):
        return "v1"
    return ""


FEATURES = Path("/sys/kernel/cgroup/features")
MOUNTINFO = Path("/proc/self/mountinfo")


def cgroup2_options(mountinfo: str) -> list[str] | None:
    """The super options of the host's cgroup2 hierarchy (one for every mount
    of it), without rw/ro; None when no cgroup2 is mounted."""
    for line in mountinfo.splitlines():
        _, sep, after = line.partition(" - ")
        fields = after.split()
        if sep and len(fields) >= 3 and fields[0] == "cgroup2":
            return [o for o in fields[2].split(",") if o not in ("rw", "ro")]
    return None


def favordynmods_state() -> tuple[bool | None, list[str] | None]:
    """(whether the host's cgroup favordynmods is on, None if this kernel has
    none; the cgroup2 options, None if cgroup2 is not mounted)."""
    try:
        features = FEATURES.read_text().split()
    except OSError:
        features = []
    if "favordynmods" not in features:
        return None, None
    try:
        options = cgroup2_options(MOUNTINFO.read_text())
    except OSError:
        options = None
    return options is not None and "favordynmods" in options, options


def favor_dynmods(*, enable: bool, scratch: Path) -> str:
    """Turns on cgroup's ``favordynmods`` for the host, if asked and possible;
    says how it stands.

    Without it, moving a process into a cgroup (every container start and
    every command entering one) takes the kernel's global threadgroup lock for
    writing and waits for an RCU grace period: 8-13 ms each on this project's
    2-core test machine (`python -m sandhub.bench.steps`: "cgroup add pid"
    13.1 ms p50 before, 0.17 ms after; CCT 25.9 -> 13.1 ms). The option is
    made for workloads that change cgroups often; the kernel documents its
    price as slightly dearer forks and exits. It is a flag of the cgroup2
    hierarchy, global to the host, applied by any mount of cgroup2 from the
    initial cgroup namespace: so this mounts cgroup2 once more, with the
    options it already has plus favordynmods, in a private mount namespace
    of a short-lived `unshare` (nothing visible is remounted), on an empty
    directory under ``scratch``. Recent kernels (this machine's 6.18 among
    them) can't turn it off again until reboot; it is never turned off here."""
    on, options = favordynmods_state()
    if on is None:
        return "not supported by this kernel (Linux 6.0+): each cgroup move waits for an RCU grace period"
    if on:
        return "on"
    if not enable:
        return "off (configured): each cgroup move waits for an RCU grace period"
    if options is None:
        # A mount resets every hierarchy flag it does not name: without the
        # current ones (nsdelegate, memory_recursiveprot, ...) to repeat, it
        # could turn the host's off.
        return "off: no cgroup2 mount to read the hierarchy's options from, so it is left alone"
    failed = mount_cgroup2_privately([*options, "favordynmods"], scratch)
    if failed:
        return f"off: turning it on failed ({failed})"
    if not favordynmods_state()[0]:  # e.g. mounted from a cgroup namespace of our own: no effect
        return "off: cgroup2 mounted with favordynmods, but the hierarchy did not take it"
    return "on (turned on: cgroup2 mounted with favordynmods)"


def mount_cgroup2_privately(options: list[str], scratch: Path) -> str:
    """Mounts cgroup2 with ``options`` on an empty directory under ``scratch``
    in the private mount namespace of a short-lived `unshare`, which applies
    them to the host's cgroup2 hierarchy and leaves no mount behind; "" when
    done, else why not."""
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")
    if unshare is None:
        return "`unshare` (util-linux) not found"
    scratch.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="cgroup2-", dir=scratch))
    try:
        done = subprocess.run(
            [unshare, "--mount", "--propagation", "private", "--", "mount", "-t", "cgroup2", "-o",
             ",".join(options), "cgroup2", str(target)],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    finally:
        with contextlib.suppress(OSError):
            target.rmdir()
    return "" if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Cgroups:
    def __init__(self, version: str, root: Path = ROOT, parent: str = PARENT) -> None:
        self.version = version
        self._root = root
        self._parent = parent

    def dirs(self, container_id: str) -> list[Path]:
        if self.version == "v2":
            return [self._root / self._parent / container_id]
        if self.version == "v1":
            return [self._root / c / self._parent / container_id for c in V1_CONTROLLERS]
        return []

    def prepare(self) -> None:
        """Creates the parent cgroups (each level, with the controllers enabled on v2)."""
        levels = [Path(*self._parent.split("/")[: i + 1]) for i in range(len(self._parent.split("/")))]
        if self.version == "v2":
            wanted = {"cpu", "memory", "pids"} & set((self._root / "cgroup.controllers").read_text().split())
            enable = " ".join(f"+{c}" for c in sorted(wanted))
            _write(self._root / "cgroup.subtree_control", enable)
            for level in levels:
                (self._root / level).mkdir(exist_ok=True)
                _write(self._root / level / "cgroup.subtree_control", enable)
        elif self.version == "v1":
            for c in V1_CONTROLLERS:
                for level in levels:
                    (self._root / c / level).mkdir(exist_ok=True)

    def create(self, container_id: str, limits: Limits) -> None:
        for d in self.dirs(container_id):
            d.mkdir(exist_ok=True)
        memory = limits.memory_mib * 1024 * 1024
        quota = limits.cpu_millicores * CFS_PERIOD_US // 1000
        if self.version == "v2":
            (d,) = self.dirs(container_id)
            _write(d / "memory.max", str(memory))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(limits.pids))
            if (d / "cpu.max").exists():
                _write(d / "cpu.max", f"{quota} {CFS_PERIOD_US}")
        elif self.version == "v1":
            cpu, mem, pids = self.dirs(container_id)
            _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(quota))
            _write(mem / "memory.limit_in_bytes", str(memory))
            if (mem / "memory.memsw.limit_in_bytes").exists():
                # Without it swap is a way around the memory limit.
                _write(mem / "memory.memsw.limit_in_bytes", str(memory))
            _write(pids / "pids.max", str(limits.pids))

    def add(self, container_id: str, pid: int) -> None:
        for d in self.dirs(container_id):
            _write(d / "cgroup.procs", str(pid))

    def oom_kills(self, container_id: str) -> int:
        """How many processes the OOM killer ended in this container."""
        for d in self.dirs(container_id):
            for name in ("memory.events", "memory.oom_control"):
                try:
                    text = (d / name).read_text()
                except OSError:
                    continue
                for line in text.splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        return 0

    def processes(self, container_id: str) -> list[int]:
        """Pids still in the container's cgroups (any of them)."""
        found: set[int] = set()
        for d in self.dirs(container_id):
            try:
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
        return sorted(found)

    def kill(self, container_id: str) -> int:
        """SIGKILLs every process still in the container's cgroups: whatever a
        crash let start there (an init whose launcher was killed before it
        exec'd) has no other way to be found. Through a pidfd opened while the
        pid is still a member, so a pid reused meanwhile is never signalled.
        Returns how many were signalled."""
        signalled = 0
        for pid in self.processes(container_id):
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue  # gone already
            try:
                if pid in self.processes(container_id):  # still the same process: the pidfd pins it
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    signalled += 1
            except OSError:
                pass
            finally:
                os.close(fd)
        return signalled

    def remove(self, container_id: str, *, timeout_s: float = 2.0) -> bool:
        """Removes the container's cgroups once their processes are gone;
        returns False if one is still busy after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for d in self.dirs(container_id):
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        return False
                    time.sleep(0.01)
        return True

    def remove_parent(self) -> None:
        """Removes this orchestrator's parent cgroups if no container is left in
        them (an orchestrator that stops with containers running keeps them)."""
        parents = ([self._root / self._parent] if self.version == "v2"
                   else [self._root / c / self._parent for c in V1_CONTROLLERS])
        for parent in parents:
            try:
                parent.rmdir()
            except OSError:
                pass  # containers still in it, or never made

    def leftovers(self) -> list[str]:
        """Container ids that still have a cgroup."""
        found: set[str] = set()
        parents = ([self._root / self._parent] if self.version == "v2"
                   else [self._root / c / self._parent for c in V1_CONTROLLERS])
        for parent in parents:
            if parent.is_dir():
                found.update(p.name for p in parent.iterdir() if p.is_dir())
        return sorted(found)
