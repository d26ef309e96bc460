"""The bounded output ring (ring.py): offsets, wrapping, drops, and a reader
racing the writer never seeing torn bytes. Plain files in tmp_path."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from orchestrator_service.backends.local.ring import HEADER, RingError, RingWriter, read_ring, ring_state


def pattern(start: int, n: int) -> bytes:
    """Byte ``o`` of the stream is ``o % 251``: any misplaced or torn byte shows."""
    return bytes((start + i) % 251 for i in range(n))


def test_empty_ring(tmp_path: Path) -> None:
    RingWriter(tmp_path / "r", capacity=16).close()
    got = read_ring(tmp_path / "r", 0, 100)
    assert (got.offset, got.data, got.total, got.dropped_before) == (0, b"", 0, False)
    assert ring_state(tmp_path / "r").first_offset == 0
    assert os.path.getsize(tmp_path / "r") == HEADER.size + 16


def test_reads_from_any_offset_before_wrapping(tmp_path: Path) -> None:
    w = RingWriter(tmp_path / "r", capacity=16)
    w.write(b"hello ")
    w.write(b"world")
    assert read_ring(tmp_path / "r", 0, 100).data == b"hello world"
    part = read_ring(tmp_path / "r", 6, 3)
    assert (part.offset, part.data, part.dropped_before) == (6, b"wor", False)
    # Asking past the end gives nothing, at the asked offset: the caller polls.
    later = read_ring(tmp_path / "r", 11, 10)
    assert (later.offset, later.data, later.total) == (11, b"", 11)
    assert read_ring(tmp_path / "r", 50, 10).offset == 50


def test_wrapping_drops_the_oldest(tmp_path: Path) -> None:
    w = RingWriter(tmp_path / "r", capacity=10)
    for i in range(7):
        w.write(pattern(i * 3, 3))  # 21 bytes in all
    state = ring_state(tmp_path / "r")
    assert (state.total, state.first_offset) == (21, 11)
    got = read_ring(tmp_path / "r", 0, 100)
    assert (got.offset, got.data, got.dropped_before) == (11, pattern(11, 10), True)
    exact = read_ring(tmp_path / "r", 11, 4)
    assert (exact.offset, exact.data, exact.dropped_before) == (11, pattern(11, 4), False)
    across = read_ring(tmp_path / "r", 18, 100)  # crosses the file's end
    assert across.data == pattern(18, 3)


def test_a_write_larger_than_the_ring_keeps_its_tail(tmp_path: Path) -> None:
    w = RingWriter(tmp_path / "r", capacity=8)
    w.write(b"ab")
    w.write(pattern(2, 30))
    got = read_ring(tmp_path / "r", 0, 100)
    assert (got.offset, got.data, got.total) == (24, pattern(24, 8), 32)


def test_max_bytes_and_bad_arguments(tmp_path: Path) -> None:
    w = RingWriter(tmp_path / "r", capacity=64)
    w.write(pattern(0, 50))
    assert read_ring(tmp_path / "r", 5, 7).data == pattern(5, 7)
    with pytest.raises(ValueError):
        read_ring(tmp_path / "r", -1, 7)
    with pytest.raises(ValueError):
        read_ring(tmp_path / "r", 0, 0)
    with pytest.raises(ValueError):
        RingWriter(tmp_path / "other", capacity=0)
    with pytest.raises(FileExistsError):  # one writer per file, ever
        RingWriter(tmp_path / "r", capacity=64)


def test_not_a_ring(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"x" * 100)
    with pytest.raises(RingError):
        read_ring(tmp_path / "junk", 0, 10)


def test_reader_racing_the_writer_never_sees_torn_bytes(tmp_path: Path) -> None:
    path = tmp_path / "r"
    w = RingWriter(path, capacity=4096)
    done = threading.Event()

    def write() -> None:
        offset = 0
        for i in range(4000):
            n = 1 + (i * 37) % 3000
            w.write(pattern(offset, n))
            offset += n
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    try:
        while not done.is_set() or reads < 10:
            state = ring_state(path)
            for offset in (0, state.first_offset, max(0, state.total - 100)):
                got = read_ring(path, offset, 5000)
                assert got.data == pattern(got.offset, len(got.data))
                assert got.offset >= offset and got.dropped_before == (got.offset > offset)
                reads += 1
    finally:
        writer.join()
    final = read_ring(path, 0, 10_000)
    assert final.total == w.total and final.data == pattern(w.total - 4096, 4096)
