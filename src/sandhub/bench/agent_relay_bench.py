"""`sandhub bench agent-relay`: the Hub's relay to a container's agent, beside its floors.

One real sandhub-agent ($SANDHUB_AGENT, or --agent) runs as a plain local
process on a unix socket (no container: this measures the relay, not
isolation); a static AgentDirectoryService stands in for the Orchestrator;
a Hub relays ExecService to the agent. In one run, interleaved so load hits
all alike:
- `ls /` through the Hub (Run: caller -> Hub -> agent over its unix socket);
- `ls /` from the agent directly (Run over the unix socket, no Hub);
- `ls /` with subprocess in this process (fork + exec, no gRPC at all);
and PutFiles / GetFiles MB/s through the Hub, by a client process of its own
(beside a plain gRPC client stream to a trivial server, as `bench exec`), in
Python and, when Go and the source tree are here, in Go (tools/transfer): the
Go one shows whether the caller or the Hub is the limit.

The Hub and the directory run in a process of their own
(sandhub.bench.agent_relay_server), as `sandhub serve` runs the Hub.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from sandhub import internal_auth
from sandhub.bench.exec_bench import _client, _Sink, client_process
from sandhub.bench.stats import Summary, summarize
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc

API_KEY = "bench-key"
TENANT = "bench"
CONTAINER_ID = "cnt-benchagent01"


@dataclass
class AgentRelayResults:
    runs: int
    upload_mib: int
    ls_ms: dict[str, list[float]] = field(default_factory=dict)
    upload_mb_s: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def summaries(self) -> dict[str, Summary | None]:
        return {name: summarize(values) for name, values in self.ls_ms.items()}


def _agent_binary(explicit: str) -> str:
    path = explicit or os.environ.get("SANDHUB_AGENT", "")
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError("sandhub-agent is not built: run `make agent` and pass --agent or set SANDHUB_AGENT")
    return path


def _subprocess_ls() -> float:
    start = time.perf_counter()
    done = subprocess.run(["ls", "/"], capture_output=True, timeout=30)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError("ls / failed")
    return elapsed


async def _timed(call: Any) -> float:
    start = time.perf_counter()
    reply = await call
    if reply.exit_status.exit_code != 0:
        raise RuntimeError(f"ls / exited {reply.exit_status.exit_code}: {reply.stderr[:200]!r}")
    return time.perf_counter() - start


async def measure(*, runs: int, upload_mib: int, agent: str = "") -> AgentRelayResults:
    results = AgentRelayResults(runs=runs, upload_mib=upload_mib)
    try:
        binary = _agent_binary(agent)
    except RuntimeError as e:
        results.failures.append(str(e))
        return results
    token = internal_auth.new_token()
    agent_token = internal_auth.agent_token(internal_auth.agent_key(token), CONTAINER_ID)
    root = Path(tempfile.mkdtemp(prefix="shb-agent-"))
    work = root / "work"
    work.mkdir()
    socket = root / "agent.sock"
    process = await asyncio.create_subprocess_exec(
        binary, f"--listen=unix:{socket}", f"--container-id={CONTAINER_ID}", f"--workdir={work}",
        f"--state-dir={root / 'state'}", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                              "SANDHUB_AGENT_TOKEN": agent_token},
        stdin=asyncio.subprocess.DEVNULL)
    sink = _Sink()  # the plain-gRPC transfer's server
    servers: asyncio.subprocess.Process | None = None
    hub_channel = direct_channel = None
    try:
        for _ in range(500):
            if socket.exists():
                break
            await asyncio.sleep(0.01)
        await sink.start()
        servers = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sandhub.bench.agent_relay_server", f"{CONTAINER_ID}=unix:{socket}",
            env={**os.environ, "SANDHUB_ORCHESTRATOR_TOKEN": token, "SANDHUB_BENCH_API_KEY": API_KEY,
                 "SANDHUB_BENCH_TENANT": TENANT},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert servers.stdout is not None
        line = await asyncio.wait_for(servers.stdout.readline(), 60)
        if not line:
            raise RuntimeError("the bench's Hub did not start (see its log above)")
        hub_address = f"127.0.0.1:{json.loads(line)['hub_port']}"
        hub_channel = grpc.aio.insecure_channel(hub_address)
        direct_channel = grpc.aio.insecure_channel(f"unix:{socket}")
        via_hub, direct = xpb_grpc.ExecServiceStub(hub_channel), xpb_grpc.ExecServiceStub(direct_channel)
        md = (("authorization", f"Bearer {API_KEY}"),)
        ls = xpb.RunRequest(container_id=CONTAINER_ID, command=xpb.Command(argv=["ls", "/"]))

        def agent_md() -> tuple[tuple[str, str], ...]:
            return internal_auth.agent_call_metadata(agent_token, "/sandhub.exec.v1.ExecService/Run")

        for name in ("hub", "agent", "subprocess"):
            results.ls_ms[name] = []
        await via_hub.Run(ls, metadata=md)  # warm: channels connected, directory answer cached
        await direct.Run(ls, metadata=agent_md())
        for _ in range(runs):
            results.ls_ms["hub"].append(1000 * await _timed(via_hub.Run(ls, metadata=md)))
            results.ls_ms["agent"].append(1000 * await _timed(direct.Run(ls, metadata=agent_md())))
            results.ls_ms["subprocess"].append(1000 * await asyncio.to_thread(_subprocess_ls))

        for name, rates in (await _client("sink", f"127.0.0.1:{sink.port}", upload_mib)).items():
            results.upload_mb_s[name] = rates
        results.upload_mb_s.update(await _client("hub", hub_address, upload_mib, CONTAINER_ID, API_KEY,
                                                 str(work / "blob.bin")))
        results.upload_mb_s.update(await _client("agent", f"unix:{socket}", upload_mib, CONTAINER_ID, agent_token,
                                                 str(work / "blob.bin")))
        go_client = await asyncio.to_thread(_build_go_client, root)
        if go_client:  # else (no Go, or an installed package) its rows are left out
            results.upload_mb_s.update(await client_process(
                [go_client, hub_address, str(upload_mib), "3", CONTAINER_ID, API_KEY, str(work / "blob.bin")]))
    except (grpc.aio.AioRpcError, RuntimeError, OSError) as e:
        results.failures.append(str(e))
    finally:
        for channel in (hub_channel, direct_channel):
            if channel is not None:
                await channel.close()
        if servers is not None:
            assert servers.stdin is not None
            servers.stdin.close()  # it stops when stdin closes
            try:
                await asyncio.wait_for(servers.wait(), 15)
            except TimeoutError:
                servers.kill()
                await servers.wait()
        await sink.stop()
        if process.returncode is None:
            process.terminate()
            await process.wait()
        shutil.rmtree(root, ignore_errors=True)
    return results


REPO = Path(__file__).resolve().parents[3]


def _build_go_client(into: Path) -> str:
    """tools/transfer built with Go's own cache (seconds once warm); "" when
    there is no Go or no source tree here (an installed package)."""
    go = shutil.which("go")
    if go is None or not (REPO / "tools" / "transfer" / "main.go").exists():
        return ""
    out = into / "transfer"
    done = subprocess.run([go, "build", "-trimpath", "-o", str(out), "./tools/transfer"], cwd=REPO,
                          env={**os.environ, "CGO_ENABLED": "0"}, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"building tools/transfer failed: {done.stderr.strip()[-500:]}")
    return str(out)


def text(r: AgentRelayResults) -> str:
    lines = [f"`ls /` via the agent, {r.runs} runs each, interleaved (ms)"]
    sums = r.summaries()
    for name, label in (("hub", "Hub -> agent (Run RPC)"), ("agent", "agent directly (unix socket)"),
                        ("subprocess", "subprocess, no gRPC (floor)")):
        s = sums.get(name)
        if s is not None:
            lines.append(f"  {label:<30} p50 {s.p50:6.2f}  p90 {s.p90:6.2f}  p99 {s.p99:6.2f}  max {s.max:7.2f}")
    hub, agent, floor = sums.get("hub"), sums.get("agent"), sums.get("subprocess")
    if hub and agent and floor:
        lines.append(f"  Hub/agent: p50 {hub.p50 / agent.p50:.2f}x, p99 {hub.p99 / agent.p99:.2f}x;  "
                     f"Hub/floor: p50 {hub.p50 / floor.p50:.2f}x, p99 {hub.p99 / floor.p99:.2f}x")
    if r.upload_mb_s:
        lines += ["", f"transfer of {r.upload_mib} MiB in 1 MiB messages (MB/s, best of 3)"]
        for name, label in (("plain_grpc", "plain gRPC client stream"), ("put_files", "PutFiles Hub -> agent"),
                            ("go_put_files", "  the same, Go client"),
                            ("agent_put_files", "PutFiles agent directly"), ("get_files", "GetFiles agent -> Hub"),
                            ("go_get_files", "  the same, Go client"),
                            ("agent_get_files", "GetFiles agent directly")):
            if r.upload_mb_s.get(name):
                lines.append(f"  {label:<30} {max(r.upload_mb_s[name]):8.1f}")
    for f in r.failures:
        lines.append(f"FAILED: {f}")
    return "\n".join(lines)


def to_json(r: AgentRelayResults) -> dict[str, Any]:
    data = asdict(r)
    data["ls_summary_ms"] = {k: asdict(v) if v else None for k, v in r.summaries().items()}
    return data

