"""A container's record as ECS tags on its task, no I/O.

The task is the record: a restarted orchestrator lists its tasks (startedBy)
and reads every container back from their tags. System tags start with
``sandhub:`` (label keys can't hold a colon, so a label never collides);
each caller label is a tag of its own, so tasks can be found by label in the
ECS console and cost reports too.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from datetime import datetime

from orchestrator_service.model import ContainerSpec, Port, Resources
from sandhub.errors import InvalidField

PREFIX = "sandhub:"
CONTAINER_ID = PREFIX + "container-id"
TENANT = PREFIX + "tenant"
CREATE_TIME = PREFIX + "create-time"
EXPIRE_TIME = PREFIX + "expire-time"
REQUEST_ID = PREFIX + "request-id"
PLACEMENT = PREFIX + "placement"
IMAGE = PREFIX + "image"
RESOURCES = PREFIX + "resources"
PORTS = PREFIX + "ports"
MANAGED_BY = PREFIX + "managed-by"
"""On task definitions (and propagated to tasks): what made them."""
TASK_DEFINITION_HASH = PREFIX + "task-definition-hash"

MAX_TAGS = 50
"""ECS's limit per resource, propagated task-definition tags included."""
PROPAGATED = 2
"""Tags every task gets from its task definition (MANAGED_BY, TASK_DEFINITION_HASH)."""
SYSTEM = 9
"""System tags a task can carry (the constants above but the propagated ones)."""
MAX_LABELS = MAX_TAGS - PROPAGATED - SYSTEM
MAX_KEY = 128
MAX_VALUE = 256
_SAFE = re.compile(r"^[\w .:/=+\-@]*$")
"""What ECS accepts in a tag value."""
_B64 = "b64:"


def _encode(value: str) -> str:
    """A tag value for any text: itself when ECS accepts it, else base64url."""
    if _SAFE.match(value) and not value.startswith(_B64):
        return value
    return _B64 + base64.urlsafe_b64encode(value.encode()).decode()


def _decode(value: str) -> str:
    if value.startswith(_B64):
        try:
            return base64.urlsafe_b64decode(value[len(_B64):]).decode()
        except ValueError:
            return value
    return value


def check_labels(labels: Mapping[str, str]) -> None:
    """Labels beyond what ECS tags hold are INVALID_ARGUMENT at create."""
    if len(labels) > MAX_LABELS:
        raise InvalidField("labels", f"the ECS backend keeps at most {MAX_LABELS} labels (ECS tags)")
    for key in labels:
        if len(key) > MAX_KEY:
            raise InvalidField("labels", f"label key {key[:40]!r}...: the ECS backend takes keys of at most "
                                         f"{MAX_KEY} characters (ECS tags)")


def _resources(r: Resources) -> str:
    return f"cpu={r.cpu_millicores} memory={r.memory_mib} pids={r.pids} disk={r.disk_mib} files={r.open_files}"


def _ports(ports: tuple[Port, ...]) -> str:
    return " ".join(f"{p.port}/{p.protocol}/{p.name}" for p in ports)


def make_tags(spec: ContainerSpec, *, container_id: str, image: str, resources: Resources,
              create_time: datetime, expire_time: datetime) -> dict[str, str]:
    tags = {
        CONTAINER_ID: container_id,
        TENANT: _encode(spec.tenant),
        CREATE_TIME: create_time.isoformat(),
        EXPIRE_TIME: expire_time.isoformat(),
        PLACEMENT: _encode(spec.placement),
        IMAGE: _encode(image),
        RESOURCES: _resources(resources),
        PORTS: _ports(spec.ports),
        **spec.labels,
    }
    if spec.request_id:
        tags[REQUEST_ID] = _encode(spec.request_id)
    return tags


def to_aws(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in tags.items()]


def from_aws(tags: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in tags or ()}


def expiry_tag(expire_time: datetime) -> dict[str, str]:
    return {EXPIRE_TIME: expire_time.isoformat()}


def text(tags: Mapping[str, str], key: str) -> str:
    return _decode(tags.get(key, ""))


def labels(tags: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if not k.startswith(PREFIX) and not k.startswith("aws:")}


def resources(tags: Mapping[str, str]) -> Resources:
    fields = dict(item.partition("=")[::2] for item in tags.get(RESOURCES, "").split())

    def n(name: str) -> int:
        try:
            return int(fields.get(name, "0"))
        except ValueError:
            return 0

    return Resources(cpu_millicores=n("cpu"), memory_mib=n("memory"), pids=n("pids"), disk_mib=n("disk"),
                     open_files=n("files"))


def ports(tags: Mapping[str, str]) -> tuple[Port, ...]:
    out = []
    for item in tags.get(PORTS, "").split():
        number, _, rest = item.partition("/")
        protocol, _, name = rest.partition("/")
        if number.isdigit():
            out.append(Port(port=int(number), protocol=protocol or "TCP", name=name))
    return tuple(out)
