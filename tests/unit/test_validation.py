import pytest

from orchestrator_service.model import Port
from orchestrator_service.validation import RawCreate, build_spec
from sandhub.container_ids import check_container_id
from sandhub.config import Limits
from sandhub.errors import InvalidField, UnknownPlacement

LIMITS = Limits()


def raw(**overrides: object) -> RawCreate:
    base = dict(
        image="", cpu_millicores=0, memory_mib=0, pids=0, disk_mib=0, open_files=0, env={}, labels={},
        ttl_s=0.0, ports=[], placement="", request_id="",
    )
    base.update(overrides)
    return RawCreate(**base)  # type: ignore[arg-type]


def build(**overrides: object):  # type: ignore[no-untyped-def]
    return build_spec(raw(**overrides), tenant="t", limits=LIMITS, placements=["default", "fargate"], default_image="host")


def test_defaults_fill_in_never_unlimited() -> None:
    spec = build()
    assert spec.image == "host"
    assert spec.resources.cpu_millicores == LIMITS.default_cpu_millicores
    assert spec.resources.memory_mib == LIMITS.default_memory_mib
    assert spec.resources.pids == LIMITS.default_pids
    assert spec.ttl_s == LIMITS.default_ttl_s
    assert spec.placement == "default"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"cpu_millicores": -1}, "resources.cpu_millicores"),
        ({"cpu_millicores": 10**6}, "resources.cpu_millicores"),
        ({"memory_mib": -5}, "resources.memory_mib"),
        ({"memory_mib": 10**7}, "resources.memory_mib"),
        ({"pids": 2}, "resources.pids"),
        ({"ttl_s": 10**7}, "ttl"),
        ({"ttl_s": -1}, "ttl"),
        ({"labels": {"bad key": "x"}}, "labels[bad key]"),
        ({"labels": {"-a": "x"}}, "labels[-a]"),
        ({"labels": {"a": "has space"}}, "labels[a]"),
        ({"labels": {"sandhub.dev/tenant": "x"}}, "labels[sandhub.dev/tenant]"),
        ({"labels": {"Bad_Prefix/a": "x"}}, "labels[Bad_Prefix/a]"),
        ({"labels": {f"k{i}": "v" for i in range(1000)}}, "labels"),
        ({"env": {"1X": "y"}}, "env[1X]"),
        ({"ports": [Port(0)]}, "ports[0].port"),
        ({"ports": [Port(80, name="Web")]}, "ports[0].name"),
        ({"ports": [Port(80), Port(80)]}, "ports[1]"),
        ({"request_id": "x" * 200}, "request_id"),
    ],
)
def test_invalid_fields_are_named(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidField) as e:
        build(**overrides)
    assert e.value.field == field
    assert field in e.value.message


def test_good_labels_pass() -> None:
    spec = build(labels={"app": "web", "example.com/team": "a.b-c_d", "empty": ""})
    assert spec.labels["example.com/team"] == "a.b-c_d"


def test_unknown_placement() -> None:
    with pytest.raises(UnknownPlacement):
        build(placement="moon")
    assert build(placement="fargate").placement == "fargate"


def test_container_id_shape() -> None:
    check_container_id("cnt-abcdefghijk0")
    with pytest.raises(InvalidField):
        check_container_id("../etc")
