"""Starts each container's task with a RunTask call of its own, within the rates.

One create is one RunTask call (count 1) with all of the task's tags on it:
its overrides hold the task's own agent credential (backend.init_environment)
and ECS applies a call's overrides to every task it starts, so no two creates
can share a call. ECS tags a task with RunTask's tags as it creates it, so no
task of ours exists without its container id.

Before each call the launcher reserves one Fargate launch token (limiter.py;
EcsApi.call takes the RunTask call token), so a burst of 1,000 creates is
spread over Fargate's 100-then-20-a-second instead of being throttled.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import botocore.exceptions

from orchestrator_service.backends.ecs import tags as t
from orchestrator_service.backends.ecs.client import EcsApi, error_code, error_message
from orchestrator_service.backends.ecs.taskdefs import AGENT_INIT, MAIN
from sandhub.errors import BackendError, BackendUnavailable, InvalidField, QuotaExceeded

STOPPING = "the orchestrator is stopping; retry"


@dataclass(frozen=True)
class Launch:
    """One task to start: everything its RunTask call says."""

    task_definition: str
    capacity_provider: str
    subnets: tuple[str, ...]
    security_groups: tuple[str, ...]
    environment: dict[str, str]
    """The main container's."""
    init_environment: dict[str, str]
    """The agent's init container's (its credential)."""
    tags: dict[str, str]


class Launcher:
    def __init__(self, api: EcsApi, *, cluster: str, started_by: str, assign_public_ip: bool) -> None:
        self._api = api
        self._cluster = cluster
        self._started_by = started_by
        self._public_ip = "ENABLED" if assign_public_ip else "DISABLED"
        self._launches: set[asyncio.Task[dict[str, Any]]] = set()
        self._closing = False

    async def close(self) -> None:
        """Ends the launches still waiting for their turn or their answer:
        their creates fail UNAVAILABLE."""
        self._closing = True
        for launch in self._launches:
            launch.cancel()
        await asyncio.gather(*self._launches, return_exceptions=True)

    async def launch(self, launch: Launch) -> dict[str, Any]:
        """The task as RunTask answered it, with all its tags."""
        if self._closing:
            raise BackendUnavailable(STOPPING)
        task = asyncio.create_task(self._launch(launch))
        self._launches.add(task)
        task.add_done_callback(self._done)
        # Shielded: a caller that gives up can't take back a RunTask already
        # sent (a worker thread runs it); its task, tagged, is found by the next resync.
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self._launches.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved even if its caller gave up

    async def _launch(self, launch: Launch) -> dict[str, Any]:
        try:
            launches = self._api.limiter.launches(launch.capacity_provider)
            if launches is not None:
                await launches.take()
            answer = await self._api.call(self._api.ecs.run_task, **self._arguments(launch))
        except asyncio.CancelledError:
            raise BackendUnavailable(STOPPING) from None
        except botocore.exceptions.ClientError as e:
            raise _refused(e) from e
        tasks = answer.get("tasks") or ()
        if not tasks:
            failures = "; ".join(f"{f.get('reason', '')} {f.get('detail', '')}".strip()
                                 for f in answer.get("failures") or ()) or "no reason given"
            raise BackendUnavailable(f"ECS could not place the task ({failures}); retry later")
        task = dict(tasks[0])
        # The answer may leave out the call's tags: they are the record.
        task["tags"] = t.to_aws({**t.from_aws(task.get("tags")), **launch.tags})
        return task

    def _arguments(self, launch: Launch) -> dict[str, Any]:
        return {
            "cluster": self._cluster,
            "taskDefinition": launch.task_definition,
            "count": 1,
            "capacityProviderStrategy": [{"capacityProvider": launch.capacity_provider, "weight": 1}],
            "networkConfiguration": {"awsvpcConfiguration": {
                "subnets": list(launch.subnets), "securityGroups": list(launch.security_groups),
                "assignPublicIp": self._public_ip}},
            "overrides": {"containerOverrides": [
                {"name": MAIN, "environment": _pairs(launch.environment)},
                {"name": AGENT_INIT, "environment": _pairs(launch.init_environment)}]},
            "startedBy": self._started_by,
            "tags": t.to_aws(launch.tags),
            "propagateTags": "TASK_DEFINITION",
            "enableExecuteCommand": False,
            # Makes a retried call (throttled, timed out) start its task once.
            "clientToken": uuid.uuid4().hex,
        }


def _pairs(env: dict[str, str]) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in sorted(env.items())]


def _refused(e: botocore.exceptions.ClientError) -> Exception:
    code, message = error_code(e), error_message(e)
    if code == "LimitExceededException":
        return QuotaExceeded(f"the AWS account's ECS limit is reached: {message}", limit="ECS service quota")
    if code in ("InvalidParameterException", "ClientException") and "image" in message.lower():
        return InvalidField("image", f"ECS refused the task: {message}")
    if code == "PlatformTaskDefinitionIncompatibilityException":
        return InvalidField("placement", f"ECS can't run this task there: {message}")
    return BackendError(f"RunTask: {code}: {message}")
