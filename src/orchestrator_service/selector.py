"""Kubernetes-style label selectors: parse once, match many.

The parser is a hand-written scanner that looks at every character a bounded
number of times, so its cost is linear in the input, which is itself capped:
a selector is caller input, parsed on the event loop, and a backtracking
regex here once cost 0.4 s of CPU for 4 KiB of spaces. The caps also bound
the matching cost (requirements x containers) of every List and Watch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sandhub.errors import InvalidField

MAX_SELECTOR_CHARS = 4096
"""Longest selector accepted; far above any real one."""
MAX_REQUIREMENTS = 64
"""Requirements in one selector (as many as a container can have labels)."""
MAX_SET_VALUES = 256
"""Values in one `in (...)` / `notin (...)` set."""
_ECHO = 40
"""Characters of the caller's text quoted back in an error."""
_NOT_KEY = frozenset(",=!()")
_SYNTAX = "expected key=value, key!=value, key, !key, key in (a,b), key notin (a,b)"


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists", "in", "notin"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op == "exists":
            return value is not None
        if self.op == "!exists":
            return value is None
        if self.op in ("=", "in"):
            return value is not None and value in self.values
        return value is None or value not in self.values  # "!=", "notin"


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


class _Scanner:
    """One pass over the text; every method moves ``pos`` forward only."""

    def __init__(self, text: str, field: str) -> None:
        self.text = text
        self.field = field
        self.pos = 0

    def fail(self, what: str) -> InvalidField:
        rest = self.text[self.pos : self.pos + _ECHO]
        more = "..." if len(self.text) - self.pos > _ECHO else ""
        return InvalidField(self.field, f"{what} at character {self.pos} ({rest!r}{more}); {_SYNTAX}")

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip_space(self) -> bool:
        """Skips whitespace; says whether there was any."""
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.pos > start

    def word(self) -> str:
        """A key or a value: characters other than whitespace and ,=!() (may be empty)."""
        start = self.pos
        text = self.text
        while self.pos < len(text) and not text[self.pos].isspace() and text[self.pos] not in _NOT_KEY:
            self.pos += 1
        return text[start : self.pos]

    def key(self) -> str:
        key = self.word()
        if not key:
            raise self.fail("a label key is missing")
        return key

    def take(self, literal: str) -> bool:
        if self.text.startswith(literal, self.pos):
            self.pos += len(literal)
            return True
        return False

    def set_operator(self) -> str:
        """``in`` or ``notin`` followed by optional whitespace and ``(``; else "" and nothing consumed."""
        for op in ("notin", "in"):
            if self.text.startswith(op, self.pos):
                after = self.pos + len(op)
                while after < len(self.text) and self.text[after].isspace():
                    after += 1
                if self.text.startswith("(", after):
                    self.pos = after + 1
                    return op
        return ""

    def set_values(self) -> frozenset[str]:
        end = self.text.find(")", self.pos)
        if end < 0:
            raise self.fail("a value set is not closed with ')'")
        values = [v.strip() for v in self.text[self.pos : end].split(",")]
        self.pos = end + 1
        kept = frozenset(v for v in values if v)
        if len(kept) > MAX_SET_VALUES:
            raise InvalidField(self.field, f"a value set has more than {MAX_SET_VALUES} values")
        return kept

    def requirement(self) -> Requirement:
        if self.take("!"):
            self.skip_space()
            return Requirement(self.key(), "!exists")
        key = self.key()
        spaced = self.skip_space()
        for literal, op in (("==", "="), ("!=", "!="), ("=", "=")):
            if self.take(literal):
                self.skip_space()
                return Requirement(key, op, frozenset([self.word()]))
        setop = self.set_operator() if spaced else ""
        if setop:
            return Requirement(key, setop, self.set_values())
        return Requirement(key, "exists")


def parse_selector(text: str, *, field: str = "label_selector") -> Selector:
    """Parses ``key=value``, ``key==value``, ``key!=value``, ``key``, ``!key``,
    ``key in (a, b)`` and ``key notin (a, b)``, separated by commas (a trailing
    comma is allowed). Linear time; at most MAX_SELECTOR_CHARS characters and
    MAX_REQUIREMENTS requirements."""
    if len(text) > MAX_SELECTOR_CHARS:
        raise InvalidField(field, f"longer than {MAX_SELECTOR_CHARS} characters")
    scan = _Scanner(text, field)
    scan.skip_space()
    requirements: list[Requirement] = []
    while not scan.at_end():
        if len(requirements) == MAX_REQUIREMENTS:
            raise InvalidField(field, f"more than {MAX_REQUIREMENTS} requirements")
        requirements.append(scan.requirement())
        scan.skip_space()
        if scan.at_end():
            break
        if not scan.take(","):
            raise scan.fail("cannot parse")
        scan.skip_space()
    return Selector(tuple(requirements))
