"""The Python clients half-close an Exec call when they read exit_status.

The Hub ends a finished Exec once its caller half-closes (or 2 s later, so a
caller still writing never loses its status to grpc/grpc#36066). A client that
waited for the end of the stream before half-closing would pay those 2 s on
every command, and a caller whose stdin is a terminal (``sandhub exec``) never
half-closes on its own. The fake service here never gives up waiting, so a
client that does not half-close hangs until the guard below fails the test.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import grpc
import pytest

from sandhub.client import AsyncClient, Client
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc

pytestmark = pytest.mark.timeout(60)

GUARD_S = 20


class WaitsForHalfClose(xpb_grpc.ExecServiceServicer):
    def __init__(self) -> None:
        self.after_exit: list[list[str]] = []

    async def Exec(self, request_iterator: AsyncIterator[xpb.ExecRequest],  # type: ignore[override]
                   context: grpc.aio.ServicerContext) -> AsyncIterator[xpb.ExecResponse]:
        first = await anext(aiter(request_iterator))
        assert first.WhichOneof("msg") == "start"
        yield xpb.ExecResponse(started=xpb.ExecStarted(pid=7))
        yield xpb.ExecResponse(stdout=b"hi\n")
        yield xpb.ExecResponse(exit_status=xpb.ExitStatus(exit_code=3))
        self.after_exit.append([r.WhichOneof("msg") or "" async for r in request_iterator])  # to the half-close


@pytest.fixture
async def fake() -> AsyncIterator[tuple[str, WaitsForHalfClose]]:
    server = grpc.aio.server()
    servicer = WaitsForHalfClose()
    xpb_grpc.add_ExecServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(0)


async def test_async_session_half_closes_at_exit_status(fake: tuple[str, WaitsForHalfClose]) -> None:
    target, servicer = fake
    async with AsyncClient(target) as hub:
        session = await hub.exec("cnt-x", ["sh"])
        async with asyncio.timeout(GUARD_S):
            out, _, status = await session.wait()
        await session.write(b"after the end: dropped, not an error\n")
    assert (out, status.exit_code, session.pid) == (b"hi\n", 3, 7)
    assert servicer.after_exit == [[]]


async def test_sync_session_half_closes_at_exit_status(fake: tuple[str, WaitsForHalfClose]) -> None:
    target, servicer = fake
    got: list[tuple[bytes, int]] = []

    def walk() -> None:
        with Client(target) as hub, hub.exec("cnt-x", ["sh"]) as session:
            out, _, status = session.wait()
            got.append((out, status.exit_code))

    thread = threading.Thread(target=walk, daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join, GUARD_S)
    assert not thread.is_alive(), "the sync session did not half-close after exit_status"
    assert got == [(b"hi\n", 3)] and servicer.after_exit == [[]]
