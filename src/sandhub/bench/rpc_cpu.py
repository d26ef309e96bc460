"""Hub CPU per 1,000 RPCs, measured on servers of their own.

Method: the Hub and the Orchestrator run as two `sandhub serve --only ...`
processes (temp state dir, private bridge, loopback ports, log level info as
deployed, logs to /dev/null), so the bench client's own CPU is not in their
numbers, as it would be with --start-local where they share one process. One
container is created, every measured call goes to it; after a warm-up, the
user + system CPU time of each process (/proc/<pid>/stat, all threads) is
read before and after a batch of calls issued by a few concurrent clients:

- Run(`ls /`): the Hub (auth, tenant lookup, the relay to the agent) and,
  separately, the container's agent (its pid 1: the call, plus the `ls` it
  starts and reaps, counted in the container's own cgroup);
- GetContainer: the Hub's proxy path plus the Orchestrator behind it.

Optionally py-spy records the Hub during the Run batch and the Orchestrator
during a burst of creates (``profile_dir``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from sandhub import internal_auth
from sandhub.bench.hub import HubTarget
from sandhub.bench.local import init_pid, private_backend_config, remove_cgroup_parent, remove_network
from sandhub.bench.target import CreateParams, TargetError
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

API_KEY = "bench-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_stat(text: str) -> tuple[float, float, int]:
    """(own CPU seconds, reaped children's CPU seconds, start ticks) from a
    /proc/<pid>/stat line (the command name may hold spaces and parentheses)."""
    rest = text[text.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK, int(rest[19])


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` (children not included)."""
    return parse_stat(Path(f"/proc/{pid}/stat").read_text())[0]


def cpu_with_reaped_s(pid: int) -> float:
    """CPU seconds of ``pid`` and of the children it has reaped."""
    own, reaped, _ = parse_stat(Path(f"/proc/{pid}/stat").read_text())
    return own + reaped


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
            except (OSError, ValueError):
                continue
            found.extend(children)
            todo.extend(children)
    return found


@dataclass
class RpcCpu:
    calls: int
    concurrency: int
    run_wall_s: float = 0.0
    hub_run_cpu_s: float = 0.0
    agent_run_cpu_s: float = 0.0
    get_wall_s: float = 0.0
    hub_get_cpu_s: float = 0.0
    orchestrator_get_cpu_s: float = 0.0
    failures: int = 0
    profiles: dict[str, str] = field(default_factory=dict)
    """What py-spy recorded: name -> file."""
    notes: list[str] = field(default_factory=list)

    def per_1000_ms(self) -> dict[str, float]:
        k = 1000 / self.calls * 1000 if self.calls else 0.0
        return {
            "hub_per_1000_run_ms": self.hub_run_cpu_s * k,
            "agent_per_1000_run_ms": self.agent_run_cpu_s * k,
            "hub_per_1000_get_ms": self.hub_get_cpu_s * k,
            "orchestrator_per_1000_get_ms": self.orchestrator_get_cpu_s * k,
        }

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), **self.per_1000_ms()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sandhub() -> str:
    return str(Path(sys.executable).parent / "sandhub")


class Servers:
    """`sandhub serve --only orchestrator` and `--only hub`, private state."""

    def __init__(self) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="sandhub-rpccpu-"))
        self.local = private_backend_config(self.state)
        self.orch_port, self.hub_port = _free_port(), _free_port()
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.token_file = self.state / "orchestrator-token"
        self.token_file.write_text(internal_auth.new_token())
        self.token_file.chmod(0o600)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDHUB_")}
        return {
            **env,
            "SANDHUB_STATE_DIR": str(self.state),
            "SANDHUB_BRIDGE": self.local.bridge,
            "SANDHUB_SUBNET": self.local.subnet,
            "SANDHUB_API_KEYS": f"{API_KEY}=bench",
            "SANDHUB_ORCHESTRATOR_LISTEN": f"127.0.0.1:{self.orch_port}",
            "SANDHUB_ORCHESTRATOR": f"127.0.0.1:{self.orch_port}",
            "SANDHUB_ORCHESTRATOR_TOKEN_FILE": str(self.token_file),
            "SANDHUB_HUB_LISTEN": f"127.0.0.1:{self.hub_port}",
            "SANDHUB_LOG_LEVEL": "info",
        }

    async def start(self) -> None:
        for only in ("orchestrator", "hub"):
            self.procs[only] = await asyncio.create_subprocess_exec(
                _sandhub(), "serve", "--only", only, env=self.env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )

    async def stop(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await remove_network(self.local)
        remove_cgroup_parent(self.local)
        shutil.rmtree(self.state, ignore_errors=True)


async def _connect(address: str, deadline_s: float = 30.0) -> HubTarget:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        target = HubTarget(address, api_key=API_KEY, timeout_s=30)
        try:
            await target.start()
            return target
        except TargetError:
            if loop.time() > end:
                raise
            await asyncio.sleep(0.2)


async def _batch(n: int, concurrency: int, call: Callable[[], Awaitable[bool]]) -> int:
    """Runs ``call`` n times, ``concurrency`` at once; returns the failures."""
    failures = 0
    todo = iter(range(n))

    async def worker() -> None:
        nonlocal failures
        for _ in todo:
            if not await call():
                failures += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


async def _py_spy(pid: int, out: Path, duration_s: int) -> asyncio.subprocess.Process | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(spy, os.X_OK):
        return None
    return await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(pid), "--duration", str(duration_s), "--rate", "200", "--format", "raw",
        "--nonblocking", "--output", str(out), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def measure(*, calls: int = 1000, concurrency: int = 4, warmup: int = 100,
                  profile_dir: Path | None = None, profile_creates: int = 60) -> RpcCpu:
    result = RpcCpu(calls=calls, concurrency=concurrency)
    servers = Servers()
    target: HubTarget | None = None
    channel: grpc.aio.Channel | None = None
    created: list[str] = []
    try:
        await servers.start()
        target = await _connect(f"127.0.0.1:{servers.hub_port}")
        c = await target.create(CreateParams(image="", cpu_millicores=0, memory_mib=0, labels={"bench": "rpc-cpu"}))
        created.append(c.container_id)
        hub_pid, orch_pid = servers.procs["hub"].pid, servers.procs["orchestrator"].pid
        t = target

        async def run_ls() -> bool:
            try:
                return (await t.run(c.container_id, ("ls", "/"))).exit_code == 0
            except TargetError:
                return False

        channel = grpc.aio.insecure_channel(f"127.0.0.1:{servers.hub_port}")
        stub = pb_grpc.OrchestratorServiceStub(channel)
        meta = (("authorization", f"Bearer {API_KEY}"),)

        async def get() -> bool:
            try:
                await stub.GetContainer(pb.GetContainerRequest(container_id=c.container_id), metadata=meta, timeout=30)
                return True
            except grpc.aio.AioRpcError:
                return False

        await _batch(warmup, concurrency, run_ls)
        await _batch(warmup, concurrency, get)

        spy = None
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            out = profile_dir / "hub-run.txt"
            spy = await _py_spy(hub_pid, out, duration_s=15)
            if spy is None:
                result.notes.append("py-spy not installed: no profile (pip install -e '.[bench]')")
            else:
                result.profiles["hub during Run(ls /)"] = str(out)
                await asyncio.sleep(1)  # py-spy attaches
        agent_pid = init_pid(servers.local, c.container_id)
        hub0, agent0 = process_cpu_s(hub_pid), cpu_with_reaped_s(agent_pid)
        start = time.perf_counter()
        result.failures += await _batch(calls, concurrency, run_ls)
        result.run_wall_s = time.perf_counter() - start
        result.hub_run_cpu_s = process_cpu_s(hub_pid) - hub0
        result.agent_run_cpu_s = cpu_with_reaped_s(agent_pid) - agent0
        if spy is not None:
            await spy.wait()

        hub0, orch0 = process_cpu_s(hub_pid), process_cpu_s(orch_pid)
        start = time.perf_counter()
        result.failures += await _batch(calls, concurrency, get)
        result.get_wall_s = time.perf_counter() - start
        result.hub_get_cpu_s = process_cpu_s(hub_pid) - hub0
        result.orchestrator_get_cpu_s = process_cpu_s(orch_pid) - orch0

        if profile_dir is not None:
            out = profile_dir / "orchestrator-create.txt"
            spy = await _py_spy(orch_pid, out, duration_s=max(int(profile_creates * 0.1) + 5, 10))
            if spy is not None:
                result.profiles["orchestrator during creates (one every 0.1 s)"] = str(out)
                await asyncio.sleep(1)
                created += await _creates(t, profile_creates)
                await spy.wait()
    finally:
        if target is not None:
            for cid in created:
                try:
                    await target.delete(cid)
                except TargetError as e:
                    result.notes.append(f"delete failed: {e.reason}")
            await _wait_gone(target)
            await target.close()
        if channel is not None:
            await channel.close()
        await servers.stop()
    return result


async def _creates(target: HubTarget, n: int) -> list[str]:
    async def one(i: int) -> str:
        await asyncio.sleep(i * 0.1)
        try:
            return (await target.create(CreateParams(image="", cpu_millicores=0, memory_mib=0,
                                                     labels={"bench": "rpc-cpu"}))).container_id
        except TargetError as e:
            return e.container_id

    return [cid for cid in await asyncio.gather(*(one(i) for i in range(n))) if cid]


async def _wait_gone(target: HubTarget, timeout_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        try:
            if not await target.alive({"bench": "rpc-cpu"}):
                return
        except TargetError:
            return
        await asyncio.sleep(0.1)
