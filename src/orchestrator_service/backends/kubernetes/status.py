"""Reads a Container back from its pod, no I/O.

The pod is the record: what the caller asked for comes from its spec and our
annotations, the state from what the cluster reports. Failures a kubelet or
the scheduler reports (ImagePullBackOff, Unschedulable, OOMKilled, Evicted,
...) become FAILED with that reason as soon as they show up, so a caller
waiting for RUNNING hears about them instead of timing out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from kubernetes import client

from orchestrator_service.backends.cluster_agent import AGENT_ENV
from orchestrator_service.backends.kubernetes import objects as o
from orchestrator_service.model import Container, Endpoint, Port, Resources, State

FAILED_WAITING = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError", "CrashLoopBackOff",
})
"""Waiting reasons that don't fix themselves: the pod will never run as asked."""


@dataclass(frozen=True)
class Status:
    state: State
    reason: str = ""
    message: str = ""
    since: datetime | None = None


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _condition(pod: client.V1Pod, kind: str) -> client.V1PodCondition | None:
    for c in (pod.status.conditions if pod.status else None) or []:
        if c.type == kind:
            return c
    return None


def _main_status(pod: client.V1Pod) -> client.V1ContainerStatus | None:
    for s in (pod.status.container_statuses if pod.status else None) or []:
        if s.name == o.CONTAINER_NAME:
            return s
    return None


def _agent_install_failure(pod: client.V1Pod) -> Status | None:
    """FAILED when the init container that installs the exec agent can't run
    (its image can't be pulled) or failed: the container would never start."""
    for s in (pod.status.init_container_statuses if pod.status else None) or []:
        if s.name != o.AGENT_INIT or s.state is None:
            continue
        waiting, done = s.state.waiting, s.state.terminated
        if waiting is not None and waiting.reason in FAILED_WAITING:
            return Status(State.FAILED, waiting.reason, f"the exec agent's image: {waiting.message or waiting.reason}")
        if done is not None and done.exit_code != 0:
            return Status(State.FAILED, "AgentInstallFailed",
                          f"installing the exec agent failed with exit code {done.exit_code}: "
                          f"{done.message or done.reason or ''}".rstrip(": "), _time(done.finished_at))
    return None


def classify(pod: client.V1Pod, *, now: datetime, unschedulable_timeout_s: float = 0.0) -> Status:
    meta, status = pod.metadata, pod.status or client.V1PodStatus()
    annotations = meta.annotations or {}
    if meta.deletion_timestamp is not None or o.ANN_DELETE_REASON in annotations:
        # Marked is as good as deleting: the delete follows at once (backend.py).
        return Status(State.TERMINATING, annotations.get(o.ANN_DELETE_REASON) or "Deleted")
    agent_failure = _agent_install_failure(pod)
    if agent_failure is not None:
        return agent_failure
    main = _main_status(pod)
    terminated = main.state.terminated if main and main.state else None
    if status.phase == "Failed":
        reason = status.reason or (terminated.reason if terminated else "") or "Failed"
        message = status.message or (terminated.message if terminated else "") or (
            f"the container's main process exited with code {terminated.exit_code}" if terminated else "")
        return Status(State.FAILED, reason, message, _time(terminated.finished_at) if terminated else None)
    if status.phase == "Succeeded" or (terminated is not None and terminated.exit_code == 0):
        return Status(State.FAILED, "ProcessExited", "the container's main process ended",
                      _time(terminated.finished_at) if terminated else None)
    if terminated is not None:
        return Status(State.FAILED, terminated.reason or "Error",
                      terminated.message or f"the container's main process exited with code {terminated.exit_code}",
                      _time(terminated.finished_at))
    waiting = main.state.waiting if main and main.state else None
    if waiting is not None and waiting.reason in FAILED_WAITING:
        return Status(State.FAILED, waiting.reason, waiting.message or "", None)
    scheduled = _condition(pod, "PodScheduled")
    if scheduled is not None and scheduled.status == "False" and scheduled.reason == "Unschedulable":
        since = _time(scheduled.last_transition_time) or now
        if (now - since).total_seconds() >= unschedulable_timeout_s:
            return Status(State.FAILED, "Unschedulable", scheduled.message or "no node can run this pod", since)
        return Status(State.PENDING, "Unschedulable", scheduled.message or "")
    if status.phase == "Running" and status.pod_ip and main is not None and main.ready:
        ready = _condition(pod, "Ready")
        return Status(State.RUNNING, since=_time(ready.last_transition_time) if ready else None)
    return Status(State.PENDING, waiting.reason if waiting and waiting.reason else "")


def _resources(annotations: dict[str, str]) -> Resources:
    raw = json.loads(annotations.get(o.ANN_RESOURCES) or "{}")
    return Resources(cpu_millicores=int(raw.get("cpu_millicores", 0)), memory_mib=int(raw.get("memory_mib", 0)),
                     pids=int(raw.get("pids", 0)), disk_mib=int(raw.get("disk_mib", 0)),
                     open_files=int(raw.get("open_files", 0)))


def _latest(*times: datetime | None) -> datetime | None:
    known = [t for t in times if t is not None]
    return max(known) if known else None


def read_container(pod: client.V1Pod, *, backend: str, now: datetime,
                   unschedulable_timeout_s: float = 0.0) -> Container:
    meta = pod.metadata
    annotations: dict[str, str] = dict(meta.annotations or {})
    labels: dict[str, str] = dict(meta.labels or {})
    main = next((c for c in pod.spec.containers if c.name == o.CONTAINER_NAME), pod.spec.containers[0])
    defaulted = set(filter(None, annotations.get(o.ANN_DEFAULTED_ENV, "").split(",")))
    env = {e.name: e.value or "" for e in main.env or [] if e.name not in AGENT_ENV and e.name not in defaulted}
    ports = tuple(Port(port=p.container_port, protocol=p.protocol or "TCP", name=p.name or "")
                  for p in main.ports or [])
    status = classify(pod, now=now, unschedulable_timeout_s=unschedulable_timeout_s)
    created = _time(annotations.get(o.ANN_CREATE_TIME)) or _time(meta.creation_timestamp) or now
    expires = _time(annotations.get(o.ANN_EXPIRE_TIME)) or created
    ip = (pod.status.pod_ip if pod.status else None) or ""
    ready_time = None
    if status.state is State.RUNNING:
        # What the orchestrator recorded when it saw it Running; else the pod's
        # whole-second Ready stamp, never before the (sub-second) create time.
        ready_time = _time(annotations.get(o.ANN_READY_TIME)) or (
            max(status.since, created) if status.since else None)
    conditions = (pod.status.conditions if pod.status else None) or []
    updated = _latest(created, _time(meta.deletion_timestamp), status.since,
                      *(_time(c.last_transition_time) for c in conditions)) or created
    # Derived from the pod alone (never "now"), so it is the same after a
    # restart and the tombstone time of a FAILED container really runs out.
    end_time = (status.since or updated) if status.state is State.FAILED else None
    return Container(
        id=labels.get(o.LABEL_CONTAINER_ID) or meta.name,
        tenant=annotations.get(o.ANN_TENANT, ""),
        image=main.image or "",
        resources=_resources(annotations),
        env=env,
        labels=o.labels_from_annotation(annotations),
        ports=ports,
        state=status.state,
        backend=backend,
        placement=annotations.get(o.ANN_PLACEMENT, ""),
        create_time=created,
        expire_time=expires,
        update_time=updated,
        state_reason=status.reason,
        state_message=status.message,
        ip_address=ip,
        endpoints=tuple(Endpoint(name=p.name, port=p.port, protocol=p.protocol, address=f"{ip}:{p.port}")
                        for p in ports) if ip else (),
        ready_time=ready_time,
        end_time=end_time,
        request_id=annotations.get(o.ANN_REQUEST_ID, ""),
    )
