"""Reading a process's output with bounded memory, batched into few messages.

A pump task moves chunks from the driver into a small queue; when the queue is
full the pump stops reading, the pipe fills, and the process waits: that is the
flow control from a slow caller all the way back to the process. The consumer
batches what is queued (same stream, up to ``chunk_bytes``) after waiting
``window_s`` for more, so a program doing many small writes yields few messages.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from orchestrator_service.backends.exec_base import OutputChunk, RunningProcess

log = structlog.get_logger("sandhub.hub.exec")

QUEUE_CHUNKS = 8
"""Chunks held between the pipe and the caller: memory per stream is at most
this times chunk_bytes, plus one batch."""


class Idle:
    """Returned by ``next`` when nothing came within the keepalive interval."""


IDLE = Idle()


class OutputReader:
    def __init__(self, proc: RunningProcess, *, chunk_bytes: int, window_s: float) -> None:
        self._proc = proc
        self._chunk = chunk_bytes
        self._window_s = window_s
        self._queue: asyncio.Queue[OutputChunk | None] = asyncio.Queue(QUEUE_CHUNKS)
        self._pending: OutputChunk | None = None
        self._eof = False
        self._pump = asyncio.ensure_future(self._run_pump())

    async def _run_pump(self) -> None:
        try:
            while (chunk := await self._proc.read(self._chunk)) is not None:
                await self._queue.put(chunk)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # Reading failed (the driver lost the process): end the output;
            # the exit status says what happened.
            log.warning("exec.output_lost", error=str(e))
        await self._queue.put(None)

    async def next(self, *, idle_s: float | None = None) -> OutputChunk | Idle | None:
        """The next batch; IDLE after ``idle_s`` without output; None at the end."""
        if self._eof:
            return None
        first = self._pending
        self._pending = None
        if first is None:
            try:
                first = await asyncio.wait_for(self._queue.get(), idle_s)
            except TimeoutError:
                return IDLE
        if first is None:
            self._eof = True
            return None
        if self._window_s and len(first.data) < self._chunk and self._queue.empty():
            await asyncio.sleep(self._window_s)
        data = bytearray(first.data)
        while len(data) < self._chunk:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if nxt is None or nxt.stream != first.stream or len(data) + len(nxt.data) > self._chunk:
                self._pending = nxt
                if nxt is None:
                    self._pending = None
                    self._eof_next()
                break
            data += nxt.data
        return OutputChunk(first.stream, bytes(data))

    def _eof_next(self) -> None:
        # Put the end back so the following call returns None.
        self._queue.put_nowait(None)

    async def close(self) -> None:
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._pump
