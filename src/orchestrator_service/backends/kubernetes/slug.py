"""One slug helper for everything Kubernetes names: DNS-safe and label-safe.

A slug of [a-z0-9-], starting and ending alphanumeric, at most 63 characters,
is both a valid DNS label (object names) and a valid label value, so one
function serves both. Text that had to change gets a short hash of the
original appended, so two different inputs never collapse into one slug
("Team A" and "team-a" stay apart), the way kubespawner's safe_slug does.
"""

from __future__ import annotations

import hashlib
import re

MAX_LEN = 63
_SAFE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_UNSAFE_RUN = re.compile(r"[^a-z0-9]+")
_HASH_LEN = 8


def is_safe(text: str, *, max_len: int = MAX_LEN) -> bool:
    return len(text) <= max_len and bool(_SAFE.match(text))


def slug(text: str, *, max_len: int = MAX_LEN) -> str:
    """``text`` itself when already safe, else a lowercase, dash-joined,
    truncated form plus "-" and 8 hex characters of its sha256."""
    if max_len < _HASH_LEN + 2:
        raise ValueError(f"max_len must be at least {_HASH_LEN + 2}")
    if is_safe(text, max_len=max_len):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]
    base = _UNSAFE_RUN.sub("-", text.lower()).strip("-")[: max_len - _HASH_LEN - 1].rstrip("-")
    return f"{base}-{digest}" if base else f"x-{digest}"
