"""KubernetesBackend against the REAL kube-apiserver + etcd, with the real
kube-scheduler placing pods and KWOK playing the kubelet (see conftest.py).
What is checked is what the server stored and reported."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from orchestrator_service.backends.kubernetes import objects as o
from orchestrator_service.backends.kubernetes.backend import KubernetesBackend
from orchestrator_service.model import State
from sandhub.errors import BackendError, BackendUnavailable, InvalidField
from tests.kubernetes.control_plane import NODEGROUP, NODEGROUP_LABEL, NODEGROUP_TAINT, RUNTIME_CLASS, ControlPlane
from tests.kubernetes.helpers import AGENT_KEY, Recorder, k8s_config, make_spec, state_is, wait_for

pytestmark = pytest.mark.kubernetes


@pytest.fixture
async def backend(control_plane: ControlPlane, namespace: str) -> AsyncIterator[KubernetesBackend]:
    b = KubernetesBackend(k8s_config(control_plane.kubeconfig, namespace), notify=Recorder(), agent_key=AGENT_KEY)
    await b.start()
    yield b
    await b.close()


def recorder(b: KubernetesBackend) -> Recorder:
    notify = b._notify
    assert isinstance(notify, Recorder)
    return notify


def stored_pod(kube: client.ApiClient, namespace: str, name: str) -> client.V1Pod:
    return client.CoreV1Api(kube).read_namespaced_pod(name, namespace)


async def test_default_placement_runs_hardened_with_its_policy(
        backend: KubernetesBackend, kube: client.ApiClient, namespace: str) -> None:
    c = await backend.create(spec=make_spec(), container_id="cnt-default00001")
    # PENDING, or already RUNNING when the watch saw the pod start before the
    # create's answer was stored (a loaded machine): both are the contract.
    assert c.state in (State.PENDING, State.RUNNING) and c.backend == "kubernetes"
    running = await wait_for(backend, c.id, state_is(State.RUNNING))
    # Ready when this orchestrator saw it so, sub-second: never before the create
    # (the pod's own Ready stamp is whole seconds and could be).
    assert running.ready_time is not None and running.ready_time > running.create_time
    pod = stored_pod(kube, namespace, c.id)
    assert pod.spec.node_name == "kwok-general"  # the node group's taint keeps it off kwok-sandbox-1
    assert running.ip_address == pod.status.pod_ip and running.ip_address.startswith("127.244.")
    assert running.endpoints[0].address == f"{pod.status.pod_ip}:8000"
    sc = pod.spec.containers[0].security_context
    assert (sc.run_as_non_root, sc.allow_privilege_escalation, sc.capabilities.drop, sc.seccomp_profile.type,
            sc.read_only_root_filesystem) == (True, False, ["ALL"], "RuntimeDefault", True)
    assert pod.spec.automount_service_account_token is False and pod.spec.enable_service_links is False
    assert pod.spec.node_selector is None and pod.spec.runtime_class_name is None
    net = client.NetworkingV1Api(kube)
    baseline = net.read_namespaced_network_policy(o.BASELINE_POLICY, namespace)
    assert baseline.spec.policy_types == ["Ingress", "Egress"] and not baseline.spec.egress
    # The baseline's one opening: the Hub's pods to the agent port (stored as sent).
    [agent_rule] = baseline.spec.ingress
    assert [(p.port, p.protocol) for p in agent_rule.ports] == [(49983, "TCP")]
    assert [f.pod_selector.match_labels for f in agent_rule._from] == [{"app.kubernetes.io/name": "sandhub-hub"}]
    own = net.read_namespaced_network_policy(c.id, namespace)
    assert own.metadata.owner_references[0].uid == pod.metadata.uid
    assert [(p.port, p.protocol) for p in own.spec.ingress[0].ports] == [(8000, "TCP")]
    assert own.spec.ingress[0]._from[0].pod_selector.match_labels == {"app.kubernetes.io/name": "sandhub-hub"}
    assert not own.spec.egress  # egress stays denied for the default placement
    assert recorder(backend).states(c.id)[-1] is State.RUNNING  # told by the watch, not by polling


async def test_an_outdated_baseline_policy_is_brought_up_to_date(
        control_plane: ControlPlane, namespace: str, kube: client.ApiClient) -> None:
    """An installation from before the agent (its baseline admits nothing), or
    one whose agent port changed: the next start makes the baseline admit the
    Hub to the agent port, and nothing else."""
    net = client.NetworkingV1Api(kube)
    old = o.make_baseline_policy(k8s_config(control_plane.kubeconfig, namespace))
    old.spec.ingress = None
    net.create_namespaced_network_policy(namespace, old)
    for port in (49983, 40000):
        b = KubernetesBackend(k8s_config(control_plane.kubeconfig, namespace, agent_port=port), notify=Recorder(),
                              agent_key=AGENT_KEY)
        await b.start()
        await b.close()
        stored = net.read_namespaced_network_policy(o.BASELINE_POLICY, namespace)
        assert [[(p.port, p.protocol) for p in rule.ports] for rule in stored.spec.ingress] == [[(port, "TCP")]]
        assert stored.spec.ingress[0]._from[0].pod_selector.match_labels == {"app.kubernetes.io/name": "sandhub-hub"}
    same = net.read_namespaced_network_policy(o.BASELINE_POLICY, namespace).metadata.resource_version
    b = KubernetesBackend(k8s_config(control_plane.kubeconfig, namespace, agent_port=40000), notify=Recorder(),
                          agent_key=AGENT_KEY)
    await b.start()
    await b.close()
    assert net.read_namespaced_network_policy(o.BASELINE_POLICY, namespace).metadata.resource_version == same, \
        "an up-to-date baseline is left alone"


async def test_ec2_node_group_placement(backend: KubernetesBackend, kube: client.ApiClient, namespace: str) -> None:
    c = await backend.create(spec=make_spec(placement="ec2", ports=()), container_id="cnt-ec2000000001")
    await wait_for(backend, c.id, state_is(State.RUNNING))
    pod = stored_pod(kube, namespace, c.id)
    assert pod.spec.node_selector == {NODEGROUP_LABEL: NODEGROUP}
    assert [(t.key, t.operator, t.value, t.effect) for t in pod.spec.tolerations
            if t.key == NODEGROUP_TAINT] == [(NODEGROUP_TAINT, "Equal", NODEGROUP, "NoSchedule")]
    assert pod.spec.runtime_class_name == RUNTIME_CLASS
    assert pod.spec.node_name == "kwok-sandbox-1"  # placed by the real scheduler
    policy = client.NetworkingV1Api(kube).read_namespaced_network_policy(c.id, namespace)
    assert not policy.spec.ingress  # no ports: nothing admitted
    assert policy.spec.egress[0].to[0].ip_block.cidr == "0.0.0.0/0"
    assert "169.254.0.0/16" in policy.spec.egress[0].to[0].ip_block._except


async def test_fargate_profile_placement_is_labels(
        backend: KubernetesBackend, kube: client.ApiClient, namespace: str) -> None:
    c = await backend.create(spec=make_spec(placement="fargate"), container_id="cnt-fargate00001")
    await wait_for(backend, c.id, state_is(State.RUNNING))
    pod = stored_pod(kube, namespace, c.id)
    assert pod.metadata.labels["compute"] == "fargate" and pod.metadata.labels["app"] == "web"
    assert pod.spec.node_selector is None


async def test_delete_goes_terminating_then_terminated(
        backend: KubernetesBackend, kube: client.ApiClient, namespace: str) -> None:
    c = await backend.create(spec=make_spec(), container_id="cnt-delete000001")
    await wait_for(backend, c.id, state_is(State.RUNNING))
    deleting = await backend.delete(container_id=c.id, grace_period_s=5, reason="Deleted")
    assert deleting.state in (State.TERMINATING, State.TERMINATED)
    assert (await backend.delete(container_id=c.id, grace_period_s=5, reason="Deleted")).state in (
        State.TERMINATING, State.TERMINATED)  # idempotent
    done = await wait_for(backend, c.id, state_is(State.TERMINATED))
    assert done.state_reason == "Deleted" and done.ip_address == ""
    with pytest.raises(client.ApiException) as e:
        stored_pod(kube, namespace, c.id)
    assert e.value.status == 404
    with pytest.raises(client.ApiException) as e:
        client.NetworkingV1Api(kube).read_namespaced_network_policy(c.id, namespace)
    assert e.value.status == 404
    await backend.forget(container_id=c.id)
    assert c.id not in [x.id for x in await backend.list()]


async def test_restart_adopts_everything(control_plane: ControlPlane, namespace: str) -> None:
    config = k8s_config(control_plane.kubeconfig, namespace)
    first = KubernetesBackend(config, notify=Recorder(), agent_key=AGENT_KEY)
    await first.start()
    a = await first.create(spec=make_spec(tenant="Tenant One!", labels={"app": "a"}, request_id="r-1"),
                           container_id="cnt-adopt0000001")
    b = await first.create(spec=make_spec(placement="ec2", image="sandhub-test.invalid/no-such-image:1"),
                           container_id="cnt-adopt0000002")
    before_a = await wait_for(first, a.id, state_is(State.RUNNING))
    before_b = await wait_for(first, b.id, state_is(State.FAILED))
    await first.close()

    second = KubernetesBackend(config, notify=Recorder(), agent_key=AGENT_KEY)
    await second.start()
    try:
        assert {c.id: c for c in await second.list()} == {a.id: before_a, b.id: before_b}
        assert before_a.tenant == "Tenant One!" and before_a.request_id == "r-1"
    finally:
        await second.close()


@pytest.mark.parametrize("image, reason", [
    ("sandhub-test.invalid/no-such-image:1", "ImagePullBackOff"),
    ("sandhub-test.invalid/oom:1", "OOMKilled"),
    ("sandhub-test.invalid/evicted:1", "Evicted"),
])
async def test_failures_the_node_reports(backend: KubernetesBackend, image: str, reason: str) -> None:
    """KWOK plays these kubelet reports for special images (kwok_stages.yaml)."""
    c = await backend.create(spec=make_spec(image=image), container_id=f"cnt-fail{reason.lower()[:8]:0<8}")
    failed = await wait_for(backend, c.id, state_is(State.FAILED, State.RUNNING))
    assert (failed.state, failed.state_reason) == (State.FAILED, reason)
    assert failed.end_time is not None
    # Deleting a FAILED container ends it TERMINATED.
    await backend.delete(container_id=c.id, grace_period_s=0, reason="Deleted")
    await wait_for(backend, c.id, state_is(State.TERMINATED))


async def test_unschedulable_is_failed_by_the_real_scheduler(backend: KubernetesBackend) -> None:
    c = await backend.create(spec=make_spec(placement="nowhere"), container_id="cnt-nowhere00001")
    failed = await wait_for(backend, c.id, state_is(State.FAILED, State.RUNNING))
    assert (failed.state, failed.state_reason) == (State.FAILED, "Unschedulable")
    assert "node" in failed.state_message


async def test_expiry_moves_label_and_annotation(
        backend: KubernetesBackend, kube: client.ApiClient, namespace: str) -> None:
    c = await backend.create(spec=make_spec(), container_id="cnt-expiry000001")
    later = c.expire_time + timedelta(minutes=30)
    moved = await backend.set_expiry(container_id=c.id, expire_time=later)
    assert moved.expire_time == later
    pod = stored_pod(kube, namespace, c.id)
    assert pod.metadata.labels[o.LABEL_EXPIRES] == str(int(later.timestamp()))
    assert pod.metadata.annotations[o.ANN_EXPIRE_TIME] == later.isoformat()


async def test_labels_are_sanitized_or_refused(
        backend: KubernetesBackend, kube: client.ApiClient, namespace: str) -> None:
    c = await backend.create(spec=make_spec(tenant="ACME Corp / Team #1"), container_id="cnt-labels000001")
    pod = stored_pod(kube, namespace, c.id)
    assert pod.metadata.labels[o.LABEL_TENANT].startswith("acme-corp-team-1-")
    assert c.tenant == "ACME Corp / Team #1"
    with pytest.raises(InvalidField):
        await backend.create(spec=make_spec(labels={o.LABEL_MANAGED_BY: "me"}), container_id="cnt-labels000002")
    with pytest.raises(InvalidField):
        await backend.create(spec=make_spec(placement="fargate", labels={"compute": "ec2"}),
                             container_id="cnt-labels000003")


async def test_create_conflict_is_the_same_container_or_refused(
        backend: KubernetesBackend, kube: client.ApiClient, namespace: str) -> None:
    """409 on create: our own earlier attempt (answer lost) is taken as is;
    someone else's pod of that name is never adopted."""
    spec = make_spec()
    c = await backend.create(spec=spec, container_id="cnt-conflict0001")
    again = await backend.create(spec=spec, container_id="cnt-conflict0001")
    assert again.id == c.id and again.create_time == c.create_time
    with pytest.raises(BackendError):
        await backend.create(spec=make_spec(tenant="tenant-b"), container_id="cnt-conflict0001")


def count_writes(b: KubernetesBackend) -> dict[str, int]:
    """Counts, for one backend, the delete marks the API server accepted and
    the pod deletes asked for (every attempt, accepted or not)."""
    counts = {"mark": 0, "delete": 0}
    core = b.api.core
    patch, delete = core.patch_namespaced_pod, core.delete_namespaced_pod

    def counting_patch(name: str, namespace: str, body: Any, **kwargs: Any) -> Any:
        pod = patch(name, namespace, body, **kwargs)  # a 409 raises: not counted
        if o.ANN_DELETE_REASON in json.dumps(body, default=str):
            counts["mark"] += 1
        return pod

    def counting_delete(*args: Any, **kwargs: Any) -> Any:
        counts["delete"] += 1
        return delete(*args, **kwargs)

    core.patch_namespaced_pod = counting_patch
    core.delete_namespaced_pod = counting_delete
    return counts


async def test_two_orchestrators_delete_once(control_plane: ControlPlane, namespace: str,
                                             kube: client.ApiClient) -> None:
    config = k8s_config(control_plane.kubeconfig, namespace)
    one, two = KubernetesBackend(config, notify=Recorder(), agent_key=AGENT_KEY), KubernetesBackend(config, notify=Recorder(), agent_key=AGENT_KEY)
    await one.start()
    await two.start()
    try:
        c = await one.create(spec=make_spec(), container_id="cnt-twice0000001")
        await wait_for(one, c.id, state_is(State.RUNNING))
        await wait_for(two, c.id, state_is(State.RUNNING))
        for _ in range(100):  # the creator records the ready time (one patch) before we count
            if "sandhub.dev/ready-time" in (stored_pod(kube, namespace, c.id).metadata.annotations or {}):
                break
            await asyncio.sleep(0.05)
        writes = {"one": count_writes(one), "two": count_writes(two)}
        results = await asyncio.gather(
            one.delete(container_id=c.id, grace_period_s=1, reason="Expired"),
            two.delete(container_id=c.id, grace_period_s=1, reason="Deleted"),
        )
        assert all(r.state in (State.TERMINATING, State.TERMINATED) for r in results)
        ended = await wait_for(two, c.id, state_is(State.TERMINATED))
        assert ended.state_reason in ("Expired", "Deleted")
        # One mark won, and only its orchestrator deleted the pod (and the
        # policy): never two deletes. Counted by what was written, not by a
        # budget of API calls: retries and re-reads vary with the machine's load.
        marked = [name for name, w in writes.items() if w["mark"]]
        assert len(marked) == 1, writes
        assert sum(w["mark"] for w in writes.values()) == 1, writes
        loser = "two" if marked == ["one"] else "one"
        assert writes[marked[0]]["delete"] >= 1 and writes[loser]["delete"] == 0, writes
    finally:
        await one.close()
        await two.close()


async def test_unreachable_api_server_is_unavailable(tmp_path: Path, control_plane: ControlPlane) -> None:
    from tests.kubernetes.control_plane import free_port

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(control_plane.kubeconfig.read_text().replace(
        f"127.0.0.1:{control_plane.api_port}", f"127.0.0.1:{free_port()}"))
    b = KubernetesBackend(k8s_config(kubeconfig, "nowhere", retries=2, request_timeout_s=1), notify=Recorder(), agent_key=AGENT_KEY)
    with pytest.raises(BackendUnavailable):
        await b.start()
    await b.close()
