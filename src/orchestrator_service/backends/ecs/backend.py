"""EcsBackend: a container is an ECS task; its tags are the record.

Each create is one RunTask call with all the task's tags on it, within
ECS's rates (launcher.py). One loop (poller.py) describes every task that is
settling, 100 per call, and every live task now and then (stops ECS makes
itself: Spot interruptions, OOM, lost hosts); each change goes to
``notify``. A restart lists the tasks carrying this installation's startedBy
and reads every container back from their tags, and each resync does the
same for tasks it doesn't know: a task whose RunTask answer never reached
its create (a timeout, a stop in between) is a container all the same, and
expires at its time. Deleted tasks stay describable for about an hour in
ECS, so TERMINATED containers survive a restart too.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import botocore.exceptions
import structlog

from orchestrator_service.backends import cluster_agent as agent
from orchestrator_service.backends.base import Notify
from orchestrator_service.backends.ecs import tags as t
from orchestrator_service.backends.ecs.client import EcsApi, error_code, new_ecs_client
from orchestrator_service.backends.ecs.launcher import Launch, Launcher
from orchestrator_service.backends.ecs.poller import Poller
from orchestrator_service.backends.ecs.sizes import TaskSize, fargate_size, to_units
from orchestrator_service.backends.ecs.status import STOP_PREFIX, read_container
from orchestrator_service.backends.ecs.taskdefs import TaskDefinitions, TaskShape
from orchestrator_service.model import Container, ContainerSpec, Event, EventType, State, utcnow
from sandhub.config import EcsBackendConfig, EcsPlacement, Limits
from sandhub.errors import BackendError, ContainerNotFound, InvalidField, UnknownImage

log = structlog.get_logger("sandhub.ecs")
NAME = "ecs"
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
MAX_IMAGE = 255
"""Longest image reference: it is kept in a tag (256 characters at most)."""
MAX_ENV_BYTES = 6144
"""The caller's environment travels in RunTask's overrides, which ECS caps at
8 KiB in all; the rest is for sandhub's own variables."""


def init_environment(agent_key: bytes, container_id: str) -> dict[str, str]:
    """The agent's credential, in RunTask's overrides of the init container
    (which writes it to a file for the agent: cluster_agent.TOKEN_FILE).
    ECS applies a call's overrides to every task it starts, so each task is
    a RunTask call of its own. Kept so on purpose (a shared token would open
    every task's agent to any one task's owner who reads it); the rates
    allow it: RunTask's 20 calls/s equals Fargate's sustained 20 launches/s,
    so only the first 100-task burst is slower (`sandhub bench ecs-burst`)."""
    return agent.init_environment(agent_key, container_id)


class EcsBackend:
    name = NAME

    def __init__(self, config: EcsBackendConfig, *, notify: Notify, agent_key: bytes,
                 placements: tuple[str, ...] = (), limits: Limits | None = None, api: EcsApi | None = None) -> None:
        """``agent_key``: internal_auth.agent_key(the Orchestrator token); each
        task's agent gets its own credential derived from it."""
        self._config = config
        self._agent_key = agent_key
        self._notify = notify
        self._placements = placements or tuple(config.placements)
        self._limits = limits or Limits()
        self._api = api
        self._tasks: dict[str, dict[str, Any]] = {}
        """Container id -> its task as last described (tags merged in)."""
        self._containers: dict[str, Container] = {}
        self._tombstones: dict[str, Container] = {}
        """Containers whose task ECS no longer reports (or that were forgotten-on-delete)."""
        self._forgotten: set[str] = set()
        """Task ARNs forgotten in this process: a resync must not bring them back."""
        self._ready_seen: dict[str, datetime] = {}
        self._deleting: set[str] = set()
        self._taskdefs: TaskDefinitions | None = None
        self._launcher: Launcher | None = None
        self._poller: Poller | None = None

    @property
    def api(self) -> EcsApi:
        assert self._api is not None, "EcsBackend.start() was not called"
        return self._api

    @property
    def launcher(self) -> Launcher:
        assert self._launcher is not None, "EcsBackend.start() was not called"
        return self._launcher

    # -- start and stop ----------------------------------------------------------------

    async def start(self) -> None:
        missing = [p for p in self._placements if p not in self._config.placements]
        if missing:
            raise ValueError(f"placements {', '.join(missing)} have no ECS placement profile (SANDHUB_ECS_PLACEMENTS)")
        if self._api is None:
            self._api = EcsApi(self._config, await asyncio.to_thread(new_ecs_client, self._config))
        await self._check_cluster()
        self._taskdefs = TaskDefinitions(self.api, self._config)
        self._launcher = Launcher(self.api, cluster=self._config.cluster, started_by=self._config.started_by,
                                  assign_public_ip=self._config.assign_public_ip)
        self._poller = Poller(self.api, cluster=self._config.cluster, on_task=self._store, on_missing=self._gone,
                              interval_s=self._config.poll_interval_s, resync_s=self._config.resync_interval_s,
                              watched=self._watched, started_by=self._config.started_by, ignored=self._ignored)
        await self._adopt()
        self._poller.start()
        log.info("ecs.started", **self.status(), containers=len(self._containers))

    async def _check_cluster(self) -> None:
        answer = await self.api.call(self.api.ecs.describe_clusters, clusters=[self._config.cluster])
        clusters = [c for c in answer.get("clusters") or () if c.get("status") == "ACTIVE"]
        if not clusters:
            raise ValueError(f"SANDHUB_ECS_CLUSTER: no active ECS cluster {self._config.cluster!r}")
        attached = set(clusters[0].get("capacityProviders") or ())
        wanted = {self._config.placements[p].capacity_provider for p in self._placements}
        if attached and wanted - attached:
            raise ValueError(f"SANDHUB_ECS_PLACEMENTS: capacity providers {', '.join(sorted(wanted - attached))} "
                             f"are not attached to cluster {self._config.cluster!r}")

    async def _adopt(self) -> None:
        """Reads back every container from the tasks carrying our startedBy."""
        assert self._poller is not None
        # Running tasks by startedBy; stopped ones (deleted or failed, kept by
        # ECS for about an hour) can't be filtered by it: described, then sorted out.
        running = await self._poller.list_tasks(started_by=self._config.started_by)
        stopped = await self._poller.list_tasks(desired_status="STOPPED")
        for task in await self._poller.describe(list(dict.fromkeys(running + stopped))):
            # RunTask tags a task as it starts it: one without a container id is not sandhub's.
            if task.get("startedBy") == self._config.started_by and t.CONTAINER_ID in t.from_aws(task.get("tags")):
                self._store(task)

    async def close(self) -> None:
        if self._poller is not None:
            await self._poller.close()
        if self._launcher is not None:
            await self._launcher.close()

    def status(self) -> dict[str, str]:
        return {
            "backend": NAME,
            "cluster": self._config.cluster,
            "placements": ", ".join(f"{p}={self._config.placements[p].capacity_provider}"
                                    for p in self._placements if p in self._config.placements),
            "network": "awsvpc, public IP " + ("on" if self._config.assign_public_ip else "off")
                       + f", security groups {', '.join(self._config.security_groups) or '(per placement)'}",
            "hardening": "non-root user, all capabilities dropped, no task role, ECS Exec off",
            "limits": "cpu and memory (Fargate sizes); pids, disk and open files are the platform's",
        }

    def agent_target(self, container: Container) -> str:
        """The task ENI's private IP and the agent port."""
        return agent.tcp_target(container.ip_address, self._config.agent_port, container.id)

    def validate_image(self, image: str) -> None:
        if image and (len(image) > MAX_IMAGE or not _IMAGE.match(image) or "//" in image):
            raise UnknownImage(image, f": not an image reference like registry/name:tag of at most {MAX_IMAGE} characters")

    # -- the view ------------------------------------------------------------------------

    def _watched(self) -> tuple[list[str], list[str]]:
        """(task ARNs settling, task ARNs alive) for the poller."""
        settling, alive = [], []
        for cid, c in self._containers.items():
            arn = str(self._tasks[cid]["taskArn"])
            if c.state in (State.PENDING, State.TERMINATING):
                settling.append(arn)
            elif c.state is State.RUNNING:
                alive.append(arn)
        return settling, alive

    def _ignored(self) -> set[str]:
        """Task ARNs a resync needn't describe: every one it knows, and the forgotten."""
        return {str(task["taskArn"]) for task in self._tasks.values()} | self._forgotten

    def _store(self, task: dict[str, Any]) -> Container | None:
        arn = str(task.get("taskArn", ""))
        if arn in self._forgotten:
            return None
        tags = t.from_aws(task.get("tags"))
        cid = tags.get(t.CONTAINER_ID, "")
        old = self._tasks.get(cid)
        if not cid:
            # DescribeTasks without tags (StopTask's answer): keep the tags we know.
            cid = next((c for c, known in self._tasks.items() if known.get("taskArn") == arn), "")
            if not cid:
                return None
            old = self._tasks[cid]
            task = {**task, "tags": old.get("tags")}
        elif old is not None:
            task = {**task, "tags": t.to_aws({**t.from_aws(old.get("tags")), **tags})}
        self._tasks[cid] = task
        previous = self._containers.get(cid)
        container = read_container(task, backend=NAME, now=utcnow(), ready_seen=self._ready_seen.get(cid))
        if container.state is State.RUNNING and previous is not None and previous.state is State.PENDING \
                and cid not in self._ready_seen:
            self._ready_seen[cid] = utcnow()
            container = replace(container, ready_time=self._ready_seen[cid])
        self._containers[cid] = container
        if previous != container:
            self._notify(Event(EventType.ADDED if previous is None else EventType.MODIFIED, container))
            if container.state is State.FAILED and (previous is None or previous.state is not State.FAILED):
                log.warning("ecs.container_failed", container_id=cid, reason=container.state_reason,
                            message=container.state_message)
        return container

    def _gone(self, arn: str) -> None:
        """ECS no longer knows the task (stopped over an hour ago)."""
        cid = next((c for c, task in self._tasks.items() if task.get("taskArn") == arn), None)
        if cid is None:
            return
        last = self._containers.pop(cid)
        del self._tasks[cid]
        self._ready_seen.pop(cid, None)
        if last.state in (State.TERMINATED, State.FAILED):
            self._tombstones[cid] = last
            return
        tomb = last.with_state(State.TERMINATED, reason=last.state_reason or "Deleted", message=last.state_message)
        self._tombstones[cid] = replace(tomb, ip_address="", endpoints=())
        self._notify(Event(EventType.DELETED, self._tombstones[cid]))

    # -- lifecycle -----------------------------------------------------------------------------

    async def create(self, *, spec: ContainerSpec, container_id: str) -> Container:
        placement = self._config.placements[spec.placement]
        t.check_labels(spec.labels)
        agent.check_ports(spec.ports, self._config.agent_port)
        callers = {k: v for k, v in spec.env.items() if k not in agent.AGENT_ENV}
        env = {**callers, agent.CONTAINER_ID_ENV: container_id}
        if len(json.dumps(spec.env)) > MAX_ENV_BYTES:
            raise InvalidField("env", f"the ECS backend passes at most {MAX_ENV_BYTES} bytes of environment")
        size = self._size(spec, placement)
        resources = replace(spec.resources, cpu_millicores=size.cpu_millicores, memory_mib=size.memory_mib)
        image = spec.image or self._config.default_image
        assert self._taskdefs is not None
        arn = await self._taskdefs.arn_for(TaskShape(image=image, cpu_units=size.cpu_units,
                                                     memory_mib=size.memory_mib, ports=spec.ports,
                                                     fargate=placement.fargate))
        now = utcnow()
        tags = t.make_tags(spec, container_id=container_id, image=image, resources=resources, create_time=now,
                           expire_time=now + timedelta(seconds=spec.ttl_s))
        task = await self.launcher.launch(Launch(
            task_definition=arn, capacity_provider=placement.capacity_provider,
            subnets=placement.subnets or self._config.subnets,
            security_groups=placement.security_groups or self._config.security_groups,
            environment=env, init_environment=init_environment(self._agent_key, container_id), tags=tags))
        container = self._store(task)
        assert container is not None
        return container

    def _size(self, spec: ContainerSpec, placement: EcsPlacement) -> TaskSize:
        r = spec.resources
        if placement.fargate:
            return fargate_size(r.cpu_millicores, r.memory_mib, max_cpu_millicores=self._limits.max_cpu_millicores,
                                max_memory_mib=self._limits.max_memory_mib)
        return TaskSize(cpu_units=to_units(r.cpu_millicores), memory_mib=r.memory_mib)

    async def _stop(self, arn: str, reason: str) -> dict[str, Any] | None:
        try:
            answer = await self.api.call(self.api.ecs.stop_task, cluster=self._config.cluster, task=arn,
                                         reason=STOP_PREFIX + reason)
        except botocore.exceptions.ClientError as e:
            if error_code(e) in ("InvalidParameterException", "ClientException"):
                return None  # gone already
            raise BackendError(f"StopTask: {error_code(e)}") from e
        return dict(answer.get("task") or {}) or None

    async def get(self, *, container_id: str) -> Container:
        known = self._containers.get(container_id) or self._tombstones.get(container_id)
        if known is None:
            raise ContainerNotFound(container_id)
        return known

    async def list(self) -> list[Container]:
        return [*self._containers.values(), *self._tombstones.values()]

    async def delete(self, *, container_id: str, grace_period_s: float, reason: str) -> Container:
        c = await self.get(container_id=container_id)
        if c.state in (State.TERMINATING, State.TERMINATED) or container_id in self._deleting:
            return c
        task = self._tasks[container_id]
        if c.state is State.FAILED and task.get("lastStatus") == "STOPPED":
            # Nothing left to stop: it ends here (ECS keeps its own reason).
            return self._bury(container_id, reason)
        # ECS gives the container SIGTERM, then SIGKILL after the task's stopTimeout.
        self._deleting.add(container_id)
        try:
            stopped = await self._stop(str(task["taskArn"]), reason)
            if stopped is not None:
                self._store(stopped)
            log.info("ecs.deleting", container_id=container_id, reason=reason)
            return await self.get(container_id=container_id)
        finally:
            self._deleting.discard(container_id)

    def _bury(self, container_id: str, reason: str) -> Container:
        arn = str(self._tasks.pop(container_id)["taskArn"])
        self._forgotten.add(arn)
        last = self._containers.pop(container_id)
        self._tombstones[container_id] = last.with_state(State.TERMINATED, reason=reason,
                                                         message=last.state_message)
        self._notify(Event(EventType.DELETED, self._tombstones[container_id]))
        return self._tombstones[container_id]

    async def set_expiry(self, *, container_id: str, expire_time: datetime) -> Container:
        await self.get(container_id=container_id)
        task = self._tasks.get(container_id)
        if task is None:
            raise ContainerNotFound(container_id)
        tag = t.expiry_tag(expire_time)
        await self.api.call(self.api.ecs.tag_resource, resourceArn=task["taskArn"], tags=t.to_aws(tag))
        container = self._store({**task, "tags": t.to_aws({**t.from_aws(task.get("tags")), **tag})})
        assert container is not None
        return container

    async def forget(self, *, container_id: str) -> None:
        if self._tombstones.pop(container_id, None) is not None:
            return
        c = self._containers.get(container_id)
        if c is None or c.state not in (State.FAILED, State.TERMINATED):
            return
        task = self._tasks[container_id]
        if c.state is State.FAILED and task.get("lastStatus") != "STOPPED":
            await self._stop(str(task["taskArn"]), "Forgotten")
        self._forgotten.add(str(task["taskArn"]))
        del self._tasks[container_id], self._containers[container_id]
        self._ready_seen.pop(container_id, None)
