"""A real sandhub-agent standing in for a pod's or task's main process, from
$SANDHUB_AGENT (built by `make agent`; a clear failure when it is missing).
See sandhub.bench.pod_agent; used by tests/kubernetes and tests/ecs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sandhub.bench.pod_agent import ListeningAgent, free_port
from sandhub.bench.pod_agent import start_agent_as as _start
from tests.integration.agent_harness import agent_binary

__all__ = ["ListeningAgent", "free_port", "start_agent_as"]


async def start_agent_as(argv: Sequence[str], env: dict[str, str], *, ip: str, port: int, root: Path,
                         install: Sequence[str] = (), install_env: dict[str, str] | None = None) -> ListeningAgent:
    return await _start(agent_binary(), argv, env, ip=ip, port=port, root=root, install=install,
                        install_env=install_env)
