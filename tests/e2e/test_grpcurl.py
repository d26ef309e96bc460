"""End to end: `sandhub serve` as a real process, driven with the real grpcurl.

Checks what a user of the public contract sees: reflection on both servers,
create/get/list (labels, pagination) through the Hub, that a container's
processes really run in their own namespaces on this host, tenant isolation
and authentication errors, and that delete leaves no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PrivateNetwork, container_host_pids

pytestmark = [pytest.mark.root, pytest.mark.tools]

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "sandhub.orchestrator.v1.OrchestratorService"
EXEC_SERVICE = "sandhub.exec.v1.ExecService"
KEY_A = "e2e-key"  # tenant-a
KEY_B = "other-key"  # tenant-b
ORCHESTRATOR_TOKEN = "e2e-orchestrator-token-" + "0123456789abcdef"
TOKEN_HEADER = "x-sandhub-orchestrator-token"
ENV_CONTAINER_ID = "SANDHUB_CONTAINER_ID"
NAMESPACES = ("pid", "mnt", "ipc", "uts")
STARTUP_S = 15.0
TERMINATE_S = 10.0
# Map-valued fields: their keys are user data, not field names.
MAP_FIELDS = frozenset({"labels", "env"})


# -- helpers ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def camelize(value: Any) -> Any:
    """Proto3 JSON field names in lowerCamelCase.

    grpcurl prints the descriptor's json_name, falling back to the proto name
    when the descriptor has none, which is what grpcio-reflection serves; the
    tests read camelCase either way.
    """
    if isinstance(value, list):
        return [camelize(v) for v in value]
    if isinstance(value, dict):
        return {
            re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), k): v if k in MAP_FIELDS else camelize(v)
            for k, v in value.items()
        }
    return value


def sandbox_pids(container_id: str) -> list[int]:
    """Host pids of the container's processes (not bwrap's launcher on the host)."""
    return container_host_pids(container_id)


def no_sandbox_processes(container_id: str) -> bool:
    return not sandbox_pids(container_id)


def namespace_inodes(pid: int | str) -> dict[str, int]:
    return {ns: os.stat(f"/proc/{pid}/ns/{ns}").st_ino for ns in NAMESPACES}


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


@dataclass
class Sandhub:
    """The running `sandhub serve` and a grpcurl to talk to it."""

    grpcurl_bin: str
    hub: str
    orchestrator: str
    log: Path
    created: list[str] = field(default_factory=list)

    def grpcurl(self, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.grpcurl_bin, "-plaintext", "-max-time", str(int(timeout_s)), *args],
            capture_output=True, text=True, timeout=timeout_s + 5,
        )

    def invoke(self, method: str, request: dict[str, Any], key: str | None) -> subprocess.CompletedProcess[str]:
        headers = ["-H", f"authorization: Bearer {key}"] if key else []
        return self.grpcurl(*headers, "-d", json.dumps(request), self.hub, f"{SERVICE}/{method}")

    def invoke_orchestrator(self, method: str, request: dict[str, Any], *headers: str) -> subprocess.CompletedProcess[str]:
        """Straight to the Orchestrator, with these headers (e.g. its token) and no others."""
        flags = [arg for h in headers for arg in ("-H", h)]
        return self.grpcurl(*flags, "-d", json.dumps(request), self.orchestrator, f"{SERVICE}/{method}")

    def call(self, method: str, request: dict[str, Any], key: str | None = KEY_A) -> dict[str, Any]:
        proc = self.invoke(method, request, key)
        assert proc.returncode == 0, f"{method} failed:\n{proc.stdout}{proc.stderr}"
        result: dict[str, Any] = camelize(json.loads(proc.stdout))
        return result

    def call_error(self, method: str, request: dict[str, Any], key: str | None) -> str:
        """Calls a method that must fail; returns grpcurl's error output."""
        proc = self.invoke(method, request, key)
        assert proc.returncode != 0, f"{method} unexpectedly succeeded:\n{proc.stdout}"
        return proc.stdout + proc.stderr

    def create(self, labels: dict[str, str]) -> dict[str, Any]:
        request = {"labels": labels, "waitUntilRunning": True}
        container: dict[str, Any] = self.call("CreateContainer", request)["container"]
        self.created.append(container["containerId"])
        return container

    def get(self, container_id: str) -> dict[str, Any]:
        container: dict[str, Any] = self.call("GetContainer", {"containerId": container_id})["container"]
        return container

    def terminated(self, container_id: str) -> bool:
        return bool(self.get(container_id)["state"] == "CONTAINER_STATE_TERMINATED")

    def healthy(self, address: str) -> bool:
        proc = self.grpcurl("-connect-timeout", "1", address, "grpc.health.v1.Health/Check", timeout_s=3)
        return proc.returncode == 0 and json.loads(proc.stdout).get("status") == "SERVING"

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def grpcurl_from_env() -> str:
    path = os.environ.get("SANDHUB_GRPCURL", "")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(
            f"grpcurl not found (SANDHUB_GRPCURL={path!r}): run `make tools`, "
            "or `make test`, which exports SANDHUB_GRPCURL"
        )
    return path


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM by pid, then SIGKILL if it does not end in time; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=TERMINATE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=TERMINATE_S)


def cleanup_containers(hub: Sandhub) -> None:
    """Best effort after a failure: delete what the tests created, kill what remains."""
    for cid in hub.created:
        hub.invoke("DeleteContainer", {"containerId": cid}, KEY_A)
    for cid in hub.created:
        if not wait_for(partial(no_sandbox_processes, cid), 5):
            for pid in sandbox_pids(cid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# -- fixture ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandhub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandhub]:
    if os.geteuid() != 0:
        pytest.fail("this test creates namespaces and needs root (CI runs as root)")
    grpcurl_bin = grpcurl_from_env()
    tmp = tmp_path_factory.mktemp("sandhub-e2e")
    hub = Sandhub(grpcurl_bin, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", tmp / "serve.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDHUB_")}
    net = PrivateNetwork.new()
    token_file = tmp / "orchestrator-token"
    token_file.write_text(ORCHESTRATOR_TOKEN + "\n")
    token_file.chmod(0o600)
    env.update(SANDHUB_API_KEYS=f"{KEY_A}=tenant-a,{KEY_B}=tenant-b", SANDHUB_STATE_DIR=str(tmp / "state"),
               SANDHUB_ORCHESTRATOR_TOKEN_FILE=str(token_file), **net.env())
    argv = [sys.executable, "-m", "sandhub.cli.main", "serve",
            "--hub-listen", hub.hub, "--orchestrator-listen", hub.orchestrator]
    with hub.log.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        up = wait_for(lambda: proc.poll() is not None or (hub.healthy(hub.hub) and hub.healthy(hub.orchestrator)),
                      STARTUP_S, interval_s=0.2)
        if proc.poll() is not None or not up:
            pytest.fail(f"sandhub serve did not become healthy within {STARTUP_S:g}s "
                        f"(exit code {proc.poll()}):\n{hub.log_tail()}")
        yield hub
    finally:
        try:
            cleanup_containers(hub)
        finally:
            code = stop(proc)
            asyncio.run(net.teardown())
    assert code == 0, f"sandhub serve exited with {code} on SIGTERM:\n{hub.log_tail()}"


# -- tests --------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["hub", "orchestrator"])
def test_reflection_lists_and_describes_services(sandhub: Sandhub, server: str) -> None:
    address = getattr(sandhub, server)
    listed = sandhub.grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    if server == "hub":
        assert EXEC_SERVICE in services

    described = sandhub.grpcurl(address, "describe", SERVICE)
    assert described.returncode == 0, described.stderr
    assert f"{SERVICE} is a service:" in described.stdout
    for method in ("CreateContainer", "GetContainer", "ListContainers", "DeleteContainer"):
        assert f"rpc {method} (" in described.stdout


def test_container_lifecycle(sandhub: Sandhub) -> None:
    # Create: two web, one db, each returned RUNNING.
    web = [sandhub.create({"app": "web"}), sandhub.create({"app": "web"})]
    db = sandhub.create({"app": "db"})
    for c in (*web, db):
        assert c["state"] == "CONTAINER_STATE_RUNNING", c
        assert c["tenant"] == "tenant-a"
    web_ids = {c["containerId"] for c in web}
    all_ids = web_ids | {db["containerId"]}

    got = sandhub.get(db["containerId"])
    assert got["containerId"] == db["containerId"]
    assert got["labels"] == {"app": "db"}
    assert got["state"] == "CONTAINER_STATE_RUNNING"

    # List web containers one page at a time.
    first = sandhub.call("ListContainers", {"labelSelector": "app=web", "pageSize": 1})
    assert len(first["containers"]) == 1
    assert first.get("nextPageToken")
    second = sandhub.call(
        "ListContainers", {"labelSelector": "app=web", "pageSize": 1, "pageToken": first["nextPageToken"]}
    )
    assert len(second["containers"]) == 1
    assert not second.get("nextPageToken")
    assert {c["containerId"] for c in first["containers"] + second["containers"]} == web_ids

    everything = sandhub.call("ListContainers", {})
    assert {c["containerId"] for c in everything["containers"]} == all_ids

    # Each container's processes run on this host, in namespaces of their own.
    ours = namespace_inodes("self")
    for cid in all_ids:
        pids = sandbox_pids(cid)
        assert pids, f"no host process has {ENV_CONTAINER_ID}={cid}"
        for pid in pids:
            theirs = namespace_inodes(pid)
            shared = [ns for ns in NAMESPACES if theirs[ns] == ours[ns]]
            assert not shared, f"pid {pid} of {cid} shares the test's {shared} namespace(s)"

    # Another tenant cannot see them; no credentials is rejected.
    out = sandhub.call_error("GetContainer", {"containerId": db["containerId"]}, key=KEY_B)
    assert "Code: NotFound" in out
    out = sandhub.call_error("GetContainer", {"containerId": db["containerId"]}, key=None)
    assert "Code: Unauthenticated" in out

    # The Orchestrator: the operator with its token sees them (every tenant's);
    # no token, an API key or a forged tenant is Unauthenticated.
    proc = sandhub.invoke_orchestrator("ListContainers", {}, f"{TOKEN_HEADER}: {ORCHESTRATOR_TOKEN}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {c["containerId"] for c in camelize(json.loads(proc.stdout))["containers"]} == all_ids
    for headers in ((), (f"authorization: Bearer {KEY_A}",), ("x-sandhub-tenant: tenant-a",)):
        proc = sandhub.invoke_orchestrator("GetContainer", {"containerId": db["containerId"]}, *headers)
        assert proc.returncode != 0 and "Code: Unauthenticated" in proc.stdout + proc.stderr, (headers, proc)
    assert ORCHESTRATOR_TOKEN not in sandhub.log.read_text(errors="replace")

    # Delete: each ends TERMINATED, with no process left on the host.
    for cid in all_ids:
        deleted = sandhub.call("DeleteContainer", {"containerId": cid})["container"]
        assert deleted["state"] in ("CONTAINER_STATE_TERMINATING", "CONTAINER_STATE_TERMINATED"), deleted
    for cid in all_ids:
        assert wait_for(partial(sandhub.terminated, cid), 10), sandhub.get(cid)
        assert sandbox_pids(cid) == [], f"processes of deleted {cid} still run"
    assert sandhub.call("ListContainers", {}).get("containers", []) == []


def test_errors_show_their_details_in_grpcurl(sandhub: Sandhub) -> None:
    """What the README shows: `-format-error` prints the status as JSON with
    its details, resolved by reflection: ErrorInfo, the typed ErrorDetail and,
    for a bad field, a BadRequest naming it as a proto field path."""
    headers = ("-format-error", "-H", f"authorization: Bearer {KEY_A}")
    proc = sandhub.grpcurl(*headers, "-d", json.dumps({"containerId": "cnt-000000000000"}), sandhub.hub,
                           f"{SERVICE}/GetContainer")
    assert proc.returncode != 0
    status = json.loads(proc.stderr)  # grpcurl prints the failed call's status there
    types = {d["@type"].rsplit("/", 1)[1]: d for d in status["details"]}
    assert types["google.rpc.ErrorInfo"]["reason"] == "CONTAINER_NOT_FOUND"
    assert types["sandhub.common.v1.ErrorDetail"]["reason"] == "ERROR_REASON_CONTAINER_NOT_FOUND"
    assert "google.rpc.BadRequest" not in types

    proc = sandhub.grpcurl(*headers, "-d", json.dumps({"resources": {"memoryMib": 10**7}}), sandhub.hub,
                           f"{SERVICE}/CreateContainer")
    assert proc.returncode != 0
    status = json.loads(proc.stderr)  # grpcurl prints the failed call's status there
    types = {d["@type"].rsplit("/", 1)[1]: d for d in status["details"]}
    assert types["sandhub.common.v1.ErrorDetail"]["reason"] == "ERROR_REASON_INVALID_FIELD"
    assert camelize(types["google.rpc.BadRequest"])["fieldViolations"][0]["field"] == "resources.memory_mib"
