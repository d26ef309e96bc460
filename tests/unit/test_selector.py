import pytest

from orchestrator_service.selector import parse_selector
from sandhub.errors import InvalidField

LABELS = {"app": "web", "tier": "front", "team": ""}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", True),
        ("app=web", True),
        ("app==web", True),
        ("app=db", False),
        ("app!=db", True),
        ("app!=web", False),
        ("missing!=x", True),
        ("app", True),
        ("missing", False),
        ("!missing", True),
        ("!app", False),
        ("app in (web, db)", True),
        ("app in (db)", False),
        ("app notin (db,x)", True),
        ("app notin (web)", False),
        ("app=web,tier=front", True),
        ("app=web, tier=back", False),
        ("team=", True),
    ],
)
def test_selector_matches(text: str, expected: bool) -> None:
    assert parse_selector(text).matches(LABELS) is expected


@pytest.mark.parametrize("text", ["app=(", "=x", "a b", "app in web"])
def test_selector_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidField) as e:
        parse_selector(text)
    assert e.value.field == "label_selector"
