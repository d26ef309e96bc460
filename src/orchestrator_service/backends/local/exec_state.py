"""Where the local exec driver keeps background processes (records, output
rings), and removing it when a container is gone. Its own module so the
backend can clean up without importing the driver."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def exec_dir(state_dir: Path) -> Path:
    return state_dir / "exec"


def remove_container_state(state_dir: Path, container_id: str) -> None:
    """Deletes what the driver kept for a container (background processes'
    output and status). The backend calls it on teardown, once the
    container's processes are gone."""
    if SAFE_NAME.match(container_id):
        shutil.rmtree(exec_dir(state_dir) / container_id, ignore_errors=True)
