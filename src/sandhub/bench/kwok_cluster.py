"""A real Kubernetes control plane on loopback: etcd, kube-apiserver,
kube-scheduler and the KWOK controller (fake nodes; pods moved to Running
with IPs), started from the binaries `make k8s-tools` built and stopped by
PID. Configured the way kwokctl's "binary" runtime configures them, but
started here so the caller (the Kubernetes tests, `sandhub bench k8s-exec`)
owns every process. Needs a repository checkout (the tools' versions come
from tools/k8s/*/go.mod) and the dev extra (cryptography, for its PKI).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandhub.bench.kwok_pki import ClusterPKI

REPO = Path(__file__).resolve().parents[3]
TOOLS_CACHE = Path(os.environ.get("TOOLS_CACHE") or Path.home() / ".cache" / "sandhub" / "tools")
STAGES = Path(__file__).with_name("kwok_stages.yaml")

FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
"""KWOK manages only nodes with this annotation (value "fake"), like kwokctl."""
NODEGROUP_LABEL = "eks.amazonaws.com/nodegroup"
NODEGROUP = "sandbox"
NODEGROUP_TAINT = "sandhub.dev/dedicated"
"""The test cluster's "EC2 node group": one fake node with this label and taint."""
RUNTIME_CLASS = "gvisor"


def _version(tool_dir: str, module: str) -> str:
    text = (REPO / "tools" / "k8s" / tool_dir / "go.mod").read_text()
    m = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", text, re.M)
    if not m:
        raise RuntimeError(f"tools/k8s/{tool_dir}/go.mod does not require {module}")
    return m.group(1)


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: Path
    kube_scheduler: Path
    etcd: Path
    kwok: Path
    kwok_stages: Path

    @classmethod
    def find(cls) -> Binaries:
        """Where `make k8s-tools` put them (the Makefile exports the same paths)."""
        kube = _version("kubernetes", "k8s.io/kubernetes")
        etcd = _version("etcd", "go.etcd.io/etcd/server/v3")
        kwok = _version("kwok", "sigs.k8s.io/kwok")
        env = os.environ.get
        return cls(
            kube_apiserver=Path(env("SANDHUB_KUBE_APISERVER") or TOOLS_CACHE / f"kube-apiserver-{kube}/kube-apiserver"),
            kube_scheduler=Path(env("SANDHUB_KUBE_SCHEDULER") or TOOLS_CACHE / f"kube-scheduler-{kube}/kube-scheduler"),
            etcd=Path(env("SANDHUB_ETCD") or TOOLS_CACHE / f"etcd-{etcd}/etcd"),
            kwok=Path(env("SANDHUB_KWOK") or TOOLS_CACHE / f"kwok-{kwok}/kwok"),
            kwok_stages=Path(env("SANDHUB_KWOK_STAGES") or TOOLS_CACHE / f"kwok-{kwok}/stages"),
        )

    def missing(self) -> list[str]:
        return [str(p) for p in (self.kube_apiserver, self.kube_scheduler, self.etcd, self.kwok, self.kwok_stages)
                if not p.exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ControlPlane:
    root: Path
    binaries: Binaries
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    api_port: int = 0
    kubeconfig: Path = Path()
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    # -- start ------------------------------------------------------------------

    def start(self) -> None:
        pki = ClusterPKI(self.root / "pki")
        self._start_etcd()
        self._start_apiserver(pki)
        self._write_kubeconfig(pki)
        self._start_scheduler()
        self._start_kwok(pki)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")
        # Own session: a stop signal to the whole group never reaches pytest.
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        log.close()

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn("etcd", [
            str(self.binaries.etcd), "--name=test", f"--data-dir={self.root / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}", f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=test=http://127.0.0.1:{peer}", "--unsafe-no-fsync", "--log-level=warn",
            f"--listen-metrics-urls=http://127.0.0.1:{free_port()}",
        ])
        self._wait("etcd", lambda: _http_ok(f"{self.etcd_url}/health"), timeout_s=30)

    def _start_apiserver(self, pki: ClusterPKI) -> None:
        self.api_port = free_port()
        crt, key = pki.issue("kube-apiserver", server=True)
        kubelet_crt, kubelet_key = pki.issue("kube-apiserver-kubelet-client", server=False, client=True,
                                             organization="system:masters")
        tokens = self.root / "tokens.csv"
        tokens.write_text(f'{self.token},admin,admin,"system:masters"\n')
        tokens.chmod(0o600)
        self.ca_cert = pki.ca_cert
        self._spawn("kube-apiserver", [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers={self.etcd_url}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}", f"--tls-cert-file={crt}", f"--tls-private-key-file={key}",
            f"--client-ca-file={pki.ca_cert}", f"--token-auth-file={tokens}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
            "--service-cluster-ip-range=10.96.0.0/16", "--endpoint-reconciler-type=none",
            # It taints new nodes not-ready until kube-controller-manager's node
            # lifecycle controller clears it; that controller doesn't run here.
            "--disable-admission-plugins=TaintNodesByCondition",
            # logs (and any exec) go through KWOK's kubelet server on loopback.
            f"--kubelet-client-certificate={kubelet_crt}", f"--kubelet-client-key={kubelet_key}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--cert-dir={self.root / 'apiserver-certs'}", "--profiling=false", "--v=1",
        ])
        self._wait("kube-apiserver", lambda: _http_ok(f"{self.server}/readyz", token=self.token, ca=pki.ca_cert),
                   timeout_s=90)

    def _write_kubeconfig(self, pki: ClusterPKI) -> None:
        self.kubeconfig = self.root / "kubeconfig"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: test\n  cluster:\n    server: {self.server}\n"
            f"    certificate-authority: {pki.ca_cert}\n"
            f"users:\n- name: admin\n  user:\n    token: {self.token}\n"
            "contexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n"
            "current-context: test\n"
        )
        self.kubeconfig.chmod(0o600)

    def _start_scheduler(self) -> None:
        kc = str(self.kubeconfig)
        self._spawn("kube-scheduler", [
            str(self.binaries.kube_scheduler), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}", "--leader-elect=false", "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}", f"--cert-dir={self.root / 'scheduler-certs'}", "--v=1",
        ])

    def _start_kwok(self, pki: ClusterPKI) -> None:
        crt, key = pki.issue("kwok", server=True)
        config = self.root / "kwok.yaml"
        stages = sorted(self.binaries.kwok_stages.glob("*.yaml"))
        # Stages only: without a KwokConfiguration document KWOK takes its own
        # defaults (one given with empty options would zero them).
        config.write_text("\n---\n".join([*(p.read_text() for p in stages), STAGES.read_text()]))
        port = free_port()
        self._spawn("kwok", [
            str(self.binaries.kwok), f"--kubeconfig={self.kubeconfig}", f"--config={config}",
            "--manage-all-nodes=false", f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
            "--node-ip=127.0.0.1", f"--node-port={port}", f"--server-address=127.0.0.1:{port}",
            f"--tls-cert-file={crt}", f"--tls-private-key-file={key}", "--cidr=10.244.0.0/16",
            "--node-lease-duration-seconds=40",
        ])

    def _wait(self, name: str, ready: object, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        proc = self.procs[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready after {timeout_s}s:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.root / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def check_alive(self) -> None:
        """Fails loudly when a component died mid-session."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    # -- stop ---------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM each process we started (by PID, newest first), SIGKILL the slow."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs.clear()


def fake_node(name: str, labels: dict[str, str], taints: list[Any], pod_cidr: str | None = None) -> Any:
    """A node KWOK plays (it manages nodes with FAKE_NODE_ANNOTATION). Pods on
    it get IPs from ``pod_cidr`` when given (else KWOK's --cidr)."""
    from kubernetes import client

    capacity = {"cpu": "64", "memory": "256Gi", "pods": "500", "ephemeral-storage": "1Ti"}
    return client.V1Node(
        metadata=client.V1ObjectMeta(
            name=name, annotations={FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            labels={"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok", **labels},
        ),
        spec=client.V1NodeSpec(taints=taints or None, pod_cidr=pod_cidr),
        status=client.V1NodeStatus(allocatable=capacity, capacity=capacity),
    )


def wait_nodes_ready(api: Any, names: set[str], cp: ControlPlane, timeout_s: float = 60) -> None:
    """Until KWOK reports every node in ``names`` Ready (``api``: a CoreV1Api)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cp.check_alive()
        ready = {
            n.metadata.name for n in api.list_node().items
            if any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))
        }
        if names <= ready:
            return
        time.sleep(0.2)
    raise RuntimeError(f"KWOK did not make nodes {sorted(names)} Ready:\n{cp.log_tail('kwok')}")


def _http_ok(url: str, *, token: str = "", ca: Path | None = None) -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    # No proxy: the control plane is on loopback, whatever the environment says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(req, timeout=2) as resp:
            return int(resp.status) == 200
    except OSError:
        return False
