"""The host tools and files the local backend's networking touches: `ip` and
`nft` runs (once per Orchestrator, never per container), sysctls and
/sys/class/net. Shared by network.py and veth.py."""

from __future__ import annotations

import asyncio
import os
import shutil

TOOL_TIMEOUT_S = 10.0
SEARCH_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin")
SYS_NET = "/sys/class/net"


class NetworkError(Exception):
    """A network change failed; the message carries the tool's stderr."""


def find(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SEARCH_PATH))
    if not found:
        raise NetworkError(f"`{name}` not found; install the {package} package")
    return found


def exists(ifname: str) -> bool:
    return os.path.exists(os.path.join(SYS_NET, ifname))


def read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def master(ifname: str) -> str:
    """The bridge ``ifname`` is a port of, or ""."""
    try:
        return os.path.basename(os.readlink(os.path.join(SYS_NET, ifname, "master")))
    except OSError:
        return ""


def ifindex(ifname: str, attribute: str = "ifindex") -> int:
    """The index of a host interface (``iflink``: of a veth's peer, in the peer's namespace)."""
    try:
        with open(os.path.join(SYS_NET, ifname, attribute)) as f:
            return int(f.read(), 0)
    except (OSError, ValueError) as e:
        raise NetworkError(f"{ifname}: no {attribute} ({e})") from None


def write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        pass  # e.g. IPv6 disabled on the host: nothing to turn off
    except OSError as e:
        raise NetworkError(f"cannot write {path}: {e}") from e


async def run(argv: list[str], script: str = "", *, timeout_s: float = TOOL_TIMEOUT_S) -> None:
    """Runs one tool with ``script`` on stdin; raises NetworkError on failure."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.pathsep.join(SEARCH_PATH), "LC_ALL": "C"},
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(script.encode()), timeout_s)
    except BaseException:
        # Timed out or cancelled: end our own child, by its pid.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip()
        raise NetworkError(f"{os.path.basename(argv[0])} failed ({proc.returncode}): {detail}")
