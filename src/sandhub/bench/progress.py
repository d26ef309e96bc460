"""A one-line progress bar on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def bar(done: int, total: int, width: int = 30) -> str:
    filled = width if total <= 0 else min(width, done * width // total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


class Progress:
    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool | None = None,
                 min_interval_s: float = 0.1) -> None:
        self._stream = stream or sys.stderr
        self._enabled = self._stream.isatty() if enabled is None else enabled
        self._total = total
        self._last = 0.0
        self._min_interval_s = min_interval_s
        self._drawn = False

    def update(self, *, done: int, in_flight: int, failed: int, force: bool = False) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self._min_interval_s and done < self._total:
            return
        self._last = now
        line = f"\r{bar(done, self._total)} {done}/{self._total} done, {in_flight} in flight, {failed} failed "
        self._stream.write(line)
        self._stream.flush()
        self._drawn = True

    def say(self, message: str) -> None:
        """A line of its own (e.g. "deleting 100 containers"), even without a terminal."""
        self.close()
        print(message, file=self._stream, flush=True)

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False
