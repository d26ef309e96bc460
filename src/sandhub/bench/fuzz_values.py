"""Random and boundary values for any protobuf message, from its descriptor.

The request fuzzer (`sandhub.bench.fuzz`) fills requests with these: every
field of every message (nested messages, oneofs, maps, repeated fields, enums
with numbers the enum does not name) gets empty, huge, hostile or random
values. ``Values`` draws everything from one ``random.Random`` so a seed
replays the same requests. A byte budget per request keeps the huge values to
a few MiB in total (the Hub's receive limit is 4 MiB a message).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor as d
from google.protobuf.message import Message

INT32 = (-(1 << 31), (1 << 31) - 1)
INT64 = (-(1 << 63), (1 << 63) - 1)
UINT32 = (0, (1 << 32) - 1)
UINT64 = (0, (1 << 64) - 1)
_RANGES = {
    d.FieldDescriptor.TYPE_INT32: INT32, d.FieldDescriptor.TYPE_SINT32: INT32, d.FieldDescriptor.TYPE_SFIXED32: INT32,
    d.FieldDescriptor.TYPE_INT64: INT64, d.FieldDescriptor.TYPE_SINT64: INT64, d.FieldDescriptor.TYPE_SFIXED64: INT64,
    d.FieldDescriptor.TYPE_UINT32: UINT32, d.FieldDescriptor.TYPE_FIXED32: UINT32,
    d.FieldDescriptor.TYPE_UINT64: UINT64, d.FieldDescriptor.TYPE_FIXED64: UINT64,
}

PATHS = (
    "", ".", "..", "../", "../../../../etc/passwd", "/", "//", "/etc/shadow", "/etc/hostname", "/proc/1/environ",
    "/proc/self/cmdline", "/proc/self/mem", "/proc/kcore", "/sys/kernel", "/dev/zero", "/dev/urandom", "/dev/null",
    "/dev/tty", "/tmp", "/tmp/", "/tmp/../../root", "a/b/c/../../..", "./a", "a//b", "a/./b", "~", "~root/.ssh",
    "\x00", "a\x00b", "/tmp/a\x00/../../etc", "-", "--help", "*", "?", "[", "\\", "a\\..\\b", "\n", " ", "\t",
    "a" * 255, "a" * 256, "/" + "a/" * 2048, "é", "\u202etxt.exe", "\ufeff", "CON", "nul",
)
STRINGS = (
    "", " ", "a", "0", "-1", "true", "null", "None", "%s%n%x", "{}", "${HOME}", "$(id)", "`id`", "'", '"', ";", "|",
    "&&", "\x00", "\x01\x02\x7f", "\r\n", "é", "日本語", "😀", "\U0010ffff", "\u200b", "\u202e", "\ufffd",
    "sandhub.dev/owner", "a/b/c", "x" * 63, "x" * 64, "x" * 129, "x" * 4096,
    "key=value", "a,b", "!a", "a in (b)", "a notin ()", "a==b,c!=d", "=", "==", "!=", "(", ")", "a in (", ",,",
    "a" + " " * 4094 + "i", "a " * 2000, "a=" + "b" * 70,
    "cnt-000000000000", "cnt-", "cnt-zzzzzzzzzzzz", "CNT-ABCDEFGHIJKL", "tenant-b", "host", "default", "internet",
) + PATHS
SHELLS = (
    "true", "exit 3", "echo hi", "echo $$ $PPID", "cat /proc/1/environ | tr '\\0' '\\n'", "ls /", "id",
    "head -c 3000000 /dev/zero", "yes | head -n 200000", "kill -9 $$", "kill -TERM $$", "exec 1>&-; echo x",
    "echo err >&2; exit 1", "sleep 0.2", "ulimit -a", "printf '\\0\\1\\2'", "cd /nonexistent", "exec /nonexistent",
    "umask 777; mkdir -p d; chmod 000 d", "cat /dev/null", "echo $((1<<62))", "read x; echo $x",
)
Field = Any
"""A google.protobuf FieldDescriptor (the stubs split it into a Python and a
upb type that don't mix)."""
UNICODE_RANGES = ((0x20, 0x7E), (0xA0, 0x2FF), (0x400, 0x4FF), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F))


@dataclass
class Budget:
    """Bytes of huge values one request may still get."""

    left: int

    def take(self, n: int) -> int:
        n = max(0, min(n, self.left))
        self.left -= n
        return n


class Values:
    """Random and boundary values, from one Random.

    ``ids`` are strings worth trying wherever a string goes (the tenant's own
    container ids, another tenant's, process ids that exist); they make a
    random request more likely to pass the first checks.
    """

    def __init__(self, rng: random.Random, *, ids: Sequence[str] = (), budget_bytes: int = 3 << 20) -> None:
        self.rng = rng
        self.ids = tuple(ids)
        self.budget = Budget(budget_bytes)

    # Scalars -----------------------------------------------------------------

    def integer(self, lo: int, hi: int) -> int:
        r = self.rng.random()
        if r < 0.4:
            edges = [lo, hi, 0, 1, -1, 2, 7, 63, 64, 255, 256, 420, 0o777, 0o7777, 1000, 1001, 1024, 4096, 65535,
                     65536, 1 << 20, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, lo + 1, hi - 1]
            return self.rng.choice([e for e in edges if lo <= e <= hi])
        if r < 0.7:
            return self.rng.randint(max(lo, -100), min(hi, 100))
        if r < 0.85:
            bits = self.rng.randint(1, 63)
            value = self.rng.getrandbits(bits)
            return max(lo, min(hi, -value if lo < 0 and self.rng.random() < 0.5 else value))
        return self.rng.randint(lo, hi)

    def text(self) -> str:
        r = self.rng.random()
        if r < 0.35:
            return self.rng.choice(STRINGS)
        if r < 0.5 and self.ids:
            return self.rng.choice(self.ids)
        if r < 0.6:
            return self.huge_text()
        if r < 0.7:
            return self.rng.choice(STRINGS) + self.rng.choice(STRINGS)
        n = self.length(64)
        lo, hi = self.rng.choice(UNICODE_RANGES)
        return "".join(chr(self.rng.randint(lo, hi)) for _ in range(n))

    def huge_text(self) -> str:
        n = self.budget.take(self.rng.choice((300, 1 << 12, 1 << 16, 1 << 20, 3 << 20)))
        unit = self.rng.choice(("a", "é", "/", "../", "\x00", " ", "😀", "k=v,"))
        return (unit * (n // len(unit.encode()) + 1))[: max(0, n // len(unit.encode()))]

    def data(self) -> bytes:
        r = self.rng.random()
        if r < 0.2:
            return b""
        if r < 0.3:
            return b"\x00" * self.length(4096)
        if r < 0.45:
            n = self.budget.take(self.rng.choice((1 << 16, 1 << 20, (1 << 20) + 1, 2 << 20, 3 << 20)))
            return bytes([self.rng.randrange(256)]) * n
        if r < 0.6:
            return self.rng.choice(STRINGS).encode()
        return self.rng.randbytes(self.length(4096))

    def length(self, typical: int) -> int:
        """A length: mostly small, sometimes the typical maximum or just past it."""
        r = self.rng.random()
        if r < 0.6:
            return self.rng.randint(0, 16)
        if r < 0.9:
            return self.rng.randint(0, typical)
        return self.rng.choice((typical - 1, typical, typical + 1))

    # Messages ----------------------------------------------------------------

    def message(self, cls: type[Message], *, depth: int = 0, fill: float = 0.6) -> Message:
        """A message of ``cls`` with each field set with probability ``fill``."""
        msg = cls()
        self.fill(msg, depth=depth, fill=fill)
        return msg

    def fill(self, msg: Message, *, depth: int = 0, fill: float = 0.6) -> None:
        desc: Any = msg.DESCRIPTOR
        chosen_oneof: dict[str, str] = {}
        for oneof in desc.oneofs:
            if self.rng.random() < fill and oneof.fields:
                chosen_oneof[oneof.name] = self.rng.choice(oneof.fields).name
        for field in desc.fields:
            oneof = field.containing_oneof
            if oneof is not None and not oneof.name.startswith("_"):
                if chosen_oneof.get(oneof.name) != field.name:
                    continue
            elif self.rng.random() >= fill:
                continue
            self.set_field(msg, field, depth=depth)

    def set_field(self, msg: Message, field: Field, *, depth: int = 0) -> None:
        """Gives ``field`` of ``msg`` a random value (replacing what it had)."""
        msg.ClearField(field.name)
        if _is_map(field):
            self._fill_map(msg, field, depth)
        elif field.is_repeated:
            self._fill_repeated(msg, field, depth)
        elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
            sub = getattr(msg, field.name)
            sub.SetInParent()
            if depth < 4:
                self.fill(sub, depth=depth + 1)
            if field.message_type.full_name == "google.protobuf.Duration":
                self.duration(sub)
        else:
            setattr(msg, field.name, self.scalar(field))

    def scalar(self, field: Field) -> object:
        t = field.type
        if t == d.FieldDescriptor.TYPE_STRING:
            return self.text()
        if t == d.FieldDescriptor.TYPE_BYTES:
            return self.data()
        if t == d.FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t == d.FieldDescriptor.TYPE_ENUM:
            return self.enum(field.enum_type)
        if t in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
            return self.rng.choice((0.0, -1.0, 1e308, float("inf"), float("nan"), self.rng.uniform(-1e9, 1e9)))
        lo, hi = _RANGES[t]
        return self.integer(lo, hi)

    def enum(self, enum: Any) -> int:
        """A named value mostly; else a number the enum does not name (proto3
        enums are open: the receiver must cope)."""
        if self.rng.random() < 0.75:
            return int(self.rng.choice(enum.values).number)
        return self.rng.choice((-1, 99, 1 << 20, INT32[0], INT32[1], max(v.number for v in enum.values) + 1))

    def duration(self, msg: Message) -> None:
        """Durations in and far out of range (seconds beyond +-10,000 years,
        nanos over a second or of the other sign)."""
        r = self.rng.random()
        if r < 0.3:
            msg.seconds, msg.nanos = self.rng.randint(0, 30), self.rng.choice((0, 500_000_000))  # type: ignore[attr-defined]
        elif r < 0.8:
            msg.seconds = self.rng.choice((0, -1, 1, 59, 60, 3600, 86400, 86401, 315_576_000_000, 315_576_000_001,  # type: ignore[attr-defined]
                                           -315_576_000_001, INT64[0], INT64[1], 1 << 40))
            msg.nanos = self.rng.choice((0, 1, -1, 999_999_999, 1_000_000_000, -1_000_000_000, INT32[0], INT32[1]))  # type: ignore[attr-defined]

    def _fill_repeated(self, msg: Message, field: Field, depth: int) -> None:
        n = self.rng.choice((0, 1, 1, 2, 3, self.rng.randint(0, 20), 1000, 20000))
        if n > 100:  # many items: small ones, within the budget
            n = max(1, self.budget.take(n * 8) // 8)
        container = getattr(msg, field.name)
        for _ in range(n):
            if field.type == d.FieldDescriptor.TYPE_MESSAGE:
                sub = container.add()
                if depth < 4 and n <= 100:
                    self.fill(sub, depth=depth + 1)
            elif n > 100:
                container.append(self._small(field))
            else:
                container.append(self.scalar(field))

    def _fill_map(self, msg: Message, field: Field, depth: int) -> None:
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        n = self.rng.choice((0, 1, 2, 3, self.rng.randint(0, 20), 300, 5000))
        if n > 100:
            n = max(1, self.budget.take(n * 16) // 16)
        container = getattr(msg, field.name)
        for i in range(n):
            key = self.scalar(key_field) if n <= 100 else f"K{i}_{self.rng.randrange(1 << 30)}"
            if value_field.type == d.FieldDescriptor.TYPE_MESSAGE:
                sub = container[key]
                if depth < 4:
                    self.fill(sub, depth=depth + 1)
            else:
                container[key] = self.scalar(value_field) if n <= 100 else self._small(value_field)

    def _small(self, field: Field) -> object:
        """A cheap value of the field's type, for the 'many items' case."""
        if field.type == d.FieldDescriptor.TYPE_STRING:
            return self.rng.choice(("", "a", "x" * 8, "é"))
        if field.type == d.FieldDescriptor.TYPE_BYTES:
            return b"x"
        return self.scalar(field)


def _is_map(field: Field) -> bool:
    return bool(field.type == d.FieldDescriptor.TYPE_MESSAGE and field.is_repeated
                and field.message_type.GetOptions().map_entry)


def mutable_fields(msg: Message, *, depth: int = 0) -> list[tuple[Message, Field]]:
    """Every (message, field) reachable in ``msg``: its own fields, and those of
    the sub-messages it has set. A mutation picks one and changes it."""
    found: list[tuple[Message, Field]] = []
    for field in msg.DESCRIPTOR.fields:
        found.append((msg, field))
        if (field.type == d.FieldDescriptor.TYPE_MESSAGE and not field.is_repeated
                and msg.HasField(field.name) and depth < 4):
            found.extend(mutable_fields(getattr(msg, field.name), depth=depth + 1))
    return found


def compact(msg: Message, *, limit: int = 600) -> str:
    """A short, replayable-looking repr: long strings and bytes are shown as a
    prefix plus their length, many items as a count."""
    text = _compact(msg, 0)
    return text if len(text) <= limit else text[:limit] + f"...[{len(text) - limit} more]"


def _value(v: object, depth: int) -> str:
    if isinstance(v, Message):
        return _compact(v, depth + 1)
    if isinstance(v, (str, bytes)):
        if len(v) > 40:
            return f"{v[:24]!r}+{len(v) - 24}"
        return repr(v)
    return repr(v)


def _compact(msg: Message, depth: int) -> str:
    if depth > 5:
        return "{...}"
    parts = []
    for field, value in msg.ListFields():
        if _is_map(field):
            items = list(value.items())
            shown = ", ".join(f"{_value(k, depth)}: {_value(v, depth)}" for k, v in items[:3])
            more = f", ...{len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{field.name}={{{shown}{more}}}")
        elif field.is_repeated:
            items = list(value)
            shown = ", ".join(_value(v, depth) for v in items[:3])
            more = f", ...{len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{field.name}=[{shown}{more}]")
        else:
            parts.append(f"{field.name}={_value(value, depth)}")
    return f"{msg.DESCRIPTOR.name}({', '.join(parts)})"
