"""`--json` on every CLI verb that accepts it: machine-readable JSON on stdout
(exec and attach: one object per line). Real Hub, local backend (root)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Services

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


async def sandhub(services: Services, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDHUB_")}
    env.update(SANDHUB_HUB=f"127.0.0.1:{services.hub.port}", SANDHUB_API_KEY="key-a")
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "sandhub.cli.main", *args], input=stdin, env=env,
        capture_output=True, timeout=60,
    )


async def as_json(services: Services, *args: str, stdin: bytes = b"", code: int = 0) -> Any:
    done = await sandhub(services, args[0], "--json", *args[1:], stdin=stdin)  # before a command's words
    assert done.returncode == code, done.stderr
    return json.loads(done.stdout)


async def json_lines(services: Services, *args: str, stdin: bytes = b"", code: int = 0) -> list[Any]:
    done = await sandhub(services, args[0], "--json", *args[1:], stdin=stdin)  # before a command's words
    assert done.returncode == code, done.stderr
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


async def test_every_exec_verb_prints_json(services: Services, tmp_path: Path) -> None:
    cid = (await as_json(services, "create", "--wait"))["containerId"]
    app = tmp_path / "app"
    app.mkdir()
    (app / "hello.txt").write_bytes(b"hi\n")
    (app / "run.sh").write_text("echo started; echo warn >&2; exec sleep 60\n")

    put = await as_json(services, "put", cid, str(app))
    assert put["totalBytes"] == str(3 + (app / "run.sh").stat().st_size)  # proto3 JSON: int64 as a string
    by_path = {f["path"]: f for f in put["files"]}
    assert by_path["/work/app/hello.txt"]["sha256"] == hashlib.sha256(b"hi\n").hexdigest()
    assert by_path["/work/app/hello.txt"]["size"] == "3"  # int64 is a string in proto3 JSON

    run = await as_json(services, "run", "--shell", cid, "--", "cat app/hello.txt; printf '\\377' >&2; exit 3",
                        code=3)
    assert run["exitCode"] == 3 and run["exitStatus"]["exitCode"] == 3
    assert run["stdout"] == "hi\n" and base64.b64decode(run["stderrBase64"]) == b"\xff"
    assert run["stdoutTruncated"] is False and run["stderrTruncated"] is False and run["duration"].endswith("s")
    ok = await as_json(services, "run", cid, "--", "true")
    assert ok["exitCode"] == 0 and ok["exitStatus"]["exitCode"] == 0 and ok["stdout"] == ""
    capped = await as_json(services, "run", "--shell", cid, "--", "head -c 20000000 /dev/zero", code=0)
    assert capped["stdoutTruncated"] is True

    got = await as_json(services, "get-file", cid, "/work/app/hello.txt", "-o", str(tmp_path / "back"))
    assert got["info"]["path"] == "/work/app/hello.txt" and got["bytesWritten"] == 3
    assert (tmp_path / "back").read_bytes() == b"hi\n"
    no_output = await sandhub(services, "get-file", cid, "/work/app/hello.txt", "--json")
    assert no_output.returncode == 2 and b"-o" in no_output.stderr

    started = await as_json(services, "start", cid, "web", "--", "sh", "/work/app/run.sh")
    assert started["created"] is True and started["process"]["processId"] == "web"
    assert started["process"]["state"] == "PROCESS_STATE_RUNNING"
    again = await as_json(services, "start", cid, "web", "--", "sh", "/work/app/run.sh")
    assert again["created"] is False

    ps = await as_json(services, "ps", cid)
    assert [p["processId"] for p in ps["processes"]] == ["web"]

    for _ in range(50):
        lines = await json_lines(services, "attach", cid, "web")
        if {line.get("stream") for line in lines} == {"stdout", "stderr"}:
            break
        await asyncio.sleep(0.1)
    chunks = {line["stream"]: line for line in lines}
    assert chunks["stdout"] == {"stream": "stdout", "offset": 0, "data": "started\n", "droppedBefore": False}
    assert chunks["stderr"]["data"] == "warn\n"
    later = await json_lines(services, "attach", cid, "web", "--offset", "3")
    assert {"stream": "stdout", "offset": 3, "data": "rted\n", "droppedBefore": False} in later

    killed = await as_json(services, "kill", cid, "web", "-s", "KILL")
    assert killed["process"]["processId"] == "web"
    followed = await json_lines(services, "attach", cid, "web", "-f", code=128 + 9)
    assert followed[-1]["exitCode"] == 128 + 9 and followed[-1]["exitStatus"]["signal"] == "SIGNAL_SIGKILL"

    events = await json_lines(services, "exec", cid, "--", "sh", "-c", "cat; exit 4", stdin=b"piped in", code=4)
    assert events[0]["started"]["pid"] > 0
    assert "".join(e.get("data", "") for e in events if e.get("stream") == "stdout") == "piped in"
    assert events[-1] == {"exitStatus": events[-1]["exitStatus"], "exitCode": 4}


async def test_lifecycle_verbs_still_print_json_and_errors_carry_the_reason(services: Services) -> None:
    made = await as_json(services, "create", "--wait", "--label", "app=web")
    assert made["state"] == "CONTAINER_STATE_RUNNING"
    listed = await as_json(services, "list", "-l", "app=web")
    assert [c["containerId"] for c in listed["containers"]] == [made["containerId"]]
    assert (await as_json(services, "get", made["containerId"]))["containerId"] == made["containerId"]
    missing = await sandhub(services, "ps", "cnt-000000000000", "--json")
    assert missing.returncode == 3 and b"CONTAINER_NOT_FOUND" in missing.stderr and missing.stdout == b""
    deleted = await as_json(services, "delete", made["containerId"])
    assert deleted["containerId"] == made["containerId"]
