"""Opaque page tokens: the position after the last item, bound to the query.

Items are ordered by (create_time, id); a token holds the last item's key and a
hash of the filters, so a token used with other filters is refused rather than
silently giving a wrong page. Inserts and deletes between pages never repeat
or skip an item that existed on both calls.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TypeVar

from sandhub.errors import InvalidField, InvalidPageToken

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _query_hash(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:12]


def encode_token(key: tuple[str, str], query: str) -> str:
    raw = json.dumps([key[0], key[1], _query_hash(query)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, query: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        a, b, h = json.loads(raw)
    except (ValueError, TypeError):
        raise InvalidPageToken() from None
    if not isinstance(a, str) or not isinstance(b, str) or h != _query_hash(query):
        raise InvalidPageToken()
    return a, b


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidField("page_size", "must not be negative")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def paginate(
    items: Sequence[T], *, key: Callable[[T], tuple[str, str]], size: int, token: str, query: str
) -> tuple[list[T], str]:
    """Returns one page of ``items`` (sorted here) and the next token ("" at the end)."""
    ordered = sorted(items, key=key)
    if token:
        after = decode_token(token, query)
        ordered = [i for i in ordered if key(i) > after]
    page = ordered[:size]
    next_token = encode_token(key(page[-1]), query) if len(ordered) > size else ""
    return page, next_token
