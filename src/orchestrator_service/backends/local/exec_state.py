"""Where the local exec driver keeps background processes (records, output
rings), and removing it when a container is gone. Its own module so the
backend can clean up without importing the driver."""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path
from typing import Any

from orchestrator_service.backends.exec_base import CommandSpec, ExitInfo, ProcessInfo
from orchestrator_service.backends.local.linux import is_same_process
from orchestrator_service.backends.local.ring import RingError, RingState, ring_state
from orchestrator_service.backends.local.spawner import EXIT, META, STREAMS

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def exec_dir(state_dir: Path) -> Path:
    return state_dir / "exec"


def remove_container_state(state_dir: Path, container_id: str) -> None:
    """Deletes what the driver kept for a container (background processes'
    output and status). The backend calls it on teardown, once the
    container's processes are gone."""
    if SAFE_NAME.match(container_id):
        shutil.rmtree(exec_dir(state_dir) / container_id, ignore_errors=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except FileNotFoundError:
        return None


def read_process(pdir: Path, process_id: str) -> ProcessInfo | None:
    """A background process as its supervisor recorded it; None before it started."""
    try:
        meta = _read_json(pdir / META)
    except NotADirectoryError:
        return None
    if meta is None:
        return None
    ended = _read_json(pdir / EXIT)
    if ended is None and not is_same_process(meta["supervisor_pid"], meta["supervisor_start_ticks"]):
        # The supervisor is gone without a word: it crashed (or was killed),
        # unless it wrote exit.json just before it went.
        ended = _read_json(pdir / EXIT)
        if ended is None and not is_same_process(meta["host_pid"], meta["host_start_ticks"]):
            ended = {"exit_code": 0, "signal": signal.SIGKILL, "end_time": 0.0}
    rings = {name: _ring_state(pdir / name) for name in STREAMS}
    return ProcessInfo(
        process_id=process_id,
        command=CommandSpec.from_record(meta["command"]),
        pid=meta["pid"],
        start_time=meta["start_time"],
        exit=ExitInfo(ended["exit_code"], ended["signal"]) if ended else None,
        end_time=ended["end_time"] if ended else 0.0,
        stdout_bytes=rings["stdout"].total,
        stderr_bytes=rings["stderr"].total,
        stdout_first_offset=rings["stdout"].first_offset,
        stderr_first_offset=rings["stderr"].first_offset,
    )


def _ring_state(path: Path) -> RingState:
    try:
        return ring_state(path)
    except (OSError, RingError):  # removed meanwhile: nothing kept
        return RingState(capacity=1, begun=0, total=0)
