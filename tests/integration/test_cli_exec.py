"""The `sandhub` exec verbs against a real Hub (local backend, root)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Services

pytestmark = pytest.mark.root


async def sandhub(services: Services, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, SANDHUB_HUB=f"127.0.0.1:{services.hub.port}", SANDHUB_API_KEY="key-a")
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "sandhub.cli.main", *args], input=stdin, env=env,
        capture_output=True, timeout=60,
    )


async def test_put_run_get_start_ps_attach_kill(services: Services, tmp_path: Path) -> None:
    made = await sandhub(services, "create", "--wait", "--port", "8000")
    assert made.returncode == 0, made.stderr
    cid = made.stdout.split()[0].decode()

    app = tmp_path / "app"
    app.mkdir()
    (app / "hello.txt").write_text("hi from a file\n")
    (app / "run.sh").write_text("echo started; exec sleep 60\n")
    put = await sandhub(services, "put", cid, str(app))
    assert put.returncode == 0, put.stderr
    assert b"/work/app/hello.txt" in put.stdout and b"/work/app/run.sh" in put.stdout

    run = await sandhub(services, "run", cid, "--", "cat", "app/hello.txt")
    assert (run.returncode, run.stdout) == (0, b"hi from a file\n")
    failing = await sandhub(services, "run", "--shell", cid, "--", "echo oops >&2; exit 7")
    assert failing.returncode == 7 and failing.stderr.startswith(b"oops")
    piped = await sandhub(services, "run", cid, "--", "wc", "-c", stdin=b"12345")
    assert piped.stdout.strip() == b"5"

    got = await sandhub(services, "get-file", cid, "/work/app/hello.txt", "-o", str(tmp_path / "back.txt"))
    assert got.returncode == 0 and (tmp_path / "back.txt").read_text() == "hi from a file\n"

    started = await sandhub(services, "start", cid, "web", "--", "sh", "/work/app/run.sh")
    assert started.returncode == 0 and started.stdout.startswith(b"web\tRUNNING")
    for _ in range(50):
        attached = await sandhub(services, "attach", cid, "web")
        if attached.stdout == b"started\n":
            break
        await asyncio.sleep(0.1)
    assert attached.stdout == b"started\n"
    ps = await sandhub(services, "ps", cid)
    assert ps.stdout.startswith(b"web\tRUNNING")
    killed = await sandhub(services, "kill", cid, "web", "-s", "KILL")
    assert killed.returncode == 0
    follow = await sandhub(services, "attach", cid, "web", "-f")
    assert follow.returncode == 128 + 9  # the process's own end, as a shell would say it

    exec_ = await sandhub(services, "exec", "--no-tty", cid, "--", "sh", stdin=b"echo $((2+3))\nexit 4\n")
    assert (exec_.returncode, exec_.stdout) == (4, b"5\n")
    missing = await sandhub(services, "run", "cnt-000000000000", "--", "true")
    assert missing.returncode == 3  # NOT_FOUND
