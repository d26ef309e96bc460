"""One-shot runs (Run) and interactive sessions (Exec), on any exec driver."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from hub_service.exec.commands import exit_status, pty_size, signal_number
from hub_service.exec.output import OutputReader
from orchestrator_service.backends.exec_base import ExitInfo, OutputChunk, RunningProcess
from sandhub.budget import TenantBudget
from sandhub.config import ExecLimits
from sandhub.errors import InvalidStream
from sandhub.exec.v1 import exec_pb2 as pb

SIGKILL = 9
AFTER_EXIT_S = 0.2
"""Once the command itself has exited, how long output still in flight is
collected before whatever it left running (holding the pipes open) is killed.
Run and Exec are for commands that end; StartProcess is for ones that stay."""


class OutputAllowance:
    """The bytes of Run output one call may hold in the Hub's memory, taken
    from its tenant's budget as output comes in and given back when the call
    ends. It starts with ``first`` bytes, or QuotaExceeded when the tenant (or
    the Hub) has not even that much room: refused before the command runs."""

    def __init__(self, budget: TenantBudget, tenant: str, *, first: int) -> None:
        budget.take(tenant, first)
        self._budget = budget
        self._tenant = tenant
        self._held = first
        self._used = 0

    def grant(self, n: int) -> int:
        """How many of ``n`` more bytes may be kept (all, or what room is left)."""
        room = self._held - self._used
        if n > room:
            self._held += self._budget.take_upto(self._tenant, n - room)
            room = self._held - self._used
        got = min(n, room)
        self._used += got
        return got

    def close(self) -> None:
        self._budget.give_back(self._tenant, self._held)
        self._held = self._used = 0


@dataclass
class Capped:
    """Output kept up to ``limit`` bytes, and as far as the allowance grants;
    the rest is read and dropped (the stream is then truncated)."""

    limit: int
    allowance: OutputAllowance
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    truncated: bool = False

    def add(self, chunk: bytes) -> None:
        n = self.allowance.grant(min(len(chunk), max(self.limit - self.size, 0)))
        if n < len(chunk):
            self.truncated = True
            chunk = chunk[:n]
        if chunk:
            self.chunks.append(chunk)
            self.size += n

    def take(self) -> bytes:
        """The kept output in one piece; the pieces are let go (one copy at a time)."""
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data


async def _feed_stdin(proc: RunningProcess, data: bytes) -> None:
    try:
        if data:
            await proc.write_stdin(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the program did not want it all; that is its business
    finally:
        with contextlib.suppress(OSError):
            await proc.close_stdin()


async def run_once(
    proc: RunningProcess, *, stdin: bytes, timeout_s: float, max_output: int, allowance: OutputAllowance
) -> pb.RunResponse:
    """Feeds stdin, collects capped stdout/stderr, waits for the exit; kills
    the process group when ``timeout_s`` passes."""
    start_wall, start = time.time(), time.monotonic()
    out, err = Capped(max_output, allowance), Capped(max_output, allowance)
    feeder = asyncio.ensure_future(_feed_stdin(proc, stdin))
    timed_out = False

    async def collect() -> None:
        while (chunk := await proc.read()) is not None:
            (out if chunk.stream == "stdout" else err).add(chunk.data)

    reading = asyncio.ensure_future(collect())
    try:
        try:
            async with asyncio.timeout(timeout_s):
                info = await proc.wait()
                # Children it left behind may hold the pipes open: take what
                # is in flight, then end them.
                await asyncio.wait([reading], timeout=AFTER_EXIT_S)
        except TimeoutError:
            timed_out = True
            await proc.kill()
            info = await proc.wait()
        await proc.kill()
        await asyncio.wait([reading], timeout=AFTER_EXIT_S)
    finally:
        feeder.cancel()
        reading.cancel()
        await proc.kill()
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int((time.monotonic() - start) * 1e9))
    started = timestamp_pb2.Timestamp()
    started.FromNanoseconds(int(start_wall * 1e9))
    return pb.RunResponse(
        exit_status=exit_status(info, timed_out=timed_out),
        stdout=out.take(), stderr=err.take(),
        stdout_truncated=out.truncated, stderr_truncated=err.truncated,
        start_time=started, duration=duration,
    )


class ExecSession:
    """Drives one Exec stream: requests in, output and exit out."""

    def __init__(self, proc: RunningProcess, limits: ExecLimits, *, timeout_s: float) -> None:
        self._proc = proc
        self._limits = limits
        self._timeout_s = timeout_s
        self._failure: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._stdin_open = True

    async def _inputs(self, requests: AsyncIterator[pb.ExecRequest]) -> None:
        try:
            async for request in requests:
                await self._apply(request)
            # The caller half-closed the stream (done writing): nothing more
            # can come, so the command's stdin ends too, as with close_stdin.
            await self._close_stdin()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bad message (InvalidStream, InvalidField) ends the stream with its error
            if not self._failure.done():
                self._failure.set_result(e)

    async def _close_stdin(self) -> None:
        if self._stdin_open:
            self._stdin_open = False
            with contextlib.suppress(OSError):
                await self._proc.close_stdin()

    async def _apply(self, request: pb.ExecRequest) -> None:
        kind = request.WhichOneof("msg")
        proc = self._proc
        if kind == "stdin":
            if not self._stdin_open:
                raise InvalidStream("stdin after close_stdin")
            try:
                await proc.write_stdin(request.stdin)
            except (BrokenPipeError, ConnectionResetError):
                self._stdin_open = False  # the program closed it; drop the rest
        elif kind == "close_stdin":
            await self._close_stdin()
        elif kind == "resize":
            await proc.resize(pty_size(request.resize, field="resize"))
        elif kind == "signal":
            await proc.signal(signal_number(request.signal))
        elif kind == "start":
            raise InvalidStream("a second start message: one stream runs one command")
        else:
            raise InvalidStream("an empty message: set stdin, close_stdin, resize or signal")

    async def run(self, requests: AsyncIterator[pb.ExecRequest]) -> AsyncIterator[pb.ExecResponse]:
        proc = self._proc
        reader = OutputReader(proc, chunk_bytes=self._limits.chunk_bytes, window_s=self._limits.batch_window_s)
        inputs = asyncio.ensure_future(self._inputs(requests))
        exited = asyncio.ensure_future(proc.wait())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        timed_out = False
        exit_deadline = float("inf")
        nxt: asyncio.Future[Any] | None = None
        try:
            yield pb.ExecResponse(started=pb.ExecStarted(pid=proc.pid))
            leftovers_killed = False
            while True:
                now = loop.time()
                if now >= deadline:
                    timed_out = True
                    await proc.kill()
                    break
                wait_s: float | None = None
                if exited.done() and not leftovers_killed:
                    # The command ended; what it left running may hold the
                    # pipes open. Take what is in flight, then end them.
                    if exit_deadline == float("inf"):
                        exit_deadline = now + AFTER_EXIT_S
                    if now >= exit_deadline:
                        await proc.kill()
                        leftovers_killed = True
                    else:
                        wait_s = exit_deadline - now
                if nxt is None:
                    idle_s = min(self._limits.keepalive_s, max(deadline - now, 0.0))
                    nxt = asyncio.ensure_future(reader.next(idle_s=idle_s))
                waiting: list[asyncio.Future[Any]] = [nxt, self._failure]
                if not exited.done():
                    waiting.append(exited)
                await asyncio.wait(waiting, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
                if self._failure.done():
                    raise self._failure.result()
                if not nxt.done():
                    continue
                batch = nxt.result()
                nxt = None
                if batch is None:
                    break
                if not isinstance(batch, OutputChunk):
                    if loop.time() < deadline:
                        yield pb.ExecResponse(keepalive=pb.Keepalive())
                elif batch.stream == "stdout":
                    yield pb.ExecResponse(stdout=batch.data)
                else:
                    yield pb.ExecResponse(stderr=batch.data)
            info: ExitInfo = await proc.wait()
            yield pb.ExecResponse(exit_status=exit_status(info, timed_out=timed_out))
        finally:
            # Normal end, error, or the caller went away (cancelled): in every
            # case the process and its children go.
            inputs.cancel()
            exited.cancel()
            if nxt is not None:
                nxt.cancel()
            await reader.close()
            await proc.kill()
