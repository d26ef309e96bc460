"""An attached command of the local exec driver: the connection to its
supervisor (JSON lines plus passed fds) and the RunningProcess the Hub drives.

The command's own pipe (or PTY) fds are read and written here directly, with
the event loop's readiness callbacks: nothing is buffered between the command
and the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import termios
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from orchestrator_service.backends.exec_base import ExitInfo, OutputChunk, PtySize, RunningProcess, Stream
from sandhub.errors import InvalidField

log = structlog.get_logger("sandhub.local.exec")

KILL_WAIT_S = 5.0
F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20
"""Pipe capacity asked for (the default maximum, /proc/sys/fs/pipe-max-size)."""


class Channel:
    """JSON lines (with fds) over the unix socket to one supervisor."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._fds: list[int] = []
        self._eof = False
        self.closed = False

    async def send(self, message: dict[str, Any]) -> None:
        await asyncio.get_running_loop().sock_sendall(self._sock, json.dumps(message).encode() + b"\n")

    async def recv(self) -> tuple[dict[str, Any], list[int]] | None:
        while b"\n" not in self._buf:
            if self._eof or self.closed:
                return None
            await _wait_fd(self._sock.fileno(), writable=False, still_open=lambda: not self.closed)
            try:
                data, fds, _, _ = socket.recv_fds(self._sock, 65536, 4)
            except BlockingIOError:
                continue
            except OSError:
                data, fds = b"", []
            self._fds += fds
            self._eof = not data
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        fds, self._fds = self._fds, []
        message: dict[str, Any] = json.loads(line)
        return message, fds

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._sock.fileno())  # before close: the number may be reused
            loop.remove_writer(self._sock.fileno())
            self._sock.close()
            for fd in self._fds:
                os.close(fd)
            self._fds = []


async def _wait_fd(fd: int, *, writable: bool, still_open: Callable[[], bool], wake: list[asyncio.Future[None]] | None = None) -> None:
    """Waits until ``fd`` is ready. Whoever closes ``fd`` removes its
    registration first and wakes the waiter (``wake``); ``still_open`` tells
    the waiter not to touch the fd number afterwards."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if writable else loop.add_reader)(fd, on_ready)
    if wake is not None:
        wake.append(ready)
    try:
        await ready
    finally:
        if wake is not None and ready in wake:
            wake.remove(ready)
        if still_open():
            (loop.remove_writer if writable else loop.remove_reader)(fd)


class LocalProcess:
    """A RunningProcess (exec_base.py) whose pipes or PTY master are ours."""

    def __init__(self, channel: Channel, reply: dict[str, Any], fds: list[int], *, pty: bool,
                 on_close: Callable[[LocalProcess], None]) -> None:
        self._channel = channel
        self._pid = int(reply["pid"])
        self.host_pid = int(reply["host_pid"])
        """The process's pid on the host (its process group too): for tests and logs."""
        self._pty = fds[0] if pty else -1
        if pty:
            self._stdin = os.dup(fds[0])  # closing stdin must not close the output
            self._out: dict[Stream, int] = {"stdout": fds[0]}
        else:
            self._stdin, out, err = fds
            self._out = {"stdout": out, "stderr": err}
            for fd in fds:
                # 1 MiB pipes instead of 64 KiB: a bulk transfer (PutFiles,
                # GetFiles) then wakes the loop 16 times less per MiB.
                with contextlib.suppress(OSError):
                    fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)
        for fd in (self._stdin, *self._out.values()):
            os.set_blocking(fd, False)
        self._next: Stream = "stdout"
        self._closed = False
        self._wakes: list[asyncio.Future[None]] = []
        self._on_close = on_close
        self._exit: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self._watcher = asyncio.ensure_future(self._watch_exit())

    @property
    def pid(self) -> int:
        return self._pid

    async def _watch_exit(self) -> None:
        message = await self._channel.recv()
        if not self._exit.done():
            if message is None:
                log.warning("exec.supervisor_lost", host_pid=self.host_pid)
                self._exit.set_result(ExitInfo(signal=signal.SIGKILL))
            else:
                reply, fds = message
                for fd in fds:
                    os.close(fd)
                self._exit.set_result(ExitInfo(int(reply.get("exit_code", 0)), int(reply.get("signal", 0))))

    async def read(self, max_bytes: int = 65536) -> OutputChunk | None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        while not self._closed and self._out:
            order: list[Stream] = [self._next, "stderr" if self._next == "stdout" else "stdout"]
            for stream in order:
                fd = self._out.get(stream)
                if fd is None:
                    continue
                try:
                    data = os.read(fd, max_bytes)
                except BlockingIOError:
                    continue
                except OSError as e:
                    if e.errno != errno.EIO:  # EIO: a PTY whose other side is all closed
                        raise
                    data = b""
                if data:
                    self._next = order[1]  # the other stream goes first next time: fair
                    return OutputChunk(stream, data)
                self._drop(stream)
            if self._out:
                await self._wait_any_output()
        return None

    async def _wait_any_output(self) -> None:
        waiters = [asyncio.ensure_future(_wait_fd(fd, writable=False, still_open=self._is_open, wake=self._wakes))
                   for fd in self._out.values()]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    def _is_open(self) -> bool:
        return not self._closed

    def _drop(self, stream: Stream) -> None:
        fd = self._out.pop(stream)
        if fd != self._pty:  # the PTY master stays open for resize; _release closes it
            os.close(fd)

    async def write_stdin(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._stdin < 0 or self._closed:
                raise BrokenPipeError("the process's stdin is closed")
            try:
                view = view[os.write(self._stdin, view) :]
            except BlockingIOError:
                fd = self._stdin
                await _wait_fd(fd, writable=True, still_open=lambda: self._stdin == fd and not self._closed, wake=self._wakes)
            except OSError as e:
                if e.errno == errno.EIO:
                    raise BrokenPipeError("the process's terminal is closed") from e
                raise

    async def close_stdin(self) -> None:
        if self._stdin < 0 or self._closed:
            return
        if self._pty >= 0:
            with contextlib.suppress(OSError):
                os.write(self._stdin, b"\x04")  # the terminal's EOF (VEOF), read at a line start
        fd, self._stdin = self._stdin, -1
        asyncio.get_running_loop().remove_writer(fd)
        self._wake_all()  # a write_stdin waiting on it sees BrokenPipeError
        os.close(fd)

    async def resize(self, size: PtySize) -> None:
        if self._pty >= 0 and not self._closed:
            fcntl.ioctl(self._pty, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))

    async def signal(self, signum: int) -> None:
        if not 1 <= signum < signal.NSIG:
            raise InvalidField("signal", f"{signum} is not a signal number")
        if not self._exit.done() and not self._channel.closed:
            with contextlib.suppress(OSError):
                await self._channel.send({"signal": signum})

    async def wait(self) -> ExitInfo:
        return await asyncio.shield(self._exit)

    async def kill(self) -> None:
        if self._closed:
            return
        try:
            await self.signal(signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_WAIT_S):
                    await asyncio.shield(self._exit)
        finally:
            self._release()

    def _wake_all(self) -> None:
        for ready in list(self._wakes):
            if not ready.done():
                ready.set_result(None)

    def _release(self) -> None:
        """Closes everything; the supervisor, seeing EOF, SIGKILLs what is left of the group."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        fds = {fd for fd in (self._stdin, self._pty, *self._out.values()) if fd >= 0}
        for fd in fds:  # before closing: the numbers may be reused at once
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        self._closed = True
        self._wake_all()
        for fd in fds:
            os.close(fd)
        self._stdin, self._out = -1, {}
        self._watcher.cancel()
        self._channel.close()
        if not self._exit.done():
            self._exit.set_result(ExitInfo(signal=signal.SIGKILL))
        self._on_close(self)




if TYPE_CHECKING:  # mypy checks that the class fulfils the contract

    def _is_process(process: LocalProcess) -> RunningProcess:
        return process
