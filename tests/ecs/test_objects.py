"""The ECS backend's pure pieces, no I/O: Fargate sizes, the task definition
(against a literal), tags, the status mapping and the token bucket."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from orchestrator_service.backends.ecs import tags as t
from orchestrator_service.backends.ecs.limiter import Bucket
from orchestrator_service.backends.ecs.sizes import TaskSize, fargate_size
from orchestrator_service.backends.ecs.status import classify, read_container
from orchestrator_service.backends.ecs.taskdefs import TaskShape, family_name, make_task_definition
from orchestrator_service.model import Port, State
from sandhub.config import EcsBackendConfig
from sandhub.errors import InvalidField
from tests.ecs.helpers import spec


@pytest.mark.parametrize(("cpu", "memory", "size"), [
    (100, 128, TaskSize(256, 512)),
    (250, 2048, TaskSize(256, 2048)),
    (250, 2049, TaskSize(512, 3072)),
    (1000, 512, TaskSize(1024, 2048)),
    (1000, 8192, TaskSize(1024, 8192)),
    (1001, 512, TaskSize(2048, 4096)),
    (4000, 16384, TaskSize(4096, 16384)),
    (8000, 512, TaskSize(8192, 16384)),
])
def test_fargate_sizes(cpu: int, memory: int, size: TaskSize) -> None:
    assert fargate_size(cpu, memory, max_cpu_millicores=16000, max_memory_mib=122880) == size


def test_impossible_size_names_the_field_and_nearest_pairs() -> None:
    with pytest.raises(InvalidField) as e:
        fargate_size(250, 4096, max_cpu_millicores=250, max_memory_mib=16384)
    assert e.value.field == "resources.memory_mib"
    assert e.value.message.endswith("nearest sizes (cpu/memory): 250m/2048MiB, 250m/1024MiB, 250m/512MiB")


def test_task_definition_literal() -> None:
    config = EcsBackendConfig(agent_image="agent:1", agent_port=49983, execution_role_arn="arn:role/x")
    definition = make_task_definition(TaskShape("python:3.13", 1024, 2048, (Port(8000), Port(53, "UDP")), True),
                                      config)
    assert definition == {
        "networkMode": "awsvpc",
        "requiresCompatibilities": ["FARGATE"],
        "cpu": "1024",
        "memory": "2048",
        "volumes": [{"name": "sandhub-agent"}, {"name": "sandhub-agent-state"}, {"name": "sandhub-work"}],
        "executionRoleArn": "arn:role/x",
        "containerDefinitions": [
            {"name": "sandhub-agent-init", "image": "agent:1", "essential": False,
             "command": ["/sandhub-agent", "install", "--chown", "65532:65532", "--token-env", "SANDHUB_AGENT_TOKEN",
                         "--token-file", "/run/sandhub/agent-token", "/sandhub/sandhub-agent", "/run/sandhub", "/work"],
             "user": "0",
             "mountPoints": [{"sourceVolume": "sandhub-agent", "containerPath": "/sandhub", "readOnly": False},
                             {"sourceVolume": "sandhub-agent-state", "containerPath": "/run/sandhub",
                              "readOnly": False},
                             {"sourceVolume": "sandhub-work", "containerPath": "/work", "readOnly": False}],
             "memory": 32},
            {"name": "main", "image": "python:3.13", "essential": True,
             "entryPoint": ["/sandhub/sandhub-agent"],
             "command": ["--listen", "tcp:0.0.0.0:49983", "--state-dir", "/run/sandhub",
                         "--token-file", "/run/sandhub/agent-token"],
             "dependsOn": [{"containerName": "sandhub-agent-init", "condition": "COMPLETE"}],
             "mountPoints": [{"sourceVolume": "sandhub-agent", "containerPath": "/sandhub", "readOnly": True},
                             {"sourceVolume": "sandhub-agent-state", "containerPath": "/run/sandhub",
                              "readOnly": False},
                             {"sourceVolume": "sandhub-work", "containerPath": "/work", "readOnly": False}],
             "portMappings": [{"containerPort": 49983, "protocol": "tcp"}, {"containerPort": 8000, "protocol": "tcp"},
                              {"containerPort": 53, "protocol": "udp"}],
             "memory": 2048, "memoryReservation": 2016, "user": "65532",
             "linuxParameters": {"capabilities": {"drop": ["ALL"]}}},
        ],
    }
    same = make_task_definition(TaskShape("python:3.13", 1024, 2048, (Port(8000), Port(53, "UDP")), True), config)
    other = make_task_definition(TaskShape("python:3.13", 1024, 3072, (Port(8000), Port(53, "UDP")), True), config)
    assert family_name(definition) == family_name(same) != family_name(other)
    assert family_name(definition).startswith("sandhub-") and len(family_name(definition)) == 48


def test_tags_round_trip_through_a_task() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
    s = spec(request_id="a request, with {odd} chars", tenant="tenant-a")
    tags = t.make_tags(s, container_id="cnt-aaaaaaaaaaaa", image=s.image, resources=s.resources,
                       create_time=now, expire_time=now)
    assert all(len(k) <= t.MAX_KEY and len(v) <= t.MAX_VALUE for k, v in tags.items())
    task = {"taskArn": "arn:task/x", "lastStatus": "RUNNING", "desiredStatus": "RUNNING", "tags": t.to_aws(tags),
            "attachments": [{"type": "ElasticNetworkInterface", "details": [
                {"name": "privateIPv4Address", "value": "10.0.0.7"}]}],
            "overrides": {"containerOverrides": [{"name": "main", "environment": [
                {"name": "GREETING", "value": "hello"}]}]}}
    c = read_container(task, backend="ecs", now=now)
    assert (c.id, c.tenant, c.request_id, c.labels, c.env, c.resources, c.ports, c.ip_address, c.state) == (
        "cnt-aaaaaaaaaaaa", "tenant-a", "a request, with {odd} chars", s.labels, {"GREETING": "hello"},
        s.resources, s.ports, "10.0.0.7", State.RUNNING)


@pytest.mark.parametrize(("task", "state", "reason"), [
    ({"lastStatus": "PROVISIONING", "desiredStatus": "RUNNING"}, State.PENDING, "PROVISIONING"),
    ({"lastStatus": "RUNNING", "desiredStatus": "RUNNING"}, State.PENDING, "RUNNING"),  # no IP yet
    ({"lastStatus": "RUNNING", "desiredStatus": "STOPPED", "stoppedReason": "sandhub: Expired"},
     State.TERMINATING, "Expired"),
    ({"lastStatus": "STOPPED", "desiredStatus": "STOPPED", "stoppedReason": "sandhub: Deleted"},
     State.TERMINATED, "Deleted"),
    ({"lastStatus": "STOPPED", "desiredStatus": "STOPPED", "stopCode": "TaskFailedToStart",
      "stoppedReason": "CannotPullContainerError: pull access denied"}, State.FAILED, "ImagePullFailed"),
    ({"lastStatus": "STOPPING", "desiredStatus": "STOPPED", "stopCode": "SpotInterruption",
      "stoppedReason": "Your Spot Task was interrupted."}, State.FAILED, "SpotInterruption"),
    ({"lastStatus": "STOPPED", "desiredStatus": "STOPPED", "stopCode": "EssentialContainerExited",
      "containers": [{"name": "main", "reason": "OutOfMemoryError: Container killed due to memory usage"}]},
     State.FAILED, "OOMKilled"),
    ({"lastStatus": "STOPPED", "desiredStatus": "STOPPED", "stopCode": "EssentialContainerExited",
      "containers": [{"name": "main", "exitCode": 3}]}, State.FAILED, "EssentialContainerExited"),
])
def test_status_mapping(task: dict[str, object], state: State, reason: str) -> None:
    status = classify(task)
    assert (status.state, status.reason) == (state, reason)
    if state is State.FAILED:
        assert status.message


def test_bucket_bursts_then_paces_in_arrival_order() -> None:
    now = [0.0]
    bucket = Bucket(rate_per_s=20, burst=100, clock=lambda: now[0])
    waits = [bucket.reserve(10) for _ in range(12)]
    assert waits[:10] == [0.0] * 10 and waits[10:] == [0.5, 1.0]
    now[0] = 10.0  # idle long enough: full again, never above the burst
    assert bucket.reserve(100) == 0.0 and bucket.reserve(1) == pytest.approx(0.05)


def test_spot_launches_have_their_own_bucket_and_ec2_none() -> None:
    from orchestrator_service.backends.ecs.limiter import Limiter

    limiter = Limiter(call_rates={}, default_rate=(20.0, 50), launch_rate=(20.0, 100))
    on_demand, spot = limiter.launches("FARGATE"), limiter.launches("FARGATE_SPOT")
    assert on_demand is not None and spot is not None and on_demand is not spot
    assert on_demand.reserve(100) == 0.0 and spot.reserve(100) == 0.0, "a full burst each"
    assert limiter.launches("sandbox-asg") is None
    assert limiter.call("describe_tasks") is not limiter.call("list_tasks"), "each operation its own bucket"
