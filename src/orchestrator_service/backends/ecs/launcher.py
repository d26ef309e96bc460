"""Batches creates that arrive together into RunTask calls, within the rates.

RunTask launches up to 10 tasks per call, all with the same task definition,
network, overrides and tags. Creates that share the first three (same size,
image, ports, placement and environment) and arrive within a few
milliseconds of each other go out in one call: tags they share go on the
call, each task's own (its container id, ...) are added by the caller
right after with TagResource. Before each call the launcher reserves one
RunTask token and one Fargate launch token per task (limiter.py), so a burst
of 1,000 creates is spread over Fargate's 100-then-20-a-second instead of
being throttled.

Today no two creates share a call: each task's environment holds its own
agent credential (backend.init_environment), so a batch is one task with
all its tags on the call, and no TagResource follows. Batching is kept for
creates that would share everything (it costs nothing when they don't).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import botocore.exceptions
import structlog

from orchestrator_service.backends.ecs import tags as t
from orchestrator_service.backends.ecs.client import EcsApi, error_code, error_message
from orchestrator_service.backends.ecs.taskdefs import AGENT_INIT, MAIN
from sandhub.errors import BackendError, BackendUnavailable, InvalidField, QuotaExceeded

log = structlog.get_logger("sandhub.ecs")

MAX_PER_CALL = 10
"""RunTask's most tasks per call."""


@dataclass(frozen=True)
class LaunchKey:
    """What tasks must share to go out in one RunTask call."""

    task_definition: str
    capacity_provider: str
    subnets: tuple[str, ...]
    security_groups: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    """The main container's."""
    init_environment: tuple[tuple[str, str], ...] = ()
    """The agent's init container's (its credential)."""


@dataclass
class Launch:
    key: LaunchKey
    tags: dict[str, str]
    submitted: float = field(default_factory=time.monotonic)
    started: float = 0.0
    """When its RunTask call went out (monotonic): started - submitted is the limiter's wait."""
    result: asyncio.Future[tuple[dict[str, Any], dict[str, str]]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    """The task, and the tags it still needs (those not shared by its whole call)."""


class Launcher:
    def __init__(self, api: EcsApi, *, cluster: str, started_by: str, assign_public_ip: bool,
                 batch_window_s: float) -> None:
        self._api = api
        self._cluster = cluster
        self._started_by = started_by
        self._public_ip = "ENABLED" if assign_public_ip else "DISABLED"
        self._window = batch_window_s
        self._queues: OrderedDict[LaunchKey, list[Launch]] = OrderedDict()
        self._wake = asyncio.Event()
        self._calls: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self.calls = 0

    def start(self) -> None:
        self._loop = asyncio.create_task(self._dispatch_forever(), name="ecs-launcher")

    async def close(self) -> None:
        running = [*self._calls, *([self._loop] if self._loop else [])]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for queue in self._queues.values():
            for launch in queue:
                if not launch.result.done():
                    launch.result.set_exception(BackendUnavailable("the orchestrator is stopping; retry"))

    async def launch(self, key: LaunchKey, tags: dict[str, str]) -> tuple[dict[str, Any], dict[str, str], Launch]:
        """Queues one task; returns it (as RunTask answered), the tags still to
        add, and its Launch (timings)."""
        item = Launch(key=key, tags=tags)
        self._queues.setdefault(key, []).append(item)
        self._wake.set()
        task, missing = await asyncio.shield(item.result)
        return task, missing, item

    async def _dispatch_forever(self) -> None:
        while True:
            await self._wake.wait()
            # Creates arriving together join one call.
            await asyncio.sleep(self._window)
            self._wake.clear()
            while self._queues:
                key, queue = next(iter(self._queues.items()))
                batch, rest = queue[:MAX_PER_CALL], queue[MAX_PER_CALL:]
                if rest:
                    self._queues[key] = rest
                    self._queues.move_to_end(key)  # keys take turns
                else:
                    del self._queues[key]
                try:
                    await self._reserve(key, len(batch))
                except asyncio.CancelledError:
                    self._fail(batch, BackendUnavailable("the orchestrator is stopping; retry"))
                    raise
                call = asyncio.create_task(self._run(key, batch))
                self._calls.add(call)
                call.add_done_callback(self._calls.discard)

    async def _reserve(self, key: LaunchKey, count: int) -> None:
        # The RunTask call token is taken by EcsApi.call; this is the launch rate.
        launches = self._api.limiter.launches(key.capacity_provider)
        wait_s = launches.reserve(count) if launches else 0.0
        if wait_s > 0:
            await asyncio.sleep(wait_s)

    async def _run(self, key: LaunchKey, batch: list[Launch]) -> None:
        shared = dict(set.intersection(*(set(b.tags.items()) for b in batch)))
        now = time.monotonic()
        for b in batch:
            b.started = now
        try:
            answer = await self._api.call(self._api.ecs.run_task, **self._arguments(key, len(batch), shared))
        except botocore.exceptions.ClientError as e:
            self._fail(batch, _refused(e))
            return
        except asyncio.CancelledError:
            self._fail(batch, BackendUnavailable("the orchestrator is stopping; retry"))
            raise
        except Exception as e:  # BackendUnavailable, or a bug: every waiting create hears of it
            self._fail(batch, e)
            return
        self.calls += 1
        tasks = list(answer.get("tasks") or ())
        for b, task in zip(batch, tasks):
            missing = {k: v for k, v in b.tags.items() if k not in shared}
            task["tags"] = t.to_aws({**t.from_aws(task.get("tags")), **shared})
            b.result.set_result((task, missing))
        if len(tasks) < len(batch):
            failures = "; ".join(f"{f.get('reason', '')} {f.get('detail', '')}".strip()
                                 for f in answer.get("failures") or ()) or "no reason given"
            self._fail(batch[len(tasks):], BackendUnavailable(
                f"ECS placed {len(tasks)} of {len(batch)} tasks ({failures}); retry later"))

    def _arguments(self, key: LaunchKey, count: int, shared: dict[str, str]) -> dict[str, Any]:
        return {
            "cluster": self._cluster,
            "taskDefinition": key.task_definition,
            "count": count,
            "capacityProviderStrategy": [{"capacityProvider": key.capacity_provider, "weight": 1}],
            "networkConfiguration": {"awsvpcConfiguration": {
                "subnets": list(key.subnets), "securityGroups": list(key.security_groups),
                "assignPublicIp": self._public_ip}},
            "overrides": {"containerOverrides": [
                {"name": MAIN, "environment": [{"name": k, "value": v} for k, v in key.environment]},
                {"name": AGENT_INIT, "environment": [{"name": k, "value": v} for k, v in key.init_environment]}]},
            "startedBy": self._started_by,
            "tags": t.to_aws(shared),
            "propagateTags": "TASK_DEFINITION",
            "enableExecuteCommand": False,
            # Makes a retried call (throttled, timed out) start its tasks once.
            "clientToken": uuid.uuid4().hex,
        }

    @staticmethod
    def _fail(batch: list[Launch], error: BaseException) -> None:
        for b in batch:
            if not b.result.done():
                b.result.set_exception(error)
                b.result.exception()  # retrieved even if its caller gave up


def _refused(e: botocore.exceptions.ClientError) -> Exception:
    code, message = error_code(e), error_message(e)
    if code == "LimitExceededException":
        return QuotaExceeded(f"the AWS account's ECS limit is reached: {message}", limit="ECS service quota")
    if code in ("InvalidParameterException", "ClientException") and "image" in message.lower():
        return InvalidField("image", f"ECS refused the task: {message}")
    if code == "PlatformTaskDefinitionIncompatibilityException":
        return InvalidField("placement", f"ECS can't run this task there: {message}")
    return BackendError(f"RunTask: {code}: {message}")
