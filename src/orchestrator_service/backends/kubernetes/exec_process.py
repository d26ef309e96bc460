"""A command running in a pod through one exec session (RunningProcess).

A reader thread takes frames off the websocket and hands them to the event
loop through a small bounded queue: when the caller stops reading, the
thread stops too, the socket's window fills, and the command blocks on its
next write, so nothing piles up in memory (the interface's flow control).
The first stdout line is the wrapper's (scripts.WRAP): the command's pid,
or why it could not start; it is never passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal as signals
import threading
from collections.abc import Awaitable, Callable

from orchestrator_service.backends.exec_base import ExitInfo, OutputChunk, PtySize, Stream
from orchestrator_service.backends.kubernetes import exec_ws
from orchestrator_service.backends.kubernetes.exec_ws import ChannelSocket

QUEUE = 16
"""Frames buffered between the socket and the reader (each at most ~32 KiB)."""

Signaller = Callable[[int, int], Awaitable[None]]
"""(pid, signum) -> sends the signal through another exec session."""


class StartError(Exception):
    """The wrapper said the command can't start: ``reason`` is NOEXEC or NOCWD."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KubeProcess:
    def __init__(self, sock: ChannelSocket, *, tty: bool, signaller: Signaller, wrapped: bool = True) -> None:
        """``wrapped``: the command runs under scripts.WRAP and announces its pid."""
        self._sock = sock
        self._tty = tty
        self._signaller = signaller
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[OutputChunk | None] = asyncio.Queue(QUEUE)
        self._pending: OutputChunk | None = None
        self._exit: asyncio.Future[ExitInfo] = self._loop.create_future()
        self._started: asyncio.Future[int] = self._loop.create_future()
        self._head = bytearray()
        self._stdin_closed = False
        self._signalled: set[int] = set()
        self._killed = False
        if not wrapped:
            self._started.set_result(0)
        self._thread = threading.Thread(target=self._read_frames, name="k8s-exec-read", daemon=True)
        self._thread.start()
        self.pid = 0
        self.status_message = ""
        """What the status channel said, for errors (empty while running)."""

    async def started(self, timeout_s: float) -> None:
        """Waits for the wrapper's first line; raises StartError or TimeoutError."""
        self.pid = await asyncio.wait_for(asyncio.shield(self._started), timeout_s)

    # -- the reader thread -----------------------------------------------------------

    def _put(self, item: OutputChunk | None) -> bool:
        try:
            asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop).result()
            return True
        except (RuntimeError, asyncio.CancelledError, Exception):  # loop gone or process dropped
            return False

    def _set(self, fut: asyncio.Future[ExitInfo] | asyncio.Future[int], value: object) -> None:
        def done() -> None:
            if not fut.done():
                if isinstance(value, BaseException):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)  # type: ignore[arg-type]
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(done)

    def _read_frames(self) -> None:
        status = b""
        while (frame := self._sock.recv()) is not None:
            channel, data = frame
            if channel == exec_ws.STATUS:
                status += data
            elif channel in (exec_ws.STDOUT, exec_ws.STDERR) and data:
                if channel == exec_ws.STDOUT and not self._started.done():
                    data = self._take_head(data)
                    if not data:
                        continue
                stream: Stream = "stdout" if channel == exec_ws.STDOUT else "stderr"
                if not self._put(OutputChunk(stream, data)):
                    break
        self._sock.close()
        self.status_message = exec_ws.status_message(status)
        if not self._started.done():
            self._set(self._started, StartError("NOSTART"))
        self._set(self._exit, self._exit_info(status))
        self._put(None)

    def _take_head(self, data: bytes) -> bytes:
        """Splits the wrapper's first line off; returns what follows it."""
        self._head += data
        line, sep, rest = bytes(self._head).partition(b"\n")
        if not sep:
            return b""
        words = line.strip().decode(errors="replace").split()
        if len(words) == 2 and words[0] == "SANDHUB-PID" and words[1].isdigit():
            self._set(self._started, int(words[1]))
        else:
            self._set(self._started, StartError(words[0].removeprefix("SANDHUB-") if words else "NOSTART"))
        return rest

    def _exit_info(self, status: bytes) -> ExitInfo:
        code = exec_ws.exit_code_of(status)
        if code is None:
            code = 137 if self._killed else 255  # the session ended without a status
        sig = code - 128
        if sig in self._signalled or (self._killed and sig == signals.SIGKILL):
            return ExitInfo(signal=sig)
        return ExitInfo(exit_code=code)

    # -- RunningProcess --------------------------------------------------------------

    async def write_stdin(self, data: bytes) -> None:
        if self._stdin_closed or self._exit.done():
            raise BrokenPipeError("the process's stdin is closed")
        try:
            await asyncio.to_thread(self._sock.send, exec_ws.STDIN, data)
        except Exception as e:
            raise BrokenPipeError("the process's stdin is closed") from e

    async def close_stdin(self) -> None:
        if self._stdin_closed or self._exit.done():
            return
        self._stdin_closed = True
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._sock.close_channel, exec_ws.STDIN)

    async def read(self, max_bytes: int = 65536) -> OutputChunk | None:
        chunk = self._pending or await self._queue.get()
        self._pending = None
        if chunk is None:
            self._queue.put_nowait(None)  # stays at end of file
            return None
        if len(chunk.data) > max_bytes:
            self._pending = OutputChunk(chunk.stream, chunk.data[max_bytes:])
            chunk = OutputChunk(chunk.stream, chunk.data[:max_bytes])
        return chunk

    async def resize(self, size: PtySize) -> None:
        if self._tty and not self._exit.done():
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._sock.resize, size.rows, size.cols)

    async def signal(self, signum: int) -> None:
        if self.pid and not self._exit.done():
            self._signalled.add(signum)
            await self._signaller(self.pid, signum)

    async def wait(self) -> ExitInfo:
        return await asyncio.shield(self._exit)

    async def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        if self.pid and not self._exit.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._signaller(self.pid, signals.SIGKILL), 10)
        await asyncio.to_thread(self._sock.close)
        # Unblock a reader thread waiting for room in the queue.
        while not self._queue.empty():
            self._queue.get_nowait()
        await asyncio.to_thread(self._thread.join, 5)
