"""Small Linux facts shared by the sandbox builder, the seccomp filter, the
network and the uid claims. Standard library only."""

from __future__ import annotations

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000


def start_ticks(pid: int) -> int:
    """The process's start time in clock ticks since boot; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # Field 22, counted after the parenthesised command name (which may hold spaces).
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def is_same_process(pid: int, ticks: int) -> bool:
    """True while ``pid`` is still the process that started at ``ticks`` (not
    a newer one that got the same pid)."""
    return pid > 0 and ticks > 0 and start_ticks(pid) == ticks
