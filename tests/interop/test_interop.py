"""Other languages against a real Hub: a Go client (grpc-go, stubs from
gen/go) and a Node client (@grpc/grpc-js, protos loaded from proto/), each
over TLS with the API key sent by its language's standard per-call
credential helper, walk create → put (raw, tar) → run → exec (stdin and EOF,
PTY and resize) → background process → get (raw, tar) → error details →
delete.

Each client checks the contract itself and prints one JSON line per step;
this test starts the services (Orchestrator on the local backend, a TLS Hub;
root), runs the client, and asserts on those lines. A missing toolchain or
package is a failure, never a skip: `make tools` installs the Node packages,
and the Go client is built here, from the current stubs, by `go build`
(Go's build cache makes that quick after the first time)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Services
from tests.integration.test_hub_tls import TlsHub, tls_hub

pytestmark = [pytest.mark.root, pytest.mark.tools]

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STEPS = ["create", "put_raw", "put_tar", "run", "exec_stdin_eof", "exec_pty", "process",
         "get_raw", "get_tar", "error_not_found", "error_process_not_found", "error_invalid_field", "delete"]
KEY_OF = {"go": "key-a", "node": "key-b"}
TENANT_OF = {"go": "tenant-a", "node": "tenant-b"}


def tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is not installed: the interop tests need it (see the README's setup)")
    return found


@dataclass(frozen=True)
class Interop:
    language: str
    argv: list[str]
    env: dict[str, str]


def go_client(tmp: Path) -> Interop:
    """The Go client built from the working tree (never a stale binary).
    cgo off and -trimpath as the agent's build in the Makefile, so that the
    two share Go's build cache (grpc-go compiled once)."""
    out = tmp / "interop"
    built = subprocess.run([tool("go"), "build", "-trimpath", "-o", str(out), "./tests/interop/go"], cwd=REPO,
                           env={**os.environ, "CGO_ENABLED": "0"}, capture_output=True, text=True, timeout=600)
    if built.returncode != 0:
        pytest.fail(f"go build ./tests/interop/go failed:\n{built.stderr}")
    return Interop("go", [str(out)], {})


def node_client() -> Interop:
    """node with the packages `make tools` installed from the lock file, in
    the directory the Makefile names by the hash of package.json and
    package-lock.json."""
    env = os.environ.get("SANDHUB_INTEROP_NODE_MODULES")
    if env:
        modules = Path(env)
    else:
        digest = hashlib.sha256((HERE / "node/package.json").read_bytes()
                                + (HERE / "node/package-lock.json").read_bytes()).hexdigest()[:12]
        modules = Path.home() / f".cache/sandhub/tools/interop-node-{digest}/node_modules"
    if not (modules / "@grpc/grpc-js").is_dir():
        pytest.fail(f"the Node interop packages are not installed at {modules}: run `make tools`")
    return Interop("node", [tool("node"), str(HERE / "node/interop.js")], {"NODE_PATH": str(modules)})


@pytest.fixture(scope="session", params=["go", "node"])
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Interop:
    """Session-scoped, so it is ready before the services start (the Go
    build blocks, and must not stall their event loop)."""
    if request.param == "go":
        return go_client(tmp_path_factory.mktemp("interop-go"))
    return node_client()


@pytest.fixture
async def tls(services: Services, tmp_path: Path) -> AsyncIterator[TlsHub]:
    t = await tls_hub(services, tmp_path)
    yield t
    await t.hub.stop(0)


async def walk(argv: list[str], tls: TlsHub, key: str, env: dict[str, str]) -> tuple[int, list[dict[str, Any]], str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, "--hub", tls.target, "--ca-cert", str(tls.pki.ca_cert),
        env={**os.environ, **env, "SANDHUB_API_KEY": key},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=240)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]
    return proc.returncode or 0, lines, stderr.decode()


async def test_client_walks_the_api_over_tls(client: Interop, tls: TlsHub) -> None:
    language = client.language
    code, lines, stderr = await walk(client.argv, tls, KEY_OF[language], client.env)
    report = "\n".join(json.dumps(line) for line in lines) + "\n" + stderr
    # Every step ran, in order, and none saw anything the contract does not say.
    assert [line["step"] for line in lines] == STEPS, report
    assert [line for line in lines if "error" in line] == [], report
    assert code == 0, report

    seen = {line["step"]: line for line in lines}
    assert seen["create"]["tenant"] == TENANT_OF[language]
    assert seen["create"]["state"] == "CONTAINER_STATE_RUNNING"
    container_id = seen["create"]["container_id"]
    assert [f["path"] for f in seen["put_raw"]["files"]] == ["/work/hello.txt"]
    assert [f["path"] for f in seen["put_tar"]["files"]] == ["/work/unpacked/dir/a.txt"]
    assert (seen["run"]["exit_code"], seen["run"]["stdout"]) == (0, "hello\nfrom tar\n")
    assert (seen["exec_stdin_eof"]["exit_code"], seen["exec_stdin_eof"]["stdout"]) == (0, "ping\n")
    assert seen["exec_pty"]["sizes"] == ["24 80", "40 120"]
    process = seen["process"]
    assert (process["stdout"], process["stderr"], process["exit_code"]) == ("out\nmore\n", "err\n", 3)
    assert (process["state"], process["argv"] or []) == ("PROCESS_STATE_EXITED", [])
    assert process["shell"].startswith("echo out;")
    assert (seen["get_raw"]["size"], seen["get_raw"]["data"]) == (6, "hello\n")
    assert (seen["get_tar"]["size"], seen["get_tar"]["is_dir"]) == (-1, True)
    assert "from tar\n" in seen["get_tar"]["files"].values()

    not_found = seen["error_not_found"]
    assert not_found["code"] == "NOT_FOUND"
    assert not_found["error_info"]["domain"] == "sandhub.dev"
    assert not_found["error_info"]["reason"] == "CONTAINER_NOT_FOUND"
    assert not_found["error_info"]["metadata"] == {"container_id": "cnt-000000000000"}
    assert not_found["error_detail"] == "ERROR_REASON_CONTAINER_NOT_FOUND"
    assert not_found["request_id"]
    no_process = seen["error_process_not_found"]
    assert (no_process["code"], no_process["error_info"]["reason"], no_process["error_detail"]) == (
        "NOT_FOUND", "PROCESS_NOT_FOUND", "ERROR_REASON_PROCESS_NOT_FOUND")
    assert no_process["error_info"]["metadata"] == {"container_id": container_id, "process_id": "no-such"}
    invalid = seen["error_invalid_field"]
    assert invalid["code"] == "INVALID_ARGUMENT"
    assert (invalid["error_info"]["reason"], invalid["error_info"]["metadata"]["field"]) == (
        "INVALID_FIELD", "resources.memory_mib")
    assert invalid["error_detail"] == "ERROR_REASON_INVALID_FIELD"
    assert [v["field"] for v in invalid["bad_request"]] == ["resources.memory_mib"]

    assert seen["delete"]["container_id"] == container_id
    assert seen["delete"]["state"] in ("CONTAINER_STATE_TERMINATING", "CONTAINER_STATE_TERMINATED")
