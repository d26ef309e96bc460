"""Kubernetes-style label selectors: parse once, match many."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sandhub.errors import InvalidField

_TOKEN = re.compile(
    r"\s*(?:(?P<not>!)\s*(?P<nkey>[^\s,=!()]+)"
    r"|(?P<key>[^\s,=!()]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[^\s,=!()]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?)\s*(?:,|$)"
)


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


def parse_selector(text: str, *, field: str = "label_selector") -> Selector:
    text = text.strip()
    if not text:
        return Selector()
    if len(text) > 4096:
        raise InvalidField(field, "longer than 4096 characters")
    requirements: list[Requirement] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise InvalidField(field, f"cannot parse {text[pos:]!r}; expected key=value, key!=value, key, !key, key in (a,b)")
        pos = m.end()
        if m["nkey"]:
            requirements.append(Requirement(m["nkey"], "!exists"))
        elif m["setop"]:
            values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
            requirements.append(Requirement(m["key"], m["setop"], values))
        elif m["op"]:
            op = "!=" if m["op"] == "!=" else "="
            requirements.append(Requirement(m["key"], op, frozenset([m["value"]])))
        else:
            requirements.append(Requirement(m["key"], "exists"))
    return Selector(tuple(requirements))
