"""Reading a pipe from the event loop without blocking it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

LIMIT = 1 << 20


def _never(data: bytes) -> bool:
    return False


async def read_pipe(fd: int, *, enough: Callable[[bytes], bool] = _never, chunk: int = 65536,
                    limit: int = LIMIT) -> bytes:
    """What ``fd`` gives until EOF, until ``enough(what was read so far)``,
    or past ``limit`` bytes, whichever comes first. Makes ``fd`` non-blocking."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    buf = bytearray()

    def on_readable() -> None:
        try:
            data = os.read(fd, chunk)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf.extend(data)
        if (not data or enough(bytes(buf)) or len(buf) > limit) and not done.done():
            done.set_result(bytes(buf))

    os.set_blocking(fd, False)
    loop.add_reader(fd, on_readable)
    try:
        return await done
    finally:
        loop.remove_reader(fd)
