"""One DescribeTasks loop for every task, 100 per call.

Readiness and failures of all containers come from this loop, never from a
loop per container: every ``interval_s`` it describes the tasks still
settling (PENDING, TERMINATING), and every ``resync_s`` all running ones
too (ECS stops tasks by itself: Spot interruptions, OOM, lost hosts), plus
any running task of this installation it doesn't know yet. 1,000 settling
tasks cost 10 calls a round.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from orchestrator_service.backends.ecs.client import EcsApi

log = structlog.get_logger("sandhub.ecs")

DESCRIBE_BATCH = 100
"""DescribeTasks' most tasks per call."""
LIST_PAGE = 100
"""ListTasks' largest page."""


class Poller:
    def __init__(self, api: EcsApi, *, cluster: str, on_task: Callable[[dict[str, Any]], object],
                 on_missing: Callable[[str], None], interval_s: float, resync_s: float,
                 watched: Callable[[], tuple[list[str], list[str]]], started_by: str = "",
                 ignored: Callable[[], set[str]] = set) -> None:
        self._api = api
        self._cluster = cluster
        self._on_task = on_task
        self._on_missing = on_missing
        self._interval_s = interval_s
        self._resync_s = resync_s
        self._watched = watched
        """() -> (ARNs of tasks settling, ARNs of tasks running)."""
        self._started_by = started_by
        """Set: each resync also lists this installation's running tasks to find ones it doesn't know."""
        self._ignored = ignored
        """() -> ARNs a resync must not describe (known already, or forgotten)."""
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.create_task(self._poll_forever(), name="ecs-poller")

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop

    async def list_tasks(self, *, started_by: str = "", desired_status: str = "") -> list[str]:
        """Task ARNs of the cluster, all pages. ECS takes startedBy only as the
        sole filter (it then lists running tasks): pass one or the other."""
        assert not (started_by and desired_status), "ListTasks: startedBy must be the only filter"
        only = {"startedBy": started_by} if started_by else {"desiredStatus": desired_status} if desired_status else {}
        arns: list[str] = []
        token = ""
        while True:
            page = await self._api.call(self._api.ecs.list_tasks, cluster=self._cluster, maxResults=LIST_PAGE,
                                        **only, **({"nextToken": token} if token else {}))
            arns += page.get("taskArns") or ()
            token = page.get("nextToken") or ""
            if not token:
                return arns

    async def describe(self, arns: list[str]) -> list[dict[str, Any]]:
        """The tasks, with their tags; ARNs ECS no longer knows go to on_missing."""
        found: list[dict[str, Any]] = []
        for i in range(0, len(arns), DESCRIBE_BATCH):
            batch = arns[i:i + DESCRIBE_BATCH]
            answer = await self._api.call(self._api.ecs.describe_tasks, cluster=self._cluster, tasks=batch,
                                          include=["TAGS"])
            found += answer.get("tasks") or ()
            for failure in answer.get("failures") or ():
                if failure.get("reason") == "MISSING" and failure.get("arn"):
                    self._on_missing(str(failure["arn"]))
        return found

    async def poll_once(self, *, everything: bool) -> None:
        settling, alive = self._watched()
        arns = settling + alive if everything else settling
        if everything and self._started_by:
            # Tasks another orchestrator of this installation started (or
            # whose RunTask answer was lost): known from now on.
            known = set(arns) | self._ignored()
            arns += [a for a in await self.list_tasks(started_by=self._started_by) if a not in known]
        for task in await self.describe(arns):
            self._on_task(task)

    async def _poll_forever(self) -> None:
        last_resync = time.monotonic()
        while True:
            await asyncio.sleep(self._interval_s)
            everything = time.monotonic() - last_resync >= self._resync_s
            try:
                await self.poll_once(everything=everything)
                if everything:
                    last_resync = time.monotonic()
            except Exception as e:  # throttled, unreachable: the next round tries again
                log.warning("ecs.poll_failed", error=str(e))
