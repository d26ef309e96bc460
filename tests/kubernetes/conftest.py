"""Fixtures of the Kubernetes backend's tests: a real control plane
(etcd + kube-apiserver + kube-scheduler + KWOK) for the whole session, and a
fresh namespace per test. Nothing here is faked: pods are stored, selected,
watched and scheduled by the real Kubernetes code; only the kubelet is KWOK.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from sandhub.bench.kwok_cluster import fake_node, wait_nodes_ready
from tests.kubernetes.control_plane import NODEGROUP, NODEGROUP_LABEL, NODEGROUP_TAINT, RUNTIME_CLASS, Binaries, ControlPlane

POD_CIDR = "127.244.0.0/16"
"""Pod IPs of the general node: loopback addresses, so a test can start a real
sandhub-agent at exactly the address the backend gives for a pod (KWOK runs no
containers; it assigns pod IPs from the node's podCIDR). Every 127/8 address is
this host's, and nothing else listens on them."""


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
        api.create_node(fake_node("kwok-general", {}, [], pod_cidr=POD_CIDR))
        api.create_node(fake_node("kwok-sandbox-1", {NODEGROUP_LABEL: NODEGROUP}, [
            client.V1Taint(key=NODEGROUP_TAINT, value=NODEGROUP, effect="NoSchedule")]))
        wait_nodes_ready(api, {"kwok-general", "kwok-sandbox-1"}, cp)
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
