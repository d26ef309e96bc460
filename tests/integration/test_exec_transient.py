"""A command start that meets a broken exec path -- its supervisor killed
before it answered, while the fork server lives on -- is UNAVAILABLE with a
reason (or simply works when nothing had been sent yet), never INTERNAL
(issue 12, item 6). Real sandboxes and a real fork server (root needed); the
supervisor that took the call is found by what it is doing (no longer in
accept, unlike the idle ones) and killed at the chosen moment.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator_service.backends.exec_base import CommandSpec, ExitInfo
from orchestrator_service.backends.local import exec_driver
from orchestrator_service.backends.local.attached import Channel
from sandhub.errors import BackendUnavailable
from tests.integration.test_local_exec import Env, env, run  # noqa: F401  (env is a fixture)

pytestmark = pytest.mark.root


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def syscall(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return "gone"


def kill_taker(server: int, idle: list[int], accept_call: str) -> int:
    """Stops the idle supervisor that took the connection just made (it left
    accept) and returns its pid."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for pid in idle:
            if syscall(pid) != accept_call:
                os.kill(pid, signal.SIGSTOP)
                return pid
        time.sleep(0.001)
    raise AssertionError("no supervisor took the connection")


def gate(monkeypatch: pytest.MonkeyPatch, server: int, *, before_send: bool) -> list[int]:
    """Makes the driver's next connection meet a supervisor killed before it
    answered: before the request reached it, or after."""
    idle = children(server)
    calls = {syscall(p) for p in idle}
    assert len(calls) == 1, calls  # all waiting in accept
    accept_call = calls.pop()
    killed: list[int] = []

    class Gated(Channel):
        async def send(self, message: dict[str, Any]) -> None:
            if killed:
                return await super().send(message)
            taker = kill_taker(server, idle, accept_call)
            killed.append(taker)
            if before_send:
                os.kill(taker, signal.SIGKILL)
                while syscall(taker) != "gone" and Path(f"/proc/{taker}").exists():
                    await asyncio.sleep(0.001)
                await asyncio.sleep(0.05)  # its end of the socket is closed
                return await super().send(message)
            await super().send(message)
            os.kill(taker, signal.SIGKILL)

    monkeypatch.setattr(exec_driver, "Channel", Gated)
    return killed


async def test_a_supervisor_killed_after_the_request_is_unavailable_not_internal(
    env: Env, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    cid = await env.container()
    server = env.driver.spawner_pid
    killed = gate(monkeypatch, server, before_send=False)
    with pytest.raises(BackendUnavailable) as caught:
        await env.driver.spawn(container_id=cid, command=CommandSpec(("true",)))
    err = caught.value
    assert killed and err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "BACKEND_UNAVAILABLE"
    # A Run is not idempotent: it says what became of the command, no blind "retry".
    assert "ended before it answered" in err.message and "stopped if it had started" in err.message
    assert "retry" not in err.message
    assert env.driver.spawner_pid == server  # the fork server lived on, and still serves
    assert (await run(env.driver, cid, "true"))[0] == ExitInfo(0, 0)


async def test_a_background_start_that_lost_its_supervisor_says_to_start_it_again(
    env: Env, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    cid = await env.container()
    gate(monkeypatch, env.driver.spawner_pid, before_send=False)
    with pytest.raises(BackendUnavailable, match="same process_id"):
        await env.driver.start_background(container_id=cid, process_id="p1", command=CommandSpec(("sleep", "30")))
    info, _ = await env.driver.start_background(container_id=cid, process_id="p1", command=CommandSpec(("sleep", "30")))
    assert info.process_id == "p1"


async def test_a_supervisor_killed_before_the_request_is_retried(
    env: Env, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """Nothing reached it, so nothing started: the driver asks another one."""
    cid = await env.container()
    killed = gate(monkeypatch, env.driver.spawner_pid, before_send=True)
    assert (await run(env.driver, cid, "echo", "hi"))[:2] == (ExitInfo(0, 0), b"hi\n")
    assert killed
