"""`sandhub bench matrix` and `sandhub bench docker` for real (root needed):
a tiny matrix on the Hub (--start-local), the floor and Docker, written as
markdown, with everything deleted afterwards — Docker's private daemon, its
data, network and cgroups included, also on Ctrl-C.

Docker runs against the real Engine of Debian's docker.io, started by the
bench itself. dockerd missing fails these tests (`make test` installs it,
as `make bench` does: Makefile `docker-deps`); SANDHUB_BENCH_NO_DOCKER=1 runs the matrix without
Docker on purpose, and the Docker tests then fail saying so instead of
passing unseen.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandhub.bench.docker_api import DockerApiError, DockerClient, Request
from sandhub.bench.dockerd import FIXED_DIRS, find_dockerd
from orchestrator_service.backends.local.network import veth_name

pytestmark = pytest.mark.root
SANDHUB = str(Path(sys.executable).parent / "sandhub")
NO_DOCKER = os.environ.get("SANDHUB_BENCH_NO_DOCKER") == "1"


@pytest.fixture(autouse=True)
def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests create namespaces and start dockerd, and need root (CI runs as root)")


def need_docker() -> None:
    if NO_DOCKER:
        pytest.fail("SANDHUB_BENCH_NO_DOCKER=1: the Docker target was not tested")
    if not find_dockerd():
        pytest.fail("dockerd not found: install Debian's docker.io (`make test` does), "
                    "or set SANDHUB_BENCH_NO_DOCKER=1 to leave Docker out on purpose")


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:  # gone meanwhile: another run removing its own cgroups
        return []


def traces_on_host(container_ids: list[str]) -> list[str]:
    """Cgroups (sandhub/<id> or sandhub/<instance>/<id>, v1 or v2), veths and
    processes of these local-backend containers, tolerating a cgroup tree that
    other runs change while it is read."""
    wanted = set(container_ids)
    root = Path("/sys/fs/cgroup")
    found = []
    for top in [root / "sandhub", *(root / c / "sandhub" for c in _listdir(root))]:
        for level1 in _listdir(top):
            found += [str(top / level1) for _ in [0] if level1 in wanted]
            found += [str(top / level1 / n) for n in _listdir(top / level1) if n in wanted]
    found += [f"veth of {cid}" for cid in wanted if (Path("/sys/class/net") / veth_name(cid)).exists()]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        found += [f"pid {pid} of {cid}" for cid in wanted if cid.encode() in cmdline]
    return found


def docker_traces() -> list[str]:
    """What a private bench dockerd could leave: its temp root, its cgroup
    parent, its bridge, its processes."""
    found = [str(p) for p in Path("/tmp").glob("shbd-*")]
    found += [str(p) for p in Path("/sys/fs/cgroup").glob("*/shbd-*")]
    found += [str(p) for p in Path("/sys/class/net").glob("shbd-*")]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"/tmp/shbd-" in cmdline:
            found.append(f"pid {pid}: {cmdline[:120]!r}")
    return found


def test_tiny_matrix_writes_markdown_with_every_target_and_leaves_nothing(tmp_path: Path) -> None:
    targets = "hub,floor" if NO_DOCKER else "hub,floor,docker"
    if not NO_DOCKER:
        need_docker()
    before = docker_traces()
    fixed_before = {d for d in FIXED_DIRS if Path(d).exists()}
    out, raw = tmp_path / "BENCHMARKS.md", tmp_path / "matrix.json"
    proc = subprocess.run(
        [SANDHUB, "bench", "matrix", "--burst-sizes", "1,2", "--gradual-sizes", "none", "--targets", targets,
         "--runs", "2", "--rpc-calls", "20", "--output", str(out), "--json-out", str(raw)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    data = json.loads(raw.read_text())
    runs = {(r["n"], r["target"]): r for r in data["runs"]}
    assert set(runs) == {(n, t) for n in (1, 2) for t in targets.split(",")}
    for (n, target), r in runs.items():
        assert r["error"] == "" and r["failures"] == 0 and r["leftovers"] == 0, (target, r)
        assert r["cct_count"] == n and len(r["cct_values"]) == n
        assert r["ls_mean_ms"] is not None and r["memory"]["containers"] == n
    assert data["rpc_cpu"]["calls"] == 20 and data["rpc_cpu"]["failures"] == 0
    assert data["rpc_cpu"]["hub_per_1000_run_ms"] > 0

    text = out.read_text()
    lines = text.splitlines()
    names = {"hub": "sandhub", "floor": "floor", "docker": "Docker"}
    for n in (1, 2):
        for t in targets.split(","):
            assert any(line.startswith(f"| burst | {n} | {names[t]} | ") for line in lines), (n, t)
    assert any(line.startswith("| burst | 2 | ") and line.count("×") == (6 if not NO_DOCKER else 3)
               for line in lines)
    assert "## Hub CPU per 1,000 RPCs" in text
    assert f"cgroup {data['machine']['cgroup']}" in text

    local_ids = [cid for r in data["runs"] if r["target"] != "docker" for cid in r["container_ids"]]
    assert len(local_ids) == 2 * 3
    assert traces_on_host(local_ids) == []
    assert docker_traces() == before
    assert {d for d in FIXED_DIRS if Path(d).exists()} == fixed_before


def test_docker_basic_runs_ls_through_exec_and_leaves_nothing() -> None:
    need_docker()
    before = docker_traces()
    proc = subprocess.run([SANDHUB, "bench", "docker", "-n", "3", "--interval", "0.05", "--scenario", "basic",
                           "--runs", "3", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["target"] == "docker" and out["ok"] is True
    assert out["metrics"]["cct"]["count"] == 3 and out["metrics"]["ls"]["count"] == 9
    assert out["target_detail"].startswith("Docker Engine ") and "bridge network shbd-" in out["target_detail"]
    assert len(out["container_ids"]) == 3 and all(len(cid) == 64 for cid in out["container_ids"])
    assert out["memory"]["containers"] == 3 and out["memory"]["cgroup_bytes"] > 0
    assert out["leftovers"] == []
    assert docker_traces() == before


def containers_of_running_bench_daemon() -> int:
    """Containers on the first private bench daemon found (0 while none answers)."""
    for sock in Path("/tmp").glob("shbd-*/docker.sock"):
        try:
            resp = asyncio.run(DockerClient(str(sock), timeout_s=5).call(Request("GET", "/containers/json",
                                                                                  {"all": "1"})))
        except DockerApiError:
            continue
        if resp.status == 200:
            return len(resp.json() or [])
    return 0


def test_docker_interrupted_by_ctrl_c_still_removes_daemon_and_containers() -> None:
    need_docker()
    before = docker_traces()
    proc = subprocess.Popen([SANDHUB, "bench", "docker", "-n", "200", "--interval", "0.1", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and containers_of_running_bench_daemon() < 2 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # some containers made, some in flight, most not yet asked for
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    out = json.loads(stdout)
    assert out["interrupted"] is True and out["leftovers"] == []
    assert 0 < len(out["container_ids"]) < 200
    assert docker_traces() == before


async def test_step_timer_still_finds_every_step_it_wraps() -> None:
    """The profiler of CCT and `ls /` steps wraps backend internals by name:
    when one is renamed this fails, instead of the profile quietly missing it."""
    from sandhub.bench import steps

    timings = await steps.measure(2, 0.05, 1)
    labels = set(timings)
    for prefix in ("create: LocalBackend.create", "create: start bwrap", "create: wait for bwrap's info",
                   "create: wait for bwrap's ready byte", "create: cgroup mkdir", "create: cgroup add pid",
                   "create: network attach", "create: network: rtnetlink", "create: record write",
                   "ls: whole run"):
        assert any(label.startswith(prefix) for label in labels), prefix
    assert len(timings["create: LocalBackend.create, all of it (= CCT)"]) == 2
    assert steps.table(timings)[0].startswith("step")
