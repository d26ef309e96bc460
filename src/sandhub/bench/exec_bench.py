"""`sandhub bench exec`: the cost of reaching into a container, beside its floors.

In one run, on one container, interleaved so load hits all alike:
- `ls /` through the Hub (ExecService.Run over gRPC, as a caller does it,
  relayed to the container's agent);
- the same with `nsenter` (the physical floor: namespaces only, no cgroup join,
  no seccomp, no gRPC);
and the transfer rate of a PutFiles upload (and a GetFiles download) beside a
plain gRPC client stream of the same bytes, in the same message size, to a
trivial server in this process (what gRPC in Python can carry at all). The
transfer clients run as processes of their own, like real callers: in this
process they would share the GIL with the servers being measured.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from sandhub.bench.local import TENANT, LocalServices, init_pid
from sandhub.bench.stats import Summary, histogram, summarize
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

API_KEY = "bench-key"
CHUNK = 1 << 20
SINK = "/sandhub.bench.Sink/Put"


@dataclass
class ExecBenchResults:
    runs: int
    upload_mib: int
    ls_ms: dict[str, list[float]] = field(default_factory=dict)
    upload_mb_s: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def summaries(self) -> dict[str, Summary | None]:
        return {name: summarize(values) for name, values in self.ls_ms.items()}


class _Sink:
    """A plain gRPC server on its own thread and loop (as the Hub runs in
    --start-local), taking a client stream of raw bytes."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-sink", daemon=True)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._thread.start()
        self.port = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._start(), self._loop))

    async def _start(self) -> int:
        async def put(requests: AsyncIterator[bytes], _context: Any) -> bytes:
            total = 0
            async for chunk in requests:
                total += len(chunk)
            return str(total).encode()

        handler = grpc.method_handlers_generic_handler(
            "sandhub.bench.Sink", {"Put": grpc.stream_unary_rpc_method_handler(put)})
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((handler,))
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    async def stop(self) -> None:
        if self._server is not None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop))
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 10)


async def _timed(coro: Any) -> float:
    start = time.perf_counter()
    await coro
    return time.perf_counter() - start


async def _client(kind: str, address: str, mib: int, *extra: str) -> dict[str, list[float]]:
    return await client_process([sys.executable, "-m", "sandhub.bench.upload_client", kind, address, str(mib), "3",
                                 *extra])


async def client_process(argv: list[str]) -> dict[str, list[float]]:
    """Runs a transfer client (its own process, as a real caller is); its
    JSON line: MB/s per repetition, by name."""
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"transfer client failed: {done.stderr.strip()[-500:]}")
    rates: dict[str, list[float]] = json.loads(done.stdout)
    return rates


def _nsenter_ls(pid: int) -> float:
    argv = ["nsenter", "-t", str(pid), "--all", "-r", "-w", "-S", "1000", "-G", "1000", "ls", "/"]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=30)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or b"work" not in done.stdout:
        raise RuntimeError(f"nsenter ls failed: {done.stderr.decode(errors='replace').strip()}")
    return elapsed


async def measure(*, runs: int, upload_mib: int) -> ExecBenchResults:
    results = ExecBenchResults(runs=runs, upload_mib=upload_mib)
    services = LocalServices(api_key=API_KEY)
    sink = _Sink()
    await services.start()
    channel = grpc.aio.insecure_channel(services.hub_address)
    md = (("authorization", f"Bearer {API_KEY}"),)
    try:
        await sink.start()
        containers = pb_grpc.OrchestratorServiceStub(channel)
        ex = xpb_grpc.ExecServiceStub(channel)
        c = (await containers.CreateContainer(
            pb.CreateContainerRequest(wait_until_running=True, labels={"bench": "exec"}), metadata=md)).container
        agent_pid = init_pid(services.local_config, c.container_id)
        ls = xpb.RunRequest(container_id=c.container_id, command=xpb.Command(argv=["ls", "/"]))

        for name in ("hub", "nsenter"):
            results.ls_ms[name] = []
        await ex.Run(ls, metadata=md)  # warm: the Hub connects to the agent on first use
        for _ in range(runs):
            results.ls_ms["hub"].append(1000 * await _timed(ex.Run(ls, metadata=md)))
            results.ls_ms["nsenter"].append(1000 * await asyncio.to_thread(_nsenter_ls, agent_pid))

        # Transfers are driven from a process of their own, as a caller's are.
        for name, rates in (await _client("sink", f"127.0.0.1:{sink.port}", upload_mib)).items():
            results.upload_mb_s[name] = rates
        hub_rates = await _client("hub", services.hub_address, upload_mib, c.container_id, API_KEY)
        results.upload_mb_s.update(hub_rates)
    except (grpc.aio.AioRpcError, RuntimeError, OSError) as e:
        results.failures.append(str(e))
    finally:
        await channel.close()
        await sink.stop()
        await services.stop()
    return results


def text(r: ExecBenchResults) -> str:
    lines = [f"`ls /` in one container, {r.runs} runs each, interleaved (ms)"]
    sums = r.summaries()
    for name, label in (("hub", "through the Hub (Run RPC)"), ("nsenter", "nsenter (floor)")):
        s = sums.get(name)
        if s is None:
            continue
        lines.append(f"  {label:<28} p50 {s.p50:6.2f}  p90 {s.p90:6.2f}  p99 {s.p99:6.2f}  max {s.max:7.2f}")
    hub, floor = sums.get("hub"), sums.get("nsenter")
    if hub and floor:
        lines.append(f"  ratio Hub/floor: p50 {hub.p50 / floor.p50:.2f}x, p99 {hub.p99 / floor.p99:.2f}x")
        lines += ["", "  Hub, every run:"] + ["  " + h for h in histogram(r.ls_ms["hub"])]
    if r.upload_mb_s:
        lines += ["", f"transfer of {r.upload_mib} MiB in 1 MiB messages (MB/s, best of 3)"]
        for name, label in (("plain_grpc", "plain gRPC client stream"), ("put_files", "PutFiles through the Hub"),
                            ("get_files", "GetFiles through the Hub")):
            if r.upload_mb_s.get(name):
                lines.append(f"  {label:<28} {max(r.upload_mb_s[name]):8.1f}")
        plain, put = r.upload_mb_s.get("plain_grpc"), r.upload_mb_s.get("put_files")
        if plain and put:
            lines.append(f"  ratio PutFiles/plain gRPC: {max(put) / max(plain):.2f}")
    for f in r.failures:
        lines.append(f"FAILED: {f}")
    return "\n".join(lines)


def to_json(r: ExecBenchResults) -> dict[str, Any]:
    data = asdict(r)
    data["ls_summary_ms"] = {k: asdict(v) if v else None for k, v in r.summaries().items()}
    data["tenant"] = TENANT
    return data
