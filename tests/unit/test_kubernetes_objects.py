"""Pure builders of the Kubernetes backend against literal expected objects
(no API server: these check what we send; tests/kubernetes checks what a
real kube-apiserver stores)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from kubernetes import client

from orchestrator_service.backends.kubernetes import objects as o
from orchestrator_service.backends.kubernetes.slug import is_safe, slug
from orchestrator_service.model import ContainerSpec, Port, Resources
from sandhub import internal_auth
from sandhub.config import KubernetesBackendConfig, KubernetesPlacement, KubernetesToleration
from sandhub.errors import InvalidField

T0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
CID = "cnt-abcdefghijkl"
AGENT_KEY = internal_auth.agent_key("unit-test-orchestrator-token-0123456789")
TOKEN = internal_auth.agent_token(AGENT_KEY, CID)
CONFIG = KubernetesBackendConfig(namespace="sbx", placements={
    "default": KubernetesPlacement(),
    "fargate": KubernetesPlacement(labels={"compute": "fargate"}),
    "ec2": KubernetesPlacement(
        node_selector={"eks.amazonaws.com/nodegroup": "sandbox"},
        tolerations=(KubernetesToleration(key="sandhub.dev/dedicated", value="sandbox", effect="NoSchedule"),),
        runtime_class="gvisor",
        egress_cidrs=("0.0.0.0/0",),
    ),
})


def spec(**changes: Any) -> ContainerSpec:
    base: dict[str, Any] = dict(
        tenant="Team A", image="python:3.12-slim", resources=Resources(500, 256, 128, 1024, 1024),
        env={"DEBUG": "1"}, labels={"app": "web"}, ttl_s=3600, ports=(Port(8000, "TCP", "http"),),
        placement="ec2", request_id="req-1",
    )
    base.update(changes)
    return ContainerSpec(**base)


def as_dict(obj: object) -> Any:
    return client.ApiClient().sanitize_for_serialization(obj)


def test_pod_for_an_ec2_node_group() -> None:
    pod = o.make_pod(spec(), container_id=CID, config=CONFIG, create_time=T0, expire_time=T0 + timedelta(hours=1),
                     agent_key=AGENT_KEY)
    assert as_dict(pod) == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": CID,
            "namespace": "sbx",
            "labels": {
                "app": "web",
                "app.kubernetes.io/managed-by": "sandhub",
                "sandhub.dev/container-id": CID,
                "sandhub.dev/tenant": "team-a-e18d322f",
                "sandhub.dev/placement": "ec2",
                "sandhub.dev/expires": "1767326645",
            },
            "annotations": {
                "sandhub.dev/tenant": "Team A",
                "sandhub.dev/placement": "ec2",
                "sandhub.dev/labels": '{"app": "web"}',
                "sandhub.dev/resources": '{"cpu_millicores": 500, "disk_mib": 1024, "memory_mib": 256, '
                                         '"open_files": 1024, "pids": 128}',
                "sandhub.dev/create-time": "2026-01-02T03:04:05.678000+00:00",
                "sandhub.dev/expire-time": "2026-01-02T04:04:05.678000+00:00",
                "sandhub.dev/request-id": "req-1",
                "sandhub.dev/defaulted-env": "HOME",
            },
        },
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "hostname": CID,
            "restartPolicy": "Never",
            "nodeSelector": {"eks.amazonaws.com/nodegroup": "sandbox"},
            "tolerations": [{"key": "sandhub.dev/dedicated", "operator": "Equal", "value": "sandbox",
                             "effect": "NoSchedule"}],
            "runtimeClassName": "gvisor",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "volumes": [{"name": "work", "emptyDir": {"sizeLimit": "1024Mi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "1024Mi"}},
                        {"name": "sandhub-agent", "emptyDir": {"medium": "Memory", "sizeLimit": "32Mi"}},
                        {"name": "sandhub-agent-state", "emptyDir": {"sizeLimit": "1024Mi"}}],
            "initContainers": [{
                "name": "sandhub-agent-install",
                "image": "sandhub/sandhub-agent:latest",
                "imagePullPolicy": "IfNotPresent",
                "command": ["/sandhub-agent", "install", "--token-env", "SANDHUB_AGENT_TOKEN",
                            "--token-file", "/run/sandhub/agent-token", "/sandhub/sandhub-agent"],
                "env": [{"name": "SANDHUB_AGENT_TOKEN", "value": TOKEN}],
                "resources": {"requests": {"cpu": "50m", "memory": "32Mi"},
                              "limits": {"cpu": "500m", "memory": "64Mi"}},
                "securityContext": {
                    "allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
                },
                "volumeMounts": [{"name": "sandhub-agent", "mountPath": "/sandhub"},
                                 {"name": "sandhub-agent-state", "mountPath": "/run/sandhub"}],
            }],
            "containers": [{
                "name": "main",
                "image": "python:3.12-slim",
                "imagePullPolicy": "IfNotPresent",
                "command": ["/sandhub/sandhub-agent", "--listen", "tcp:0.0.0.0:49983", "--state-dir", "/run/sandhub",
                            "--token-file", "/run/sandhub/agent-token", "--container-id", CID],
                "workingDir": "/work",
                "env": [{"name": "HOME", "value": "/work"}, {"name": "DEBUG", "value": "1"},
                        {"name": "SANDHUB_CONTAINER_ID", "value": CID}],
                "ports": [{"containerPort": 8000, "name": "http", "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "500m", "memory": "256Mi"},
                              "limits": {"cpu": "500m", "memory": "256Mi", "ephemeral-storage": "1024Mi"}},
                "securityContext": {
                    "allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
                },
                "readinessProbe": {"tcpSocket": {"port": 49983}, "periodSeconds": 1, "timeoutSeconds": 1,
                                   "failureThreshold": 3},
                "volumeMounts": [{"name": "work", "mountPath": "/work"}, {"name": "tmp", "mountPath": "/tmp"},
                                 {"name": "sandhub-agent", "mountPath": "/sandhub", "readOnly": True},
                                 {"name": "sandhub-agent-state", "mountPath": "/run/sandhub"}],
            }],
        },
    }


def test_fargate_profile_is_chosen_by_labels_only() -> None:
    pod = as_dict(o.make_pod(spec(placement="fargate", env={"HOME": "/home/me"}, ports=()), container_id=CID,
                             config=CONFIG, create_time=T0, expire_time=T0, agent_key=AGENT_KEY))
    assert pod["metadata"]["labels"]["compute"] == "fargate"
    assert "nodeSelector" not in pod["spec"] and "tolerations" not in pod["spec"]
    assert "runtimeClassName" not in pod["spec"]
    # The caller's HOME is kept and not marked as ours.
    assert pod["spec"]["containers"][0]["env"][0] == {"name": "HOME", "value": "/home/me"}
    assert "sandhub.dev/defaulted-env" not in pod["metadata"]["annotations"]


@pytest.mark.parametrize("key", ["sandhub.dev/container-id", "app.kubernetes.io/managed-by", "compute"])
def test_labels_that_would_move_or_hide_the_pod_are_refused(key: str) -> None:
    with pytest.raises(InvalidField) as e:
        o.make_pod(spec(placement="fargate", labels={key: "x"}), container_id=CID, config=CONFIG,
                   create_time=T0, expire_time=T0, agent_key=AGENT_KEY)
    assert e.value.field == f"labels[{key}]"


def test_network_policy_admits_the_hub_on_its_ports_and_egress_outside_private_ranges() -> None:
    policy = o.make_network_policy(spec(), container_id=CID, config=CONFIG, owner_uid="uid-1")
    assert as_dict(policy) == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": CID, "namespace": "sbx",
            "labels": {"app.kubernetes.io/managed-by": "sandhub", "sandhub.dev/container-id": CID},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": CID, "uid": "uid-1",
                                 "blockOwnerDeletion": False}],
        },
        "spec": {
            "podSelector": {"matchLabels": {"sandhub.dev/container-id": CID}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "sandhub-hub"}}}],
                         "ports": [{"port": 8000, "protocol": "TCP"}]}],
            "egress": [
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [
                    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"]}}]},
                {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                         "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                 "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
            ],
        },
    }


def test_default_placement_without_ports_needs_only_the_baseline() -> None:
    assert not o.needs_policy(spec(placement="default", ports=()), CONFIG)
    assert o.needs_policy(spec(placement="default"), CONFIG)
    assert o.needs_policy(spec(placement="ec2", ports=()), CONFIG)
    assert as_dict(o.make_baseline_policy(CONFIG))["spec"] == {
        "podSelector": {"matchExpressions": [{"key": "sandhub.dev/container-id", "operator": "Exists"}]},
        "policyTypes": ["Ingress", "Egress"],
        # Only the Hub's pods, only the agent port; no egress at all.
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "sandhub-hub"}}}],
                     "ports": [{"port": 49983, "protocol": "TCP"}]}],
    }


def test_baseline_admits_the_hub_of_another_namespace_on_the_configured_agent_port() -> None:
    config = KubernetesBackendConfig(namespace="sbx", hub_namespace="sandhub-system", agent_port=4000,
                                     hub_labels={"app": "hub"})
    assert as_dict(o.make_baseline_policy(config))["spec"]["ingress"] == [{
        "from": [{"podSelector": {"matchLabels": {"app": "hub"}},
                  "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "sandhub-system"}}}],
        "ports": [{"port": 4000, "protocol": "TCP"}]}]
    # A container's own policy never opens the agent port (the baseline alone does, to the Hub alone).
    own = as_dict(o.make_network_policy(spec(placement="default"), container_id=CID, config=config, owner_uid="u"))
    assert [p["port"] for rule in own["spec"]["ingress"] for p in rule["ports"]] == [8000]


def test_each_pod_carries_its_own_agent_credential_and_callers_cannot_set_it() -> None:
    other = "cnt-zzzzzzzzzzzz"
    pods = [as_dict(o.make_pod(spec(env={"SANDHUB_AGENT_TOKEN": "chosen", "SANDHUB_CONTAINER_ID": "x"}),
                               container_id=cid, config=CONFIG, create_time=T0, expire_time=T0, agent_key=AGENT_KEY))
            for cid in (CID, other)]
    for cid, pod in zip((CID, other), pods):
        env = pod["spec"]["containers"][0]["env"]
        assert "SANDHUB_AGENT_TOKEN" not in [e["name"] for e in env]  # the init container's only
        assert pod["spec"]["initContainers"][0]["env"] == [
            {"name": "SANDHUB_AGENT_TOKEN", "value": internal_auth.agent_token(AGENT_KEY, cid)}]
        assert {e["name"]: e["value"] for e in env}["SANDHUB_CONTAINER_ID"] == cid
        assert pod["spec"]["containers"][0]["command"][-2:] == ["--container-id", cid]
    assert pods[0]["spec"]["initContainers"][0]["env"] != pods[1]["spec"]["initContainers"][0]["env"]


def test_a_port_that_is_the_agents_is_refused() -> None:
    with pytest.raises(InvalidField) as e:
        o.make_pod(spec(ports=(Port(8000), Port(49983))), container_id=CID, config=CONFIG, create_time=T0,
                   expire_time=T0, agent_key=AGENT_KEY)
    assert e.value.field == "ports[1].port"


def test_patches() -> None:
    assert o.expiry_patch(T0) == {"metadata": {
        "labels": {"sandhub.dev/expires": "1767323045"},
        "annotations": {"sandhub.dev/expire-time": "2026-01-02T03:04:05.678000+00:00"}}}
    assert o.delete_mark_patch("Expired", "42", T0) == {"metadata": {
        "resourceVersion": "42", "annotations": {"sandhub.dev/delete-reason": "Expired",
                                                 "sandhub.dev/delete-time": "2026-01-02T03:04:05.678000+00:00"}}}


@pytest.mark.parametrize("text, expected", [
    ("tenant-a", "tenant-a"),
    ("Team A", "team-a-e18d322f"),
    ("___", "x-bda25155"),
    ("a.b_c", "a-b-c-5b8f934a"),
])
def test_slug(text: str, expected: str) -> None:
    assert slug(text) == expected
    assert is_safe(slug(text))


def test_slug_keeps_different_texts_apart_and_fits() -> None:
    assert slug("Team-A") != slug("team-a")
    long = slug("x" * 300)
    assert len(long) == 63 and is_safe(long)
