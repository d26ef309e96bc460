"""Task definitions: built without I/O, registered once per content, reused.

A container's task definition depends only on what a create asks for that
ECS fixes at registration (image, size, ports, capacity kind) and on the
installation (agent image and port, roles, logs). Its family name is a hash
of that content, so the same request always maps to the same family: the
first create registers it, every later one (in this process or any other,
before or after a restart) finds it with DescribeTaskDefinition. What varies
per container (its id, environment, tags) goes into RunTask instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import botocore.exceptions

from orchestrator_service.backends import cluster_agent as agent
from orchestrator_service.backends.ecs import tags as t
from orchestrator_service.backends.ecs.client import EcsApi, error_code
from orchestrator_service.model import Port
from sandhub.config import EcsBackendConfig

MAIN = "main"
"""The container running the caller's image (the agent is its command)."""
AGENT_INIT = "sandhub-agent-init"
"""The non-essential init container that copies the agent into the task volume."""
AGENT_VOLUME = "sandhub-agent"
STATE_VOLUME = "sandhub-agent-state"
"""The agent's state directory (background processes' rings), on the task's ephemeral storage."""
WORK_VOLUME = "sandhub-work"
WORK_DIR = "/work"
"""The agent's default cwd and base of relative paths (most images have no /work)."""
AGENT_DIR = agent.AGENT_DIR
AGENT_PATH = agent.AGENT_PATH
INIT_MEMORY_MIB = 32
"""Memory the init container may use (a copy of one file); the main
container gets the rest of the task."""
FAMILY_PREFIX = "sandhub-"


@dataclass(frozen=True)
class TaskShape:
    """What one task definition is made of."""

    image: str
    cpu_units: int
    memory_mib: int
    ports: tuple[Port, ...]
    fargate: bool


def make_task_definition(shape: TaskShape, config: EcsBackendConfig) -> dict[str, Any]:
    """RegisterTaskDefinition's arguments, family and tags excepted."""
    main: dict[str, Any] = {
        "name": MAIN,
        "image": shape.image,
        "essential": True,
        # The agent is pid 1 of the main container: it starts and supervises
        # everything that runs there (exec, files, background processes).
        # The container id comes per task in RunTask's environment overrides
        # (SANDHUB_CONTAINER_ID): this definition is shared. The token does
        # too, but to the init container only, which leaves it in a file
        # (--token-file) the agent deletes: never in this container's environment.
        "entryPoint": [AGENT_PATH],
        "command": agent.listen_arguments(config.agent_port),
        "dependsOn": [{"containerName": AGENT_INIT, "condition": "COMPLETE"}],
        "mountPoints": [{"sourceVolume": AGENT_VOLUME, "containerPath": AGENT_DIR, "readOnly": True},
                        {"sourceVolume": STATE_VOLUME, "containerPath": agent.STATE_DIR, "readOnly": False},
                        {"sourceVolume": WORK_VOLUME, "containerPath": WORK_DIR, "readOnly": False}],
        "portMappings": [{"containerPort": config.agent_port, "protocol": "tcp"}] + [
            {"containerPort": p.port, "protocol": p.protocol.lower()} for p in shape.ports
            if p.port != config.agent_port],
        # Hard limit at the task's size; the init container's share reserved apart.
        "memory": shape.memory_mib,
        "memoryReservation": shape.memory_mib - INIT_MEMORY_MIB,
        "user": config.run_as_user,
        "linuxParameters": {"capabilities": {"drop": ["ALL"]}},
    }
    init: dict[str, Any] = {
        "name": AGENT_INIT,
        "image": config.agent_image,
        "essential": False,
        # The agent copies itself into the task volume (its image holds
        # nothing else, not even a shell), writes its token file and, as
        # root, hands the main container's writable volumes (and that file)
        # to its user: ECS bind mounts start root:root 0755, which the main
        # container could not write.
        "command": agent.install_command(owner=int(config.run_as_user), directories=(agent.STATE_DIR, WORK_DIR)),
        "user": "0",
        "mountPoints": [{"sourceVolume": AGENT_VOLUME, "containerPath": AGENT_DIR, "readOnly": False},
                        {"sourceVolume": STATE_VOLUME, "containerPath": agent.STATE_DIR, "readOnly": False},
                        {"sourceVolume": WORK_VOLUME, "containerPath": WORK_DIR, "readOnly": False}],
        "memory": INIT_MEMORY_MIB,
    }
    if config.log_group:
        for c, prefix in ((main, "main"), (init, "agent-init")):
            c["logConfiguration"] = {"logDriver": "awslogs", "options": {
                "awslogs-group": config.log_group, "awslogs-region": config.region or "us-east-1",
                "awslogs-stream-prefix": prefix}}
    definition: dict[str, Any] = {
        "networkMode": "awsvpc",
        "requiresCompatibilities": ["FARGATE" if shape.fargate else "EC2"],
        "cpu": str(shape.cpu_units),
        "memory": str(shape.memory_mib),
        "volumes": [{"name": AGENT_VOLUME}, {"name": STATE_VOLUME}, {"name": WORK_VOLUME}],
        "containerDefinitions": [init, main],
    }
    if config.execution_role_arn:
        definition["executionRoleArn"] = config.execution_role_arn
    # No taskRoleArn: code in a sandbox gets no AWS credentials.
    return definition


def content_hash(definition: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def family_name(definition: dict[str, Any]) -> str:
    """"sandhub-" + 40 hex digits of the content hash (families take 255 characters)."""
    return FAMILY_PREFIX + content_hash(definition)[:40]


class TaskDefinitions:
    """Task definition ARNs by family, looked up before registering, cached."""

    def __init__(self, api: EcsApi, config: EcsBackendConfig) -> None:
        self._api = api
        self._config = config
        self._arns: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.registered = 0
        """Task definitions this process registered (the rest it found)."""

    async def arn_for(self, shape: TaskShape) -> str:
        definition = make_task_definition(shape, self._config)
        family = family_name(definition)
        known = self._arns.get(family)
        if known is not None:
            return known
        async with self._locks.setdefault(family, asyncio.Lock()):
            if family not in self._arns:
                self._arns[family] = await self._find(family) or await self._register(family, definition)
        return self._arns[family]

    async def _find(self, family: str) -> str | None:
        try:
            found = await self._api.call(self._api.ecs.describe_task_definition, taskDefinition=family)
        except botocore.exceptions.ClientError as e:
            if error_code(e) in ("ClientException", "TaskDefinitionNotFoundException"):
                return None  # not registered yet
            raise
        definition = found["taskDefinition"]
        return str(definition["taskDefinitionArn"]) if definition.get("status") == "ACTIVE" else None

    async def _register(self, family: str, definition: dict[str, Any]) -> str:
        registered = await self._api.call(
            self._api.ecs.register_task_definition, family=family, **definition,
            tags=t.to_aws({t.MANAGED_BY: "sandhub", t.TASK_DEFINITION_HASH: family[len(FAMILY_PREFIX):]}))
        self.registered += 1
        return str(registered["taskDefinition"]["taskDefinitionArn"])
