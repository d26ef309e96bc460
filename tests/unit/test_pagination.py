import pytest

from sandhub.pagination import decode_token, encode_token, page_size, paginate
from sandhub.errors import InvalidField, InvalidPageToken


def key(item: tuple[str, str]) -> tuple[str, str]:
    return item


def test_pages_cover_everything_once_in_order() -> None:
    items = [(f"2026-01-01T00:00:{i:02d}", f"id{i}") for i in range(7)]
    seen, token = [], ""
    while True:
        page, token = paginate(items[::-1], key=key, size=3, token=token, query="q")
        seen += page
        if not token:
            break
    assert seen == items


def test_items_added_between_pages_do_not_repeat() -> None:
    items = [("t1", "a"), ("t2", "b"), ("t3", "c")]
    page, token = paginate(items, key=key, size=2, token="", query="q")
    items.insert(0, ("t0", "z"))  # older item appears later: not repeated
    rest, token2 = paginate(items, key=key, size=2, token=token, query="q")
    assert page + rest == [("t1", "a"), ("t2", "b"), ("t3", "c")]
    assert token2 == ""


def test_token_bound_to_query() -> None:
    token = encode_token(("t", "id"), "tenant|app=web|")
    assert decode_token(token, "tenant|app=web|") == ("t", "id")
    with pytest.raises(InvalidPageToken):
        decode_token(token, "tenant|app=db|")
    with pytest.raises(InvalidPageToken):
        decode_token("not-a-token!!", "q")


def test_page_size_bounds() -> None:
    assert page_size(0) == 100
    assert page_size(5000) == 1000
    with pytest.raises(InvalidField):
        page_size(-1)
