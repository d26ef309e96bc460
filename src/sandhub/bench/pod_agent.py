"""A real sandhub-agent standing in for a cluster container's main process.

KWOK and moto run no containers, so `sandhub bench k8s-exec` and the cluster
tests start the agent themselves, as the pod or task would: its init
container's `install` first (when given), then the main container's command
and environment exactly as the backend wrote them (container id, credential),
listening at the address the backend reports for the container (a loopback
pod or task IP). Only the listen address (one IP, not 0.0.0.0: many "pods"
share this host), the install destination and the state and work
directories are this host's.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port free on every address (the agent port of a test installation)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


@dataclass
class ListeningAgent:
    address: str
    process: asyncio.subprocess.Process
    work: Path
    binary: Path
    """The binary it runs: the init container's copy when one was installed."""

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def _replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


async def _install(binary: str, install: Sequence[str], root: Path) -> Path:
    """Runs the init container's `<agent> install [--chown U:G] DEST [DIR...]`
    with DEST and every DIR under ``root``; returns DEST."""
    args = list(install[1:])
    if args[:1] != ["install"]:
        raise AssertionError(f"the init container's command is not `<agent> install ...`: {list(install)}")
    owner = args[1:3] if args[1:2] == ["--chown"] else []
    paths = args[1 + len(owner):]
    if not paths or (len(paths) > 1 and not owner):
        raise AssertionError(f"the init container's command is not `<agent> install [--chown U:G] DEST [DIR...]`: "
                             f"{list(install)}")
    dest, *dirs = (root / p.lstrip("/") for p in paths)
    dest.parent.mkdir(parents=True, exist_ok=True)
    done = await asyncio.create_subprocess_exec(binary, "install", *owner, str(dest), *map(str, dirs),
                                                stdin=asyncio.subprocess.DEVNULL)
    if await done.wait() != 0 or not os.access(dest, os.X_OK):
        raise AssertionError(f"`sandhub-agent install {dest}` failed (exit {done.returncode})")
    if owner and any(d.stat().st_uid != int(owner[1].split(":")[0]) for d in dirs):
        raise AssertionError(f"`sandhub-agent install {' '.join(args[1:])}` did not hand {dirs} over")
    return dest


async def start_agent_as(binary: str, argv: Sequence[str], env: dict[str, str], *, ip: str, port: int, root: Path,
                         install: Sequence[str] = ()) -> ListeningAgent:
    """Runs ``argv`` (the container's command: the agent and its flags; the
    agent is ``binary``, or the copy ``install`` made), listening on
    ``ip:port``, with ``env`` (the container's)."""
    work, state = root / "work", root / "state"
    work.mkdir(parents=True, exist_ok=True)
    program = await _install(binary, install, root) if install else Path(binary)
    args = _replace_flag(list(argv[1:]), "--listen", f"tcp:{ip}:{port}")
    args = _replace_flag(args, "--state-dir", str(state))
    process = await asyncio.create_subprocess_exec(
        str(program), *args, f"--workdir={work}",
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env, "HOME": str(work)},
        stdin=asyncio.subprocess.DEVNULL)
    agent = ListeningAgent(f"{ip}:{port}", process, work, program)
    for _ in range(1000):
        if process.returncode is not None:
            break
        try:
            _, writer = await asyncio.open_connection(ip, port)
            writer.close()
            return agent
        except OSError:
            await asyncio.sleep(0.01)
    await agent.stop()
    raise AssertionError(f"sandhub-agent did not listen on {ip}:{port} (exit {process.returncode})")
