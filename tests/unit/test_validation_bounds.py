"""Caller input of any size is refused by length before a pattern looks at it,
and errors quote only the start of it (a multi-MiB value echoed in full
overflowed the reply's metadata)."""

from __future__ import annotations

import pytest

from orchestrator_service.model import Port
from sandhub.container_ids import check_container_id
from sandhub.errors import InvalidField
from tests.unit.test_validation import build

BIG = "a" * (3 << 20)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"labels": {BIG: "x"}}, "labels[aaa"),
        ({"labels": {"p/" + BIG: "x"}}, "labels[p/aaa"),
        ({"labels": {BIG + "/a": "x"}}, "labels[aaa"),
        ({"labels": {"a": BIG}}, "labels[a]"),
        ({"env": {BIG: "x"}}, "env[aaa"),
        ({"env": {"A" * (3 << 20): "x"}}, "env[AAA"),
        ({"ports": [Port(80, name=BIG)]}, "ports[0].name"),
        ({"placement": BIG}, "placement"),
    ],
)
def test_huge_values_are_refused_and_not_echoed(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidField) as e:
        build(**overrides)
    assert e.value.field.startswith(field)  # a huge map key in the path is cut short
    assert len(e.value.field) < 512 and len(e.value.message) < 512 and all(len(v) < 512 for v in e.value.metadata.values())


def test_longest_valid_label_key_passes() -> None:
    key = ".".join(["a" * 63] * 3) + "." + "b" * 61 + "/" + "c" * 63  # 253-character prefix, 63-character name
    assert len(key) == 253 + 1 + 63
    assert build(labels={key: "v" * 63}).labels == {key: "v" * 63}


def test_huge_container_id_is_refused_and_not_echoed() -> None:
    with pytest.raises(InvalidField) as e:
        check_container_id(BIG)
    assert len(e.value.message) < 512


def test_the_whole_environment_is_bounded_so_commands_can_start() -> None:
    """80 values of 32 KiB each pass every per-variable check, but 2.5 MiB of
    environment makes every exec fail with E2BIG (found by the interop run:
    the container ended FAILED "Argument list too long")."""
    value = "v" * (32 * 1024 - 1)
    with pytest.raises(InvalidField) as e:
        build(env={f"V{i}": value for i in range(80)})
    assert e.value.field == "env" and "at most 262144" in e.value.message
    build(env={f"V{i}": value for i in range(7)})  # 224 KiB: fine
