"""deploy/'s manifests against the REAL kube-apiserver (RBAC authorization,
as control_plane.py starts it): every object is created for real in fresh
namespaces (the API server validates it; nothing runs, KWOK nodes run no
containers), and the Roles grant exactly what the code calls: every verb the
backend uses is allowed to its service account, and nothing else (other
verbs, other resources, other namespaces) is; the Hub's account gets nothing.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, utils

from orchestrator_service.backends import cluster_agent
from sandhub.config import load_kubernetes

pytestmark = pytest.mark.kubernetes

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BACKEND = REPO / "src" / "orchestrator_service" / "backends" / "kubernetes"
SYSTEM_NS, CONTAINERS_NS = "sandhub-system", "sandhub"
HUB = REPO / "src" / "hub_service"

ORCHESTRATOR_GRANTS = {
    ("", "pods", ""): {"create", "get", "list", "watch", "patch", "delete"},
    ("networking.k8s.io", "networkpolicies", ""): {"create", "get", "update", "delete"},
}
HUB_GRANTS: dict[tuple[str, str, str], set[str]] = {}
"""The Hub calls no Kubernetes API: it relays exec to each pod's agent."""
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
RESOURCES = [
    ("", "pods", ""), ("", "pods", "exec"), ("", "pods", "log"), ("", "pods", "attach"),
    ("", "pods", "portforward"), ("", "pods", "ephemeralcontainers"), ("", "pods", "status"),
    ("", "secrets", ""), ("", "configmaps", ""), ("", "services", ""), ("", "serviceaccounts", ""),
    ("", "serviceaccounts", "token"), ("", "namespaces", ""), ("networking.k8s.io", "networkpolicies", ""),
    ("apps", "deployments", ""), ("rbac.authorization.k8s.io", "roles", ""),
    ("rbac.authorization.k8s.io", "rolebindings", ""),
]
# client method -> RBAC verb, for the calls the backend's modules make.
METHOD_VERB = {"create": "create", "read": "get", "list": "list", "patch": "patch", "delete": "delete",
               "replace": "update", "delete_collection": "deletecollection"}
METHOD_RESOURCE = {"pod": ("", "pods", ""), "network_policy": ("networking.k8s.io", "networkpolicies", "")}


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def used_grants(root: Path) -> dict[tuple[str, str, str], set[str]]:
    """What the code under ``root`` calls, read from its source:
    `<verb>_namespaced_<kind>` calls and watch=True lists."""
    used: dict[tuple[str, str, str], set[str]] = {}
    for path in root.rglob("*.py"):
        text = path.read_text()
        for method, kind in re.findall(r"\.(delete_collection|create|read|list|patch|delete|replace)_namespaced_"
                                       r"(pod|network_policy)\b", text):
            used.setdefault(METHOD_RESOURCE[kind], set()).add(METHOD_VERB[method])
        if ".read_container_pod(" in text:  # Api.read_container_pod: a pod get
            used.setdefault(("", "pods", ""), set()).add("get")
        if re.search(r"list_namespaced_pod\([^)]*watch=True", text, re.S):
            used.setdefault(("", "pods", ""), set()).add("watch")
    return used


def test_role_verbs_are_the_calls_the_code_makes() -> None:
    assert used_grants(BACKEND) == ORCHESTRATOR_GRANTS
    assert used_grants(HUB) == HUB_GRANTS
    assert not any(re.search(r"^\s*(from|import) kubernetes\b", p.read_text(), re.M) for p in HUB.rglob("*.py"))
    roles = {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "Role"}
    assert set(roles) == {"sandhub-orchestrator"}
    for name, expected in (("sandhub-orchestrator", ORCHESTRATOR_GRANTS),):
        granted: dict[tuple[str, str, str], set[str]] = {}
        for rule in roles[name]["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    resource, _, sub = res.partition("/")
                    granted.setdefault((group, resource, sub), set()).update(rule["verbs"])
        assert granted == expected, name


def test_deployments_use_the_config_loaders_variables() -> None:
    config_src = (REPO / "src" / "sandhub" / "config.py").read_text()
    known = set(re.findall(r'"(SANDHUB_[A-Z0-9_]+)"', config_src))
    for d in manifests():
        if d["kind"] != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        names = {e["name"] for e in container["env"] if e["name"].startswith("SANDHUB_")}
        assert names <= known, (d["metadata"]["name"], names - known)
        port = container["ports"][0]["containerPort"]
        assert container["readinessProbe"]["grpc"]["port"] == port
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert d["spec"]["template"]["metadata"]["labels"].items() >= d["spec"]["selector"]["matchLabels"].items()


def test_the_agent_image_holds_only_the_binary_where_init_containers_run_it() -> None:
    lines = [line for line in (REPO / "deploy" / "agent.Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == ["FROM scratch", f"COPY sandhub-agent {cluster_agent.AGENT_IN_IMAGE}",
                     f'ENTRYPOINT ["{cluster_agent.AGENT_IN_IMAGE}"]']
    [orchestrator] = [d for d in manifests() if d["kind"] == "Deployment"
                      and d["metadata"]["name"] == "sandhub-orchestrator"]
    env = {e["name"]: e.get("value") for e in orchestrator["spec"]["template"]["spec"]["containers"][0]["env"]}
    config = load_kubernetes(env)
    assert config.agent_image == "sandhub-agent:latest" and config.agent_port == 49983


def test_both_deployments_share_the_orchestrator_token_and_only_the_hub_reaches_it() -> None:
    """Issue 11 item 2: the token reaches both as a file from one Secret (not
    optional, in no environment value); the NetworkPolicy admits only the Hub's
    pods on the Orchestrator's port; probes use gRPC health, open without it."""
    docs = manifests()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for name in ("sandhub-orchestrator", "sandhub-hub"):
        pod = deployments[name]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert "SANDHUB_ORCHESTRATOR_TOKEN" not in env, name
        token_file = Path(env["SANDHUB_ORCHESTRATOR_TOKEN_FILE"])
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(token_file.parent)]
        assert mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "sandhub-orchestrator-token", name
        assert not volume["secret"].get("optional") and volume["secret"].get("items") is None
        assert token_file.name == "token"  # the Secret's key, as deploy/README.md creates it
        assert volume["secret"]["defaultMode"] & 0o007 == 0 and pod["securityContext"]["fsGroup"] == 65532
        assert set(container["readinessProbe"]) >= {"grpc"} and set(container["livenessProbe"]) >= {"grpc"}
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "sandhub-orchestrator"]
    orchestrator = deployments["sandhub-orchestrator"]
    assert policy["metadata"]["namespace"] == orchestrator["metadata"]["namespace"]
    assert policy["spec"]["podSelector"]["matchLabels"] == orchestrator["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    hub_labels = deployments["sandhub-hub"]["spec"]["template"]["metadata"]["labels"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "sandhub-hub"}}}]
    assert hub_labels["app.kubernetes.io/name"] == "sandhub-hub"
    assert rule["ports"] == [{"port": 50052, "protocol": "TCP"}]


@pytest.fixture
def deployed(kube: client.ApiClient) -> Iterator[dict[str, str]]:
    """Every manifest created for real, in fresh namespaces standing in for
    sandhub-system and sandhub."""
    suffix = secrets.token_hex(3)
    names = {SYSTEM_NS: f"d-{suffix}-system", CONTAINERS_NS: f"d-{suffix}"}
    docs = manifests()
    for d in docs:
        meta = d["metadata"]
        if d["kind"] == "Namespace":
            meta["name"] = names[meta["name"]]
        elif "namespace" in meta:
            meta["namespace"] = names[meta["namespace"]]
        for subject in d.get("subjects") or ():
            subject["namespace"] = names[subject["namespace"]]
    # Namespaces first; then a server-side dry run of the rest, then the real thing.
    order = sorted(docs, key=lambda d: d["kind"] != "Namespace")
    for d in order:
        if d["kind"] == "Namespace":
            utils.create_from_dict(kube, d)
    for dry_run in ("All", None):
        for d in order:
            if d["kind"] != "Namespace":
                kwargs = {"dry_run": dry_run} if dry_run else {}
                utils.create_from_dict(kube, d, **kwargs)
    yield names


def _allowed(kube: client.ApiClient, sa_ns: str, sa: str, ns: str, key: tuple[str, str, str], verb: str) -> bool:
    group, resource, sub = key
    review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
        user=f"system:serviceaccount:{sa_ns}:{sa}",
        groups=["system:serviceaccounts", f"system:serviceaccounts:{sa_ns}", "system:authenticated"],
        resource_attributes=client.V1ResourceAttributes(
            namespace=ns, group=group, resource=resource, subresource=sub or None, verb=verb),
    ))
    return bool(client.AuthorizationV1Api(kube).create_subject_access_review(review).status.allowed)


def test_manifests_apply_and_rbac_is_exact(kube: client.ApiClient, deployed: dict[str, str]) -> None:
    system, containers = deployed[SYSTEM_NS], deployed[CONTAINERS_NS]
    apps = client.AppsV1Api(kube)
    stored = apps.read_namespaced_deployment("sandhub-orchestrator", system)
    assert stored.spec.template.spec.service_account_name == "sandhub-orchestrator"
    assert stored.spec.template.spec.containers[0].readiness_probe._grpc.port == 50052
    hub = apps.read_namespaced_deployment("sandhub-hub", system)
    assert hub.spec.template.spec.volumes[0].secret.secret_name == "sandhub-api-keys"
    for d in (stored, hub):
        assert "sandhub-orchestrator-token" in {v.secret.secret_name for v in d.spec.template.spec.volumes if v.secret}
    for sa, grants in (("sandhub-orchestrator", ORCHESTRATOR_GRANTS), ("sandhub-hub", HUB_GRANTS)):
        allowed = {(key, verb) for key in RESOURCES for verb in VERBS
                   if _allowed(kube, system, sa, containers, key, verb)}
        assert allowed == {(key, verb) for key, verbs in grants.items() for verb in verbs}, sa
        # Nothing in its own namespace (not the Hub's pods, not the API keys) or any other.
        for ns in (system, "default", "kube-system"):
            for key in RESOURCES:
                for verb in ("get", "list", "create", "delete"):
                    assert not _allowed(kube, system, sa, ns, key, verb), (sa, ns, key, verb)
        # Cluster-wide: no pods of every namespace, no nodes.
        for key in (("", "pods", ""), ("", "nodes", ""), ("", "secrets", "")):
            assert not _allowed(kube, system, sa, "", key, "list"), (sa, key)


def test_service_account_token_really_is_limited(kube: client.ApiClient, deployed: dict[str, str],
                                                 tmp_path: Path) -> None:
    """The same, as the service account itself: a real token, real requests."""
    system, containers = deployed[SYSTEM_NS], deployed[CONTAINERS_NS]
    token = client.CoreV1Api(kube).create_namespaced_service_account_token(
        "sandhub-orchestrator", system,
        client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)),
    ).status.token
    conf = client.Configuration()
    conf.host = kube.configuration.host
    conf.ssl_ca_cert = kube.configuration.ssl_ca_cert
    conf.api_key = {"authorization": f"Bearer {token}"}
    with client.ApiClient(conf) as sa_client:
        core = client.CoreV1Api(sa_client)
        assert core.list_namespaced_pod(containers).items == []
        for call in (lambda: core.list_namespaced_secret(containers), lambda: core.list_namespaced_pod(system),
                     lambda: core.list_pod_for_all_namespaces()):
            with pytest.raises(client.ApiException) as e:
                call()
            assert e.value.status == 403
