"""Background processes: proto views and re-attaching to their output.

The driver keeps the processes and their output (they belong to the
container, so they outlive the Hub); this module turns its dataclasses into
messages and streams output from the caller's offsets.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from google.protobuf import timestamp_pb2

from hub_service.exec.commands import command_proto, exit_status
from orchestrator_service.backends.exec_base import ExecDriver, ProcessInfo, Stream
from sandhub.config import ExecLimits
from sandhub.errors import InvalidField
from sandhub.exec.v1 import exec_pb2 as pb

PROCESS_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
"""The contract's process id: 1-63 of [a-z0-9-], starting alphanumeric (a DNS
label's alphabet, so every backend can name things after it)."""
POLL_S = 0.05
"""How often a following attach looks for new output."""
READ_BYTES = 256 * 1024


def check_process_id(process_id: str) -> str:
    if not PROCESS_ID.match(process_id):
        raise InvalidField("process_id", "1-63 characters of [a-z0-9-], starting with a lower-case letter or digit")
    return process_id


def _ts(seconds: float) -> timestamp_pb2.Timestamp | None:
    if not seconds:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def process_proto(container_id: str, p: ProcessInfo) -> pb.Process:
    msg = pb.Process(
        process_id=p.process_id, container_id=container_id, command=command_proto(p.command),
        state=pb.PROCESS_STATE_RUNNING if p.exit is None else pb.PROCESS_STATE_EXITED,
        pid=p.pid, stdout_bytes=p.stdout_bytes, stderr_bytes=p.stderr_bytes,
        stdout_first_offset=p.stdout_first_offset, stderr_first_offset=p.stderr_first_offset,
        start_time=_ts(p.start_time), end_time=_ts(p.end_time),
    )
    if p.exit is not None:
        msg.exit_status.CopyFrom(exit_status(p.exit))
    return msg


async def attach(
    driver: ExecDriver, container_id: str, request: pb.AttachProcessRequest, limits: ExecLimits
) -> AsyncIterator[pb.AttachProcessResponse]:
    """Output from the asked offsets; with ``follow``, new output until the
    process exits, then its exit status."""
    for field, offset in (("stdout_offset", request.stdout_offset), ("stderr_offset", request.stderr_offset)):
        if offset < 0:
            raise InvalidField(field, "must not be negative")
    pid = check_process_id(request.process_id)
    offsets: dict[Stream, int] = {"stdout": request.stdout_offset, "stderr": request.stderr_offset}
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    while True:
        info = await driver.get_background(container_id=container_id, process_id=pid)
        sent = False
        for stream in ("stdout", "stderr"):
            while True:
                got = await driver.read_output(container_id=container_id, process_id=pid, stream=stream,
                                               offset=offsets[stream], max_bytes=READ_BYTES)
                if not got.data:
                    break
                chunk = pb.OutputChunk(offset=got.offset, data=got.data, dropped_before=got.dropped_before)
                yield (pb.AttachProcessResponse(stdout=chunk) if stream == "stdout"
                       else pb.AttachProcessResponse(stderr=chunk))
                offsets[stream] = got.offset + len(got.data)
                sent = True
        if info.exit is not None:
            # Output read after the exit was seen is complete.
            yield pb.AttachProcessResponse(exit_status=exit_status(info.exit))
            return
        if not request.follow:
            return
        if sent:
            last_sent = loop.time()
        elif loop.time() - last_sent >= limits.keepalive_s:
            yield pb.AttachProcessResponse(keepalive=pb.Keepalive())
            last_sent = loop.time()
        await asyncio.sleep(POLL_S)
