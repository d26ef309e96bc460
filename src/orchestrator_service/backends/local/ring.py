"""A bounded output log in one file: a ring with one writer and any readers.

A background process's stdout (or stderr) is kept in a file of fixed size, so
a process that prints forever costs its container a fixed amount of disk, and
a reader can re-attach from any byte offset it saw before (as long as that
byte is still kept). The writer is the process's supervisor; readers are
other processes (the Hub's exec driver), so the file, not memory, is the
shared state, and nothing here locks.

Layout: a 32-byte header, then ``capacity`` data bytes. The byte at absolute
offset ``o`` (counted from the process's first output byte) lives at
``HEADER + o % capacity``. The header holds, little-endian:

    magic (8 bytes) | capacity (u64) | begun (u64) | total (u64)

``total`` is how many bytes were ever written completely; ``begun`` is how
many the writer has started to write. The writer raises ``begun`` before it
overwrites anything and ``total`` after, so while a write is in flight the
bytes below ``begun - capacity`` may be torn. A reader reads the header, then
the data, then the header again, and keeps only what is at or above
``begun - capacity`` by the second read: whatever the writer overwrote
meanwhile is dropped, never returned torn.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"SHRING1\n"
HEADER = struct.Struct("<8sQQQ")
COUNTERS = struct.Struct("<QQ")
COUNTERS_AT = 16
DEFAULT_CAPACITY = 1 << 20
"""1 MiB per stream: enough to re-attach to a dev server's recent log, small
enough that 64 background processes cost a container at most 128 MiB of disk."""


class RingError(Exception):
    """The file is not a ring (wrong magic or size)."""


@dataclass(frozen=True)
class RingState:
    capacity: int
    begun: int
    total: int

    @property
    def first_offset(self) -> int:
        """Offset of the oldest byte that is still kept (and not being overwritten)."""
        return max(0, self.begun - self.capacity)


@dataclass(frozen=True)
class RingRead:
    offset: int
    """Offset of data[0]."""
    data: bytes
    total: int
    """Bytes written so far, when this read began."""
    dropped_before: bool
    """True when bytes between the asked offset and ``offset`` are gone."""


class RingWriter:
    """Appends to a new ring file. One writer per file; not thread-safe."""

    def __init__(self, path: Path, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.total = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(self._fd, HEADER.size + capacity)  # sparse until written
            os.pwrite(self._fd, HEADER.pack(MAGIC, capacity, 0, 0), 0)
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, data: bytes) -> None:
        if not data:
            return
        end = self.total + len(data)
        tail = memoryview(data)[-self.capacity :]  # what a smaller ring can keep
        os.pwrite(self._fd, COUNTERS.pack(end, self.total), COUNTERS_AT)
        offset = end - len(tail)
        while tail:
            pos = offset % self.capacity
            n = os.pwrite(self._fd, tail[: self.capacity - pos], HEADER.size + pos)
            tail, offset = tail[n:], offset + n
        os.pwrite(self._fd, COUNTERS.pack(end, end), COUNTERS_AT)
        self.total = end

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _header(fd: int) -> RingState:
    raw = os.pread(fd, HEADER.size, 0)
    if len(raw) != HEADER.size:
        raise RingError("truncated ring header")
    magic, capacity, begun, total = HEADER.unpack(raw)
    if magic != MAGIC or capacity <= 0 or total > begun:
        raise RingError("not a ring file")
    return RingState(capacity, begun, total)


def ring_state(path: Path) -> RingState:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _header(fd)
    finally:
        os.close(fd)


def read_ring(path: Path, offset: int, max_bytes: int) -> RingRead:
    """Up to ``max_bytes`` from ``offset`` on (or from the oldest kept byte,
    when ``offset`` was dropped). Empty data when nothing newer exists yet."""
    if offset < 0 or max_bytes <= 0:
        raise ValueError("offset must be >= 0 and max_bytes > 0")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        before = _header(fd)
        cap = before.capacity
        start = max(offset, before.first_offset)
        end = min(before.total, start + max_bytes, start + cap)
        if start >= end:
            if offset >= before.total:  # nothing newer yet
                return RingRead(offset, b"", before.total, dropped_before=False)
            # Everything kept is being overwritten by one huge write right now.
            return RingRead(start, b"", before.total, dropped_before=True)
        parts, pos = [], start
        while pos < end:
            at = pos % cap
            n = min(end - pos, cap - at)
            parts.append(os.pread(fd, n, HEADER.size + at))
            pos += n
        data = b"".join(parts)
        after = _header(fd)
    finally:
        os.close(fd)
    valid_from = after.first_offset
    if valid_from > start:  # overwritten while we read
        data = data[valid_from - start :]
        start = min(valid_from, end)
    return RingRead(start, data, before.total, dropped_before=start > offset)
