"""Proto <-> domain conversion for the orchestrator contract. The only module
besides the servicer that touches generated types."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import duration_pb2, timestamp_pb2

from orchestrator_service.model import Container, EventType, Port, State
from orchestrator_service.validation import RawCreate
from sandhub.errors import InvalidField
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb

_STATE_TO_PB = {
    State.PENDING: pb.CONTAINER_STATE_PENDING,
    State.RUNNING: pb.CONTAINER_STATE_RUNNING,
    State.TERMINATING: pb.CONTAINER_STATE_TERMINATING,
    State.TERMINATED: pb.CONTAINER_STATE_TERMINATED,
    State.FAILED: pb.CONTAINER_STATE_FAILED,
}
_STATE_FROM_PB: dict[int, State] = {v: k for k, v in _STATE_TO_PB.items()}
_PROTOCOL_TO_PB = {"TCP": pb.PROTOCOL_TCP, "UDP": pb.PROTOCOL_UDP}
_EVENT_TO_PB: dict[EventType, pb.WatchEventType] = {
    EventType.ADDED: pb.WATCH_EVENT_TYPE_ADDED,
    EventType.MODIFIED: pb.WATCH_EVENT_TYPE_MODIFIED,
    EventType.DELETED: pb.WATCH_EVENT_TYPE_DELETED,
}


def seconds(d: duration_pb2.Duration, field: str) -> float:
    if d.seconds < 0 or d.nanos < 0:
        raise InvalidField(field, "must not be negative")
    return d.seconds + d.nanos / 1e9


def state_to_pb(state: State) -> pb.ContainerState:
    return _STATE_TO_PB[state]


def state_from_pb(value: int) -> State | None:
    if value == pb.CONTAINER_STATE_UNSPECIFIED:
        return None
    try:
        return _STATE_FROM_PB[value]
    except KeyError:
        raise InvalidField("state", f"unknown state {value}") from None


def raw_create(req: pb.CreateContainerRequest) -> RawCreate:
    ports = []
    for i, p in enumerate(req.ports):
        if p.protocol not in (pb.PROTOCOL_UNSPECIFIED, pb.PROTOCOL_TCP, pb.PROTOCOL_UDP):
            raise InvalidField(f"ports[{i}].protocol", f"unknown protocol {p.protocol}")
        ports.append(Port(port=p.port, protocol="UDP" if p.protocol == pb.PROTOCOL_UDP else "TCP", name=p.name))
    r = req.resources
    return RawCreate(
        image=req.image,
        cpu_millicores=r.cpu_millicores,
        memory_mib=r.memory_mib,
        pids=r.pids,
        disk_mib=r.disk_mib,
        open_files=r.open_files,
        env=dict(req.env),
        labels=dict(req.labels),
        ttl_s=seconds(req.ttl, "ttl"),
        ports=ports,
        placement=req.placement,
        request_id=req.request_id,
    )


def _ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def container_to_pb(c: Container) -> pb.Container:
    return pb.Container(
        container_id=c.id,
        tenant=c.tenant,
        image=c.image,
        resources=pb.Resources(
            cpu_millicores=c.resources.cpu_millicores,
            memory_mib=c.resources.memory_mib,
            pids=c.resources.pids,
            disk_mib=c.resources.disk_mib,
            open_files=c.resources.open_files,
        ),
        env=c.env,
        labels=c.labels,
        ports=[pb.Port(port=p.port, protocol=_PROTOCOL_TO_PB[p.protocol], name=p.name) for p in c.ports],
        state=_STATE_TO_PB[c.state],
        state_reason=c.state_reason,
        state_message=c.state_message,
        network=pb.Network(
            ip_address=c.ip_address,
            endpoints=[
                pb.Endpoint(name=e.name, port=e.port, protocol=_PROTOCOL_TO_PB[e.protocol], address=e.address)
                for e in c.endpoints
            ],
        ),
        backend=c.backend,
        placement=c.placement,
        create_time=_ts(c.create_time),
        ready_time=_ts(c.ready_time),
        expire_time=_ts(c.expire_time),
        update_time=_ts(c.update_time),
        end_time=_ts(c.end_time),
        request_id=c.request_id,
    )


def event_type_to_pb(kind: EventType) -> pb.WatchEventType:
    return _EVENT_TO_PB[kind]
