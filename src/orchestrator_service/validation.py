"""Turns a caller's raw create request into a ContainerSpec, or says which field is wrong."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator_service.model import ContainerSpec, Port, Resources
from sandhub.config import Limits
from sandhub.errors import InvalidField, UnknownPlacement, clip

RESERVED_LABEL_PREFIX = "sandhub.dev/"
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
"""Variable names every backend can pass on (a shell `export` included)."""
MAX_ENV_VALUE = 32 * 1024
MAX_ENV_NAME = 256
MAX_REQUEST_ID = 128
MAX_ENV_TOTAL = 256 * 1024
"""Bytes of a container's environment in all (names, values, "=" and NUL
each): Linux refuses to start a program whose environment and arguments pass
ARG_MAX (2 MiB with the usual stack limit), so 256 KiB leaves every command
room for its own arguments and environment (Command: 128 KiB)."""
MAX_LABEL_PREFIX = 253
MAX_LABEL_NAME = 63
MAX_LABEL_KEY = MAX_LABEL_PREFIX + 1 + MAX_LABEL_NAME
_SHOWN = 64
"""Characters of a caller's value quoted back in an error: a multi-MiB key
echoed in full would overflow the reply's metadata."""


def shown(text: str) -> str:
    """``text`` quoted for an error message, cut short."""
    return repr(clip(text, _SHOWN))


@dataclass(frozen=True)
class RawCreate:
    """A create request as received, before any check."""

    image: str
    cpu_millicores: int
    memory_mib: int
    pids: int
    disk_mib: int
    open_files: int
    env: Mapping[str, str]
    labels: Mapping[str, str]
    ttl_s: float
    ports: Sequence[Port]
    placement: str
    request_id: str


def check_label_key(key: str, field: str) -> None:
    # Lengths first: no pattern ever runs over more than a label's worth of input.
    if len(key) > MAX_LABEL_KEY:
        raise InvalidField(field, f"label key {shown(key)}: longer than {MAX_LABEL_KEY} characters")
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > MAX_LABEL_PREFIX or not _LABEL_PREFIX.match(prefix)):
        raise InvalidField(field, f"label key {shown(key)}: prefix must be a DNS subdomain")
    if len(name) > MAX_LABEL_NAME or not _LABEL_NAME.match(name):
        raise InvalidField(
            field,
            f"label key {shown(key)}: name must be 1-63 characters of [A-Za-z0-9._-], starting and ending alphanumeric",
        )


def check_label_value(key: str, value: str, field: str) -> None:
    if value and (len(value) > MAX_LABEL_NAME or not _LABEL_NAME.match(value)):
        raise InvalidField(
            field, f"label {shown(key)}: value must be empty or 1-63 characters of [A-Za-z0-9._-], starting and ending alphanumeric"
        )


def _bounded(field: str, value: int, default: int, maximum: int, minimum: int = 1) -> int:
    if value < 0:
        raise InvalidField(field, f"must not be negative (got {value})")
    if value == 0:
        return default
    if value < minimum or value > maximum:
        raise InvalidField(field, f"must be between {minimum} and {maximum} (got {value})")
    return value


def check_ttl(field: str, ttl_s: float, limits: Limits, *, default: float | None) -> float:
    if ttl_s < 0:
        raise InvalidField(field, "must not be negative")
    if ttl_s == 0:
        if default is None:
            raise InvalidField(field, "must be positive")
        return default
    if ttl_s > limits.max_ttl_s:
        raise InvalidField(field, f"{ttl_s:g}s is over the maximum of {limits.max_ttl_s:g}s")
    return ttl_s


def build_spec(raw: RawCreate, *, tenant: str, limits: Limits, placements: Sequence[str], default_image: str) -> ContainerSpec:
    resources = Resources(
        cpu_millicores=_bounded("resources.cpu_millicores", raw.cpu_millicores, limits.default_cpu_millicores, limits.max_cpu_millicores, 10),
        memory_mib=_bounded("resources.memory_mib", raw.memory_mib, limits.default_memory_mib, limits.max_memory_mib, 16),
        pids=_bounded("resources.pids", raw.pids, limits.default_pids, limits.max_pids, 8),
        disk_mib=_bounded("resources.disk_mib", raw.disk_mib, limits.default_disk_mib, limits.max_disk_mib),
        open_files=_bounded("resources.open_files", raw.open_files, limits.default_open_files, limits.max_open_files, 64),
    )
    if len(raw.env) > limits.max_env:
        raise InvalidField("env", f"at most {limits.max_env} variables")
    for key, value in raw.env.items():
        if len(key) > MAX_ENV_NAME or not ENV_NAME.match(key):
            raise InvalidField(f"env[{key}]", f"variable name {shown(key)} must be up to {MAX_ENV_NAME} characters of [A-Za-z_][A-Za-z0-9_]*")
        if len(value) > MAX_ENV_VALUE or "\x00" in value:
            raise InvalidField(f"env[{key}]", f"variable {shown(key)}: value too long or contains NUL")
    total = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in raw.env.items())
    if total > MAX_ENV_TOTAL:
        raise InvalidField("env", f"{total} bytes of variables; at most {MAX_ENV_TOTAL} in all")
    if len(raw.labels) > limits.max_labels:
        raise InvalidField("labels", f"at most {limits.max_labels} labels")
    for key, value in raw.labels.items():
        check_label_key(key, f"labels[{key}]")
        if key.startswith(RESERVED_LABEL_PREFIX):
            raise InvalidField(f"labels[{key}]", f"label key {key!r}: prefix {RESERVED_LABEL_PREFIX!r} is reserved")
        check_label_value(key, value, f"labels[{key}]")
    if len(raw.ports) > limits.max_ports:
        raise InvalidField("ports", f"at most {limits.max_ports} ports")
    seen: set[tuple[int, str]] = set()
    for i, port in enumerate(raw.ports):
        if not 1 <= port.port <= 65535:
            raise InvalidField(f"ports[{i}].port", f"port {port.port} is not between 1 and 65535")
        if port.name and (len(port.name) > 15 or not _PORT_NAME.match(port.name)):
            raise InvalidField(f"ports[{i}].name", f"port name {shown(port.name)} must be up to 15 characters of [a-z0-9-]")
        if (port.port, port.protocol) in seen:
            raise InvalidField(f"ports[{i}]", f"port {port.port}/{port.protocol} listed twice")
        seen.add((port.port, port.protocol))
    placement = raw.placement or placements[0]
    if len(placement) > MAX_LABEL_NAME:
        raise InvalidField("placement", f"{shown(placement)}: at most {MAX_LABEL_NAME} characters")
    if placement not in placements:
        raise UnknownPlacement(placement, list(placements))
    if len(raw.request_id) > MAX_REQUEST_ID:
        raise InvalidField("request_id", f"at most {MAX_REQUEST_ID} characters")
    if len(raw.image) > 512:
        raise InvalidField("image", "at most 512 characters")
    return ContainerSpec(
        tenant=tenant,
        image=raw.image or default_image,
        resources=resources,
        env=dict(raw.env),
        labels=dict(raw.labels),
        ttl_s=check_ttl("ttl", raw.ttl_s, limits, default=limits.default_ttl_s),
        ports=tuple(raw.ports),
        placement=placement,
        request_id=raw.request_id,
    )
