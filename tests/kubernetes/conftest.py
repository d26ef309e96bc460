"""Fixtures of the Kubernetes backend's tests: a real control plane
(etcd + kube-apiserver + kube-scheduler + KWOK) for the whole session, and a
fresh namespace per test. Nothing here is faked: pods are stored, selected,
watched and scheduled by the real Kubernetes code; only the kubelet is KWOK.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from tests.kubernetes.control_plane import (
    FAKE_NODE_ANNOTATION, NODEGROUP, NODEGROUP_LABEL, NODEGROUP_TAINT, RUNTIME_CLASS, Binaries, ControlPlane,
)



def _node(name: str, labels: dict[str, str], taints: list[client.V1Taint]) -> client.V1Node:
    capacity = {"cpu": "64", "memory": "256Gi", "pods": "500", "ephemeral-storage": "1Ti"}
    return client.V1Node(
        metadata=client.V1ObjectMeta(
            name=name, annotations={FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            labels={"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok", **labels},
        ),
        spec=client.V1NodeSpec(taints=taints or None),
        status=client.V1NodeStatus(allocatable=capacity, capacity=capacity),
    )


def _wait_nodes_ready(api: client.CoreV1Api, names: set[str], cp: ControlPlane, timeout_s: float = 60) -> None:
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


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """Runs against the REAL kube-apiserver (built by `make k8s-tools`)."""
    binaries = Binaries.find()
    missing = binaries.missing()
    if missing:
        pytest.fail("the Kubernetes test control plane is not built; run `make k8s-tools` "
                    f"(missing: {', '.join(missing)})")
    cp = ControlPlane(root=tmp_path_factory.mktemp("k8s"), binaries=binaries)
    try:
        cp.start()
        api = client.CoreV1Api(api_client(cp.kubeconfig))
        api.create_node(_node("kwok-general", {}, []))
        api.create_node(_node("kwok-sandbox-1", {NODEGROUP_LABEL: NODEGROUP}, [
            client.V1Taint(key=NODEGROUP_TAINT, value=NODEGROUP, effect="NoSchedule")]))
        _wait_nodes_ready(api, {"kwok-general", "kwok-sandbox-1"}, cp)
        # The RuntimeClass admission plugin refuses pods naming one that doesn't exist.
        client.NodeV1Api(api.api_client).create_runtime_class(
            client.V1RuntimeClass(metadata=client.V1ObjectMeta(name=RUNTIME_CLASS), handler="runsc"))
        api.api_client.close()
        yield cp
    finally:
        cp.stop()


def api_client(kubeconfig: Path) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture
def kube(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    """A client of the test's own, for checking what the server stored."""
    api = api_client(control_plane.kubeconfig)
    yield api
    api.close()


@pytest.fixture
def namespace(kube: client.ApiClient, control_plane: ControlPlane) -> Iterator[str]:
    """A namespace of the test's own, with the "default" service account that
    kube-controller-manager would make (it is not run here)."""
    name = f"t-{secrets.token_hex(4)}"
    core = client.CoreV1Api(kube)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_service_account(name, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="default")))
    yield name
    control_plane.check_alive()
    # Pods go away through KWOK's pod-delete stage; the namespace object is
    # left (no namespace controller runs), which costs nothing.
    core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
