"""Reads a Container back from its ECS task (DescribeTasks with tags), no I/O.

What the caller asked for comes from the task's tags; the state from ECS:
  PROVISIONING/PENDING/ACTIVATING        -> PENDING (reason: that status)
  RUNNING with an ENI address            -> RUNNING
  stopped by sandhub (reason "sandhub: X") -> TERMINATING until STOPPED, then TERMINATED (X)
  stopped or stopping for any other cause -> FAILED with ECS's stop code and reason
A task ECS stops itself (image pull failed, OOM, Spot interruption, its
main process ended) is FAILED as soon as ECS decides so, so a caller waiting
for RUNNING hears about it instead of timing out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from orchestrator_service.backends.ecs import tags as t
from orchestrator_service.backends.ecs.taskdefs import MAIN
from orchestrator_service.model import Container, Endpoint, State

STOP_PREFIX = "sandhub: "
"""StopTask's reason when sandhub stops a task: "sandhub: Deleted", "sandhub: Expired"."""
STOPPING = frozenset({"DEACTIVATING", "STOPPING", "DEPROVISIONING", "STOPPED", "DELETED"})


@dataclass(frozen=True)
class Status:
    state: State
    reason: str = ""
    message: str = ""


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return None


def _main(task: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in task.get("containers") or () if c.get("name") == MAIN), {})


def task_ip(task: dict[str, Any]) -> str:
    """The private address of the task's ENI (awsvpc)."""
    for attachment in task.get("attachments") or ():
        if attachment.get("type") != "ElasticNetworkInterface":
            continue
        for detail in attachment.get("details") or ():
            if detail.get("name") == "privateIPv4Address":
                return str(detail.get("value") or "")
    return ""


def _failure(task: dict[str, Any]) -> Status:
    """Why ECS stopped a task: its stop code, refined where the reason tells more."""
    stopped = str(task.get("stoppedReason") or "")
    main = _main(task)
    container_reason = str(main.get("reason") or "")
    code = str(task.get("stopCode") or "")
    if "CannotPullContainer" in stopped or "CannotPullContainer" in container_reason:
        reason = "ImagePullFailed"
    elif "OutOfMemory" in container_reason or "OutOfMemory" in stopped:
        reason = "OOMKilled"
    elif code == "SpotInterruption" or ("Spot" in stopped and "interrupt" in stopped.lower()):
        reason = "SpotInterruption"
    else:
        reason = code or "TaskStopped"
    detail = "; ".join(filter(None, [stopped, container_reason]))
    if not detail and main.get("exitCode") is not None:
        detail = f"the container's main process exited with code {main['exitCode']}"
    return Status(State.FAILED, reason, detail or "ECS stopped the task")


def classify(task: dict[str, Any]) -> Status:
    last = str(task.get("lastStatus") or "PROVISIONING")
    stopped = str(task.get("stoppedReason") or "")
    if stopped.startswith(STOP_PREFIX):
        reason = stopped[len(STOP_PREFIX):] or "Deleted"
        return Status(State.TERMINATED if last in ("STOPPED", "DELETED") else State.TERMINATING, reason)
    if task.get("desiredStatus") == "STOPPED" or last in STOPPING:
        return _failure(task)
    if last == "RUNNING" and task_ip(task):
        return Status(State.RUNNING)
    return Status(State.PENDING, last)


def environment(task: dict[str, Any]) -> dict[str, str]:
    """The caller's environment, from RunTask's overrides (ours left out)."""
    for override in (task.get("overrides") or {}).get("containerOverrides") or ():
        if override.get("name") == MAIN:
            return {e["name"]: e.get("value", "") for e in override.get("environment") or ()
                    if not e["name"].startswith("SANDHUB_")}
    return {}


def read_container(task: dict[str, Any], *, backend: str, now: datetime,
                   ready_seen: datetime | None = None) -> Container:
    tags = t.from_aws(task.get("tags"))
    status = classify(task)
    created = _time(tags.get(t.CREATE_TIME)) or _time(task.get("createdAt")) or now
    expires = _time(tags.get(t.EXPIRE_TIME)) or created
    ended = _time(task.get("stoppedAt")) or _time(task.get("stoppingAt"))
    ip = task_ip(task) if status.state in (State.PENDING, State.RUNNING) else ""
    ports = t.ports(tags)
    ready = None
    if status.state is State.RUNNING:
        started = _time(task.get("startedAt"))
        ready = ready_seen or (max(started, created) if started else None)
    end_time = (ended or created) if status.state in (State.FAILED, State.TERMINATED) else None
    return Container(
        id=tags.get(t.CONTAINER_ID, ""),
        tenant=t.text(tags, t.TENANT),
        image=t.text(tags, t.IMAGE),
        resources=t.resources(tags),
        env=environment(task),
        labels=t.labels(tags),
        ports=ports,
        state=status.state,
        backend=backend,
        placement=t.text(tags, t.PLACEMENT),
        create_time=created,
        expire_time=expires,
        update_time=max(filter(None, (created, ready, ended, _time(task.get("stoppingAt"))))),
        state_reason=status.reason,
        state_message=status.message,
        ip_address=ip,
        endpoints=tuple(Endpoint(name=p.name, port=p.port, protocol=p.protocol, address=f"{ip}:{p.port}")
                        for p in ports) if ip else (),
        ready_time=ready,
        end_time=end_time,
        request_id=t.text(tags, t.REQUEST_ID),
    )
