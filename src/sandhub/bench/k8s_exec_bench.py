"""`sandhub bench k8s-exec`: `ls /` in a Kubernetes container through the Hub.

It starts a real control plane of its own (etcd, kube-apiserver,
kube-scheduler, KWOK: `make k8s-tools`), an Orchestrator on the kubernetes
backend and a Hub in front of it: caller -> Hub -> (Orchestrator's
AgentDirectoryService, cached) -> sandhub-agent at the pod's IP and agent
port. KWOK runs no containers, so the bench runs the real agent itself,
installed and started with the pod's own init and main commands, on the pod
IP KWOK gave (a loopback podCIDR). The pods/exec path it was once compared
with is gone (issue 14); BENCHMARKS.md keeps that run's figures.

What only a real cluster shows is printed with the figures (REAL_CLUSTER).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from sandhub import internal_auth
from sandhub.bench.stats import Summary, summarize
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb
from sandhub.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

API_KEY = "bench-key"
TENANT = "bench"
NAMESPACE = "bench"
NODE = "kwok-bench"
POD_CIDR = "127.245.0.0/16"
"""Loopback pod IPs: the bench's agents listen on exactly the address the backend gives."""
PATHS = (("agent", "Hub -> agent (pod IP:port)"),)
REAL_CLUSTER = (
    "Only a real cluster shows: pod-network latency between the Hub's node and the pod's (here loopback); "
    "whether the CNI enforces the NetworkPolicy that admits only the Hub to the "
    "agent port; the agent image's pull and the init container's copy in pod start-up; on Fargate, the ENI "
    "set-up per pod."
)


@dataclass
class K8sExecResults:
    runs: int
    ls_ms: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def summaries(self) -> dict[str, Summary | None]:
        return {name: summarize(values) for name, values in self.ls_ms.items()}


async def _timed(call: Any) -> float:
    start = time.perf_counter()
    reply = await call
    if reply.exit_status.exit_code != 0:
        raise RuntimeError(f"ls / exited {reply.exit_status.exit_code}: {reply.stderr[:200]!r}")
    return 1000 * (time.perf_counter() - start)


def _prepare(cp: Any) -> None:
    """The bench's node (loopback pod IPs), namespace and default service account."""
    from kubernetes import client, config

    from sandhub.bench.kwok_cluster import fake_node, wait_nodes_ready

    api_client = config.new_client_from_config(config_file=str(cp.kubeconfig))
    try:
        core = client.CoreV1Api(api_client)
        core.create_node(fake_node(NODE, {}, [], pod_cidr=POD_CIDR))
        wait_nodes_ready(core, {NODE}, cp)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
        core.create_namespaced_service_account(
            NAMESPACE, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="default")))
    finally:
        api_client.close()


def _read_pod(cp: Any, name: str) -> Any:
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=str(cp.kubeconfig))
    try:
        return client.CoreV1Api(api_client).read_namespaced_pod(name, NAMESPACE)
    finally:
        api_client.close()


async def measure(*, runs: int, agent: str = "") -> K8sExecResults:
    from hub_service.server import start_hub
    from orchestrator_service.server import start_orchestrator
    from sandhub.bench.kwok_cluster import Binaries, ControlPlane
    from sandhub.bench.pod_agent import ListeningAgent, free_port, start_agent_as
    from sandhub.config import HubConfig, KubernetesBackendConfig, OrchestratorConfig

    results = K8sExecResults(runs=runs)
    binary = agent or os.environ.get("SANDHUB_AGENT", "")
    binaries = Binaries.find()
    if not binary or not os.access(binary, os.X_OK):
        results.failures.append("sandhub-agent is not built: run `make agent` and pass --agent or set SANDHUB_AGENT")
    if binaries.missing():
        results.failures.append(f"the control plane is not built: run `make k8s-tools` "
                                f"(missing: {', '.join(binaries.missing())})")
    if results.failures:
        return results
    root = Path(tempfile.mkdtemp(prefix="sandhub-k8s-bench-"))
    cp = ControlPlane(root=root / "cluster", binaries=binaries)
    (root / "cluster").mkdir()
    stops: list[Any] = []
    running: ListeningAgent | None = None
    try:
        await asyncio.to_thread(cp.start)
        await asyncio.to_thread(_prepare, cp)
        token, port = internal_auth.new_token(), free_port()
        kube = KubernetesBackendConfig(kubeconfig=str(cp.kubeconfig), namespace=NAMESPACE, agent_port=port)
        orch = await start_orchestrator(OrchestratorConfig(listen="127.0.0.1:0", backend="kubernetes",
                                                           kubernetes=kube, placements=("default",), token=token))
        stops.append(orch)
        hub_config = HubConfig(listen="127.0.0.1:0", orchestrator=f"127.0.0.1:{orch.port}",
                               api_keys={API_KEY: TENANT}, orchestrator_token=token)
        hubs = {"agent": await start_hub(hub_config)}
        stops += hubs.values()
        channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") for name, hub in hubs.items()}
        md = (("authorization", f"Bearer {API_KEY}"),)
        created = await pb_grpc.OrchestratorServiceStub(channels["agent"]).CreateContainer(
            pb.CreateContainerRequest(wait_until_running=True), metadata=md)
        cid = created.container.container_id
        pod = await asyncio.to_thread(_read_pod, cp, cid)
        main, [init] = pod.spec.containers[0], pod.spec.init_containers
        running = await start_agent_as(binary, main.command, {e.name: e.value for e in main.env},
                                       ip=pod.status.pod_ip, port=port, root=root / "pod", install=init.command,
                                       install_env={e.name: e.value for e in init.env or ()})
        stubs = {name: xpb_grpc.ExecServiceStub(ch) for name, ch in channels.items()}
        ls = xpb.RunRequest(container_id=cid, command=xpb.Command(argv=["ls", "/"]))
        for name, stub in stubs.items():
            results.ls_ms[name] = []
            await stub.Run(ls, metadata=md)  # warm: connections, the directory's answer cached
        for _ in range(runs):
            for name, stub in stubs.items():
                results.ls_ms[name].append(await _timed(stub.Run(ls, metadata=md)))
        for ch in channels.values():
            await ch.close()
    except (grpc.aio.AioRpcError, RuntimeError, OSError, AssertionError) as e:
        results.failures.append(str(e))
    finally:
        for server in reversed(stops):
            await server.stop(0)
        if running is not None:
            await running.stop()
        await asyncio.to_thread(cp.stop)
        shutil.rmtree(root, ignore_errors=True)
    return results


def text(r: K8sExecResults) -> str:
    lines = [f"`ls /` on the kubernetes backend through the Hub, {r.runs} runs (ms; KWOK control plane on this host)"]
    sums = r.summaries()
    for name, label in PATHS:
        s = sums.get(name)
        if s is not None:
            lines.append(f"  {label:<38} p50 {s.p50:7.2f}  p90 {s.p90:7.2f}  p99 {s.p99:7.2f}  max {s.max:7.2f}")
    lines.append(REAL_CLUSTER)
    for f in r.failures:
        lines.append(f"FAILED: {f}")
    return "\n".join(lines)


def to_json(r: K8sExecResults) -> dict[str, Any]:
    data = asdict(r)
    data["ls_summary_ms"] = {k: asdict(v) if v else None for k, v in r.summaries().items()}
    data["real_cluster"] = REAL_CLUSTER
    return data
