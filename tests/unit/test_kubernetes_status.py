"""Reading a Container back from a pod (no API server): the pod built by
make_pod round-trips, and the statuses a kubelet or the scheduler reports map
to the states and reasons callers see."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from kubernetes import client

from orchestrator_service.backends.kubernetes import objects as o
from orchestrator_service.backends.kubernetes.status import classify, read_container
from orchestrator_service.model import Endpoint, Port, State
from tests.unit.test_kubernetes_objects import AGENT_KEY, CID, CONFIG, T0, spec

NOW = T0 + timedelta(seconds=30)


def pod(status: client.V1PodStatus | None = None, deleting: bool = False) -> client.V1Pod:
    p = o.make_pod(spec(), container_id=CID, config=CONFIG, create_time=T0, expire_time=T0 + timedelta(hours=1),
                   agent_key=AGENT_KEY)
    p.status = status or client.V1PodStatus(phase="Pending")
    p.metadata.resource_version = "7"
    if deleting:
        p.metadata.deletion_timestamp = NOW
    return p


def main(state: client.V1ContainerState, ready: bool = False) -> list[client.V1ContainerStatus]:
    return [client.V1ContainerStatus(name="main", image="x", image_id="", ready=ready, restart_count=0, state=state)]


def running(ip: str = "10.244.0.5") -> client.V1PodStatus:
    return client.V1PodStatus(
        phase="Running", pod_ip=ip,
        conditions=[client.V1PodCondition(type="Ready", status="True", last_transition_time=T0 + timedelta(seconds=2))],
        container_statuses=main(client.V1ContainerState(running=client.V1ContainerStateRunning(started_at=T0)),
                                ready=True),
    )


def test_running_pod_round_trips_to_the_container_that_was_asked_for() -> None:
    c = read_container(pod(running()), backend="kubernetes", now=NOW)
    s = spec()
    assert (c.id, c.tenant, c.image, c.resources, c.env, c.labels, c.ports, c.placement, c.request_id) == (
        CID, s.tenant, s.image, s.resources, s.env, s.labels, s.ports, s.placement, s.request_id)
    assert c.state is State.RUNNING and c.ip_address == "10.244.0.5"
    assert c.endpoints == (Endpoint(name="http", port=8000, protocol="TCP", address="10.244.0.5:8000"),)
    assert c.create_time == T0 and c.expire_time == T0 + timedelta(hours=1)
    assert c.ready_time == T0 + timedelta(seconds=2)
    assert c.ports == (Port(8000, "TCP", "http"),)


def waiting(reason: str, message: str = "") -> client.V1PodStatus:
    return client.V1PodStatus(phase="Pending", container_statuses=main(
        client.V1ContainerState(waiting=client.V1ContainerStateWaiting(reason=reason, message=message))))


@pytest.mark.parametrize("status, state, reason", [
    (client.V1PodStatus(phase="Pending"), State.PENDING, ""),
    (waiting("ContainerCreating"), State.PENDING, "ContainerCreating"),
    (waiting("ImagePullBackOff", "Back-off pulling image"), State.FAILED, "ImagePullBackOff"),
    (waiting("ErrImagePull"), State.FAILED, "ErrImagePull"),
    (waiting("CreateContainerConfigError"), State.FAILED, "CreateContainerConfigError"),
    (client.V1PodStatus(phase="Failed", container_statuses=main(client.V1ContainerState(
        terminated=client.V1ContainerStateTerminated(exit_code=137, reason="OOMKilled", finished_at=NOW)))),
     State.FAILED, "OOMKilled"),
    (client.V1PodStatus(phase="Failed", reason="Evicted", message="The node was low on resource: memory."),
     State.FAILED, "Evicted"),
    (client.V1PodStatus(phase="Succeeded"), State.FAILED, "ProcessExited"),
    (client.V1PodStatus(phase="Running", pod_ip="10.0.0.1", container_statuses=main(client.V1ContainerState(
        terminated=client.V1ContainerStateTerminated(exit_code=1, reason="Error")))), State.FAILED, "Error"),
    (client.V1PodStatus(phase="Running", pod_ip="", container_statuses=main(
        client.V1ContainerState(running=client.V1ContainerStateRunning()), ready=True)), State.PENDING, ""),
])
def test_cluster_reports_become_states(status: client.V1PodStatus, state: State, reason: str) -> None:
    got = classify(pod(status), now=NOW)
    assert (got.state, got.reason) == (state, reason)


def unschedulable(since: datetime) -> client.V1PodStatus:
    return client.V1PodStatus(phase="Pending", conditions=[client.V1PodCondition(
        type="PodScheduled", status="False", reason="Unschedulable", last_transition_time=since,
        message="0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.")])


def test_unschedulable_fails_at_once_or_after_its_timeout() -> None:
    assert classify(pod(unschedulable(NOW)), now=NOW).state is State.FAILED
    waiting_ = classify(pod(unschedulable(NOW)), now=NOW, unschedulable_timeout_s=60)
    assert (waiting_.state, waiting_.reason) == (State.PENDING, "Unschedulable")
    late = classify(pod(unschedulable(NOW)), now=NOW + timedelta(seconds=61), unschedulable_timeout_s=60)
    assert (late.state, late.reason) == (State.FAILED, "Unschedulable")
    assert "node affinity/selector" in late.message


def test_deleting_pod_is_terminating_with_the_stored_reason() -> None:
    p = pod(running(), deleting=True)
    assert classify(p, now=NOW).reason == "Deleted"
    p.metadata.annotations[o.ANN_DELETE_REASON] = "Expired"
    assert (classify(p, now=NOW).state, classify(p, now=NOW).reason) == (State.TERMINATING, "Expired")


def test_failed_end_time_comes_from_the_pod_not_the_clock() -> None:
    """The reaper forgets FAILED containers a while after end_time: it must
    not move forward on every read."""
    p = pod(waiting("ImagePullBackOff"))
    first = read_container(p, backend="kubernetes", now=NOW).end_time
    later = read_container(p, backend="kubernetes", now=NOW + timedelta(hours=1)).end_time
    assert first == later is not None


def agent_install(state: client.V1ContainerState) -> client.V1PodStatus:
    return client.V1PodStatus(phase="Pending", init_container_statuses=[client.V1ContainerStatus(
        name="sandhub-agent-install", image="agent", image_id="", ready=False, restart_count=0, state=state)])


def test_an_agent_image_that_cannot_be_pulled_fails_the_container() -> None:
    got = classify(pod(agent_install(client.V1ContainerState(waiting=client.V1ContainerStateWaiting(
        reason="ImagePullBackOff", message='Back-off pulling image "agent"')))), now=NOW)
    assert (got.state, got.reason) == (State.FAILED, "ImagePullBackOff")
    assert got.message == 'the exec agent\'s image: Back-off pulling image "agent"'


def test_a_failed_agent_install_fails_the_container_with_its_exit_code() -> None:
    status = agent_install(client.V1ContainerState(terminated=client.V1ContainerStateTerminated(
        exit_code=2, reason="Error", finished_at=NOW)))
    status.phase = "Failed"
    got = classify(pod(status), now=NOW)
    assert (got.state, got.reason) == (State.FAILED, "AgentInstallFailed")
    assert got.message == "installing the exec agent failed with exit code 2: Error"


def test_a_running_pod_with_a_completed_agent_install_is_running() -> None:
    status = running()
    status.init_container_statuses = agent_install(client.V1ContainerState(
        terminated=client.V1ContainerStateTerminated(exit_code=0, reason="Completed", finished_at=T0))
    ).init_container_statuses
    assert classify(pod(status), now=NOW).state is State.RUNNING


def test_the_agent_token_is_not_the_callers_env() -> None:
    c = read_container(pod(running()), backend="kubernetes", now=NOW)
    assert "SANDHUB_AGENT_TOKEN" not in c.env and "SANDHUB_CONTAINER_ID" not in c.env
