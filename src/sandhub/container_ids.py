"""The contract's container id ("cnt-" and 12 characters of [a-z0-9]), checked
wherever a request names one: both services answer a malformed id the same way."""

from __future__ import annotations

import re

from sandhub.errors import InvalidField, clip

CONTAINER_ID = re.compile(r"^cnt-[a-z0-9]{12}\Z")
SHOWN_CHARS = 80
"""How much of a malformed id the error repeats."""


def check_container_id(container_id: str, *, field: str = "container_id") -> str:
    """``container_id`` if it has the contract's form; else INVALID_FIELD naming
    ``field`` (a malformed id can't name a container: NOT_FOUND would mislead)."""
    if not container_id:
        raise InvalidField(field, "is required")
    if len(container_id) != 16 or not CONTAINER_ID.match(container_id):
        raise InvalidField(field, f"{clip(container_id, SHOWN_CHARS)!r} is not a container id "
                                  "(cnt- and 12 characters of [a-z0-9])")
    return container_id
