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
