"""What a SIGKILLed Hub leaves is removed by whoever comes next (issue 12,
item 7): its exec driver's socket directory under /tmp, and the temporary
file of an upload it was in the middle of, in the container's /work. Real
fork servers and sandboxes (root needed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hub_service.exec.files import put_files
from hub_service.exec.uploader import TEMP_PREFIX, Uploader
from orchestrator_service.backends.exec_base import ExitInfo
from orchestrator_service.backends.local import exec_dirs
from orchestrator_service.backends.local.exec_driver import LocalExecDriver
from sandhub.config import ExecLimits
from sandhub.exec.v1 import exec_pb2 as pb
from tests.conftest import orchestrator_config
from tests.integration.test_local_exec import Env, env, eventually, run  # noqa: F401  (env is a fixture)

pytestmark = pytest.mark.root

HUB = """
import asyncio, sys
from pathlib import Path
from orchestrator_service.backends.local.exec_driver import LocalExecDriver
from tests.conftest import orchestrator_config

async def main():
    driver = LocalExecDriver(orchestrator_config(Path(sys.argv[1])).local)
    await driver.start()
    print("DIR=" + str(driver._dir), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def start_hub(state: Path) -> tuple[subprocess.Popen[str], Path]:
    """A process that runs an exec driver, as a Hub does; returns it and its directory."""
    proc = subprocess.Popen([sys.executable, "-c", HUB, str(state)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])
    assert proc.stdout is not None
    while not (line := proc.stdout.readline()).startswith("DIR=") and line:
        pass  # its log lines
    found = line.strip().removeprefix("DIR=")
    assert found.startswith(str(Path(tempfile.gettempdir()) / exec_dirs.PREFIX)), line
    return proc, Path(found)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=20)


async def test_the_exec_dirs_of_killed_hubs_are_removed_by_the_next(tmp_path: Path) -> None:
    dead, dead_dir = start_hub(tmp_path / "a")
    alive, alive_dir = start_hub(tmp_path / "b")
    legacy = Path(tempfile.mkdtemp(prefix=exec_dirs.PREFIX))  # as drivers made them before owner.lock
    (legacy / exec_dirs.SOCKET).touch()
    old = time.time() - 2 * exec_dirs.LEGACY_AGE_S
    os.utime(legacy, (old, old))
    young_legacy = Path(tempfile.mkdtemp(prefix=exec_dirs.PREFIX))  # or one being made right now
    driver = LocalExecDriver(orchestrator_config(tmp_path / "c").local)
    try:
        stop(dead)  # SIGKILL: it removes nothing
        assert dead_dir.is_dir()
        await driver.start()
        assert not dead_dir.exists() and not legacy.exists()
        assert alive_dir.is_dir() and (alive_dir / exec_dirs.SOCKET).exists() and young_legacy.is_dir()
    finally:
        await driver.close()
        stop(alive)
        young_legacy.rmdir()
    assert driver._dir is None and not any(d.name.endswith("owner.lock") for d in tmp_path.iterdir())


async def _files(*items: pb.PutFilesRequest) -> AsyncIterator[pb.PutFilesRequest]:
    for item in items:
        yield item


async def test_a_temp_file_of_an_upload_cut_short_is_removed_by_the_next_upload(env: Env) -> None:  # noqa: F811
    cid = await env.container()
    limits = ExecLimits()
    # A Hub dies mid-upload: its stage command is killed, nothing cleans up.
    hub = await env.new_driver()
    up = Uploader(hub, cid, limits, "/work")
    await up.begin(pb.FileHeader(path="big.bin", size=0))
    await up.write(b"x" * 100_000)

    async def temps() -> list[str]:
        listing = (await run(env.driver, cid, "ls", "-a", "/work"))[1].decode().split()
        return [name for name in listing if name.startswith(TEMP_PREFIX)]

    (left,) = await eventually(temps, lambda names: len(names) == 1)
    await hub.close()
    assert await temps() == [left]
    # Older than any upload may last; and one of an upload still going on.
    hours = 2 * limits.max_upload_s / 3600
    assert (await run(env.driver, cid, "touch", "-d", f"@{int(time.time() - hours * 3600)}", f"/work/{left}"))[0] \
        == ExitInfo(0, 0)
    live = f"{TEMP_PREFIX}live"
    assert (await run(env.driver, cid, "touch", f"/work/{live}"))[0] == ExitInfo(0, 0)

    start = pb.PutFilesStart(container_id=cid, destination="/work")
    done = await put_files(env.driver, cid, start, _files(
        pb.PutFilesRequest(file=pb.FileHeader(path="next.txt", size=2)), pb.PutFilesRequest(data=b"hi")),
        limits)
    assert [f.path for f in done.files] == ["/work/next.txt"]
    listing = (await run(env.driver, cid, "ls", "-a", "/work"))[1].decode().split()
    assert left not in listing and live in listing and "next.txt" in listing
