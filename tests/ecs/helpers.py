"""Builds the ECS backend against the tests' moto server, with a client
wrapper that records every call and can make ECS throttle."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import botocore.exceptions

from orchestrator_service.backends.ecs.backend import EcsBackend
from orchestrator_service.backends.ecs.client import EcsApi, new_ecs_client
from orchestrator_service.model import ContainerSpec, Event, Port, Resources
from sandhub import internal_auth
from sandhub.config import EcsBackendConfig, EcsPlacement, Limits
from tests.conftest import ORCHESTRATOR_TOKEN
from tests.ecs.moto_aws import CLUSTER, EC2_PROVIDER, REGION, Aws

AGENT_KEY = internal_auth.agent_key(ORCHESTRATOR_TOKEN)
PLACEMENTS = {"default": EcsPlacement("FARGATE"), "spot": EcsPlacement("FARGATE_SPOT"),
              "ec2": EcsPlacement(EC2_PROVIDER)}


def ecs_config(aws: Aws, **changes: Any) -> EcsBackendConfig:
    base: dict[str, Any] = dict(
        cluster=CLUSTER, region=REGION, endpoint_url=aws.endpoint, started_by="sandhub-test",
        subnets=(aws.subnet,), security_groups=(aws.security_group,), placements=PLACEMENTS,
        agent_image="sandhub/sandhub-agent:test", poll_interval_s=0.05, resync_interval_s=0.2,
        retry_backoff_s=0.01)
    base.update(changes)
    return EcsBackendConfig(**base)


class RecordingEcs:
    """The boto3 ECS client, recording each call (operation, arguments); an
    operation named in ``throttle`` answers ThrottlingException that many
    times first (as AWS does when an account goes over its rate), one named
    in ``instead`` answers that once instead of moto (raised if an error)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.throttle: dict[str, int] = {}
        self.instead: dict[str, Exception | dict[str, Any]] = {}
        self.list_page = 0
        """ListTasks pages of this many (moto answers all in one page): 0 = moto's."""
        self.provisioning = False
        """RunTask answers its tasks as PROVISIONING, as ECS does (moto: RUNNING at once)."""
        self.loopback = False
        """Task ENI addresses 10.b.c.d (moto's, whatever the subnet's CIDR) are
        answered as 127.b.c.d: an address of this host, where a test can start
        the task's agent (moto runs no containers)."""

    def _paged_list_tasks(self, **kwargs: Any) -> Any:
        start = int(kwargs.pop("nextToken", "0"))
        kwargs.pop("maxResults", None)
        arns = self._client.list_tasks(**kwargs)["taskArns"]
        end = start + self.list_page
        return {"taskArns": arns[start:end], **({"nextToken": str(end)} if end < len(arns) else {})}

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)
        if name == "list_tasks" and self.list_page:
            method = functools.partial(self._paged_list_tasks)
            method.__name__ = name  # type: ignore[attr-defined]

        @functools.wraps(method)
        def call(**kwargs: Any) -> Any:
            self.calls.append((name, kwargs))
            if self.throttle.get(name, 0) > 0:
                self.throttle[name] -= 1
                raise refusal(name, "ThrottlingException", "Rate exceeded")
            if name in self.instead:
                answer = self.instead.pop(name)
                if isinstance(answer, Exception):
                    raise answer
                return answer
            answer = method(**kwargs)
            if name == "run_task" and self.provisioning:
                for task in answer["tasks"]:
                    task["lastStatus"] = "PROVISIONING"
            if self.loopback:
                for task in answer.get("tasks") or ([answer["task"]] if "task" in answer else []):
                    _loopback_ip(task)
            return answer

        return call

    def called(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for op, kwargs in self.calls if op == name]


def refusal(operation: str, code: str, message: str) -> botocore.exceptions.ClientError:
    """An AWS error answer, as boto3 raises it."""
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": message}}, operation)


def _loopback_ip(task: dict[str, Any]) -> None:
    for attachment in task.get("attachments") or ():
        for detail in attachment.get("details") or ():
            value = str(detail.get("value") or "")
            if detail.get("name") == "privateIPv4Address" and value.startswith("10."):
                detail["value"] = "127." + value[len("10."):]


def make_backend(aws: Aws, *, limits: Limits | None = None, events: list[Event] | None = None,
                 **changes: Any) -> tuple[EcsBackend, RecordingEcs]:
    config = ecs_config(aws, **changes)
    recording = RecordingEcs(new_ecs_client(config))
    backend = EcsBackend(config, notify=(events.append if events is not None else lambda e: None),
                         placements=tuple(PLACEMENTS), limits=limits, api=EcsApi(config, recording),
                         agent_key=AGENT_KEY)
    return backend, recording


def spec(**changes: Any) -> ContainerSpec:
    base: dict[str, Any] = dict(
        tenant="tenant-a", image="python:3.13-slim",
        resources=Resources(cpu_millicores=1000, memory_mib=2048, pids=256, disk_mib=1024, open_files=1024),
        env={"GREETING": "hello"}, labels={"app": "web", "course": "cs101"}, ttl_s=3600.0,
        ports=(Port(8000, "TCP", "http"),), placement="default", request_id="")
    base.update(changes)
    return ContainerSpec(**base)
