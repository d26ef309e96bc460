import pytest

from orchestrator_service.selector import MAX_REQUIREMENTS, MAX_SELECTOR_CHARS, MAX_SET_VALUES, parse_selector
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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  app = web  ,  tier != back ,", True),  # spaces around everything; a trailing comma
        ("app in(web)", True),
        ("app\tin\t(\tweb\t)", True),
        ("! missing", True),
        ("app in ()", False),  # an empty set matches nothing
        ("app notin ()", True),
        ("in", False),  # "in" alone is a key
        ("tier in (front,,)", True),
    ],
)
def test_selector_edge_cases_keep_their_meaning(text: str, expected: bool) -> None:
    assert parse_selector(text).matches(LABELS) is expected


@pytest.mark.parametrize("text", ["app in (web", "app notin", "app=web,,tier=front", "!", "!a=b", "a=b c", "a inside (x)"])
def test_selector_rejects_more_garbage(text: str) -> None:
    with pytest.raises(InvalidField):
        parse_selector(text)


def test_selector_caps() -> None:
    parse_selector(",".join(f"k{i}" for i in range(MAX_REQUIREMENTS)))
    with pytest.raises(InvalidField, match="requirements"):
        parse_selector(",".join(f"k{i}" for i in range(MAX_REQUIREMENTS + 1)))
    parse_selector("k in (" + ",".join(f"v{i}" for i in range(MAX_SET_VALUES)) + ")")
    with pytest.raises(InvalidField, match="values"):
        parse_selector("k in (" + ",".join(f"v{i}" for i in range(MAX_SET_VALUES + 1)) + ")")
    with pytest.raises(InvalidField, match="longer than"):
        parse_selector("a" * (MAX_SELECTOR_CHARS + 1))
    with pytest.raises(InvalidField, match="longer than"):
        parse_selector(" " * (1 << 20))  # a megabyte of padding is not stripped first


PATHOLOGICAL = [
    "a" + " " * 4094 + "i",  # the reported one: 0.4-0.6 s each with the backtracking regex
    "a" + " " * 4094 + "!",
    "!" + " " * 4095,
    "a in (" + " " * 4089 + "x",
    "a" + " " * 2047 + "=" + " " * 2046 + "(",
]


def test_selector_parsing_is_linear_time() -> None:
    """Each input costs a bounded amount of work per character: the total is
    well under a millisecond per call here; the old regex took ~0.5 s for the
    first one alone. The bound is 100 ms per call, so only a
    super-linear parser fails it."""
    import time

    for text in PATHOLOGICAL:
        assert len(text) <= MAX_SELECTOR_CHARS
        start = time.process_time()
        with pytest.raises(InvalidField) as e:
            parse_selector(text)
        spent = time.process_time() - start
        assert spent < 0.1, (text[:8], spent)
        assert len(e.value.message) < 400  # the caller's text is not echoed in full
