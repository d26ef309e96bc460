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
        await stop_process(self.process)


async def stop_process(process: asyncio.subprocess.Process, *, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; waited for either way."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), grace_s)
        except TimeoutError:
            process.kill()
            await process.wait()


def _replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def _host(root: Path, path: str) -> Path:
    """Where a path of the container is on this host."""
    return root / path.lstrip("/")


INSTALL_FLAGS = ("--chown", "--token-env", "--token-file")
"""The install flags the backends use, each with one value."""


async def _install(binary: str, install: Sequence[str], root: Path, env: dict[str, str]) -> Path:
    """Runs the init container's `<agent> install [FLAG VALUE...] DEST [DIR...]`
    with ``env`` (its environment) and every path under ``root``; returns DEST."""
    args = list(install[1:])
    usage = f"the init container's command is not `<agent> install [FLAG VALUE...] DEST [DIR...]`: {list(install)}"
    if args[:1] != ["install"]:
        raise AssertionError(usage)
    flags: dict[str, str] = {}
    rest = args[1:]
    while rest[:1] and rest[0] in INSTALL_FLAGS and len(rest) > 1:
        flags[rest[0]] = rest[1]
        rest = rest[2:]
    if not rest or rest[0].startswith("--") or (len(rest) > 1 and "--chown" not in flags):
        raise AssertionError(usage)
    dest, *dirs = (_host(root, p) for p in rest)
    token_file = _host(root, flags["--token-file"]) if "--token-file" in flags else None
    mapped = [*(["--chown", flags["--chown"]] if "--chown" in flags else []),
              *(["--token-env", flags["--token-env"]] if "--token-env" in flags else []),
              *(["--token-file", str(token_file)] if token_file else [])]
    dest.parent.mkdir(parents=True, exist_ok=True)
    if token_file:
        token_file.parent.mkdir(parents=True, exist_ok=True)  # a volume: there before the pod starts
    done = await asyncio.create_subprocess_exec(binary, "install", *mapped, str(dest), *map(str, dirs),
                                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                                                stdin=asyncio.subprocess.DEVNULL)
    if await done.wait() != 0 or not os.access(dest, os.X_OK):
        raise AssertionError(f"`sandhub-agent install {dest}` failed (exit {done.returncode})")
    if "--chown" in flags and any(d.stat().st_uid != int(flags["--chown"].split(":")[0]) for d in dirs):
        raise AssertionError(f"`sandhub-agent install {' '.join(args[1:])}` did not hand {dirs} over")
    if token_file and (not token_file.exists() or token_file.stat().st_mode & 0o777 != 0o600):
        raise AssertionError(f"`sandhub-agent install` left no token file (mode 0600) at {token_file}")
    return dest


async def start_agent_as(binary: str, argv: Sequence[str], env: dict[str, str], *, ip: str, port: int, root: Path,
                         install: Sequence[str] = (), install_env: dict[str, str] | None = None) -> ListeningAgent:
    """Runs ``argv`` (the container's command: the agent and its flags; the
    agent is ``binary``, or the copy ``install`` made, run with
    ``install_env``), listening on ``ip:port``, with ``env`` (the container's)."""
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    program = await _install(binary, install, root, install_env or {}) if install else Path(binary)
    args = _replace_flag(list(argv[1:]), "--listen", f"tcp:{ip}:{port}")
    state = _host(root, args[args.index("--state-dir") + 1])
    if "--token-file" in args:
        args = _replace_flag(args, "--token-file", str(_host(root, args[args.index("--token-file") + 1])))
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
