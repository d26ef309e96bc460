"""PutFiles with a tar archive: read as it arrives, written as it is read.

The archive is never spooled on the Hub: tar_stream.TarReader turns the
incoming bytes into member headers and data with work linear in the bytes
(headers, pax records and long names capped before they are buffered), and
each regular file goes through the same Uploader as RAW uploads, straight
into the container under a temporary name. Directories are taken (their
paths checked) and come into being with the files in them; links, devices,
fifos and sparse files are refused: an archive must not plant a symlink that
a later upload would follow, nor expand a few KiB into gigabytes.

A refused member anywhere fails the whole upload, and the Uploader then
removes what this upload wrote so far: a failed upload leaves nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from hub_service.exec.tar_stream import Member, TarReader
from hub_service.exec.uploader import Uploader, check_path
from orchestrator_service.backends.exec_base import ExecDriver
from sandhub.config import ExecLimits
from sandhub.errors import InvalidStream, PayloadTooLarge
from sandhub.exec.v1 import exec_pb2 as pb

HEADERS_PER_MEMBER = 4
"""Headers a member may come with (its own, a pax header, a long name, a pax
global header): what bounds the reader's header count."""


async def _feed(up: Uploader, reader: TarReader, data: bytes) -> int:
    """Hands one message's bytes to the reader, and its members and data to the
    uploader; returns the number of members seen."""
    members = 0
    for item in reader.feed(data):
        if not isinstance(item, Member):
            await up.write(item)
            continue
        members += 1
        path = check_path(item.name.lstrip("/") or ".", field="data", base=up.destination)
        if item.kind == "file":
            await up.begin(pb.FileHeader(path=path, mode=item.mode, size=item.size), field="data")
        else:
            await up.finish()
    return members


async def put_tar(
    driver: ExecDriver, container_id: str, start: pb.PutFilesStart,
    requests: AsyncIterator[pb.PutFilesRequest], limits: ExecLimits,
) -> pb.PutFilesResponse:
    up = Uploader(driver, container_id, limits, start.destination)
    reader = TarReader(max_size=limits.max_upload_bytes, max_headers=HEADERS_PER_MEMBER * limits.max_upload_files)
    received = members = 0
    try:
        async for request in requests:
            kind = request.WhichOneof("msg")
            if kind != "data":
                raise InvalidStream(f"a TAR upload carries only data messages after start, not {kind or 'an empty one'}")
            received += len(request.data)
            if received > limits.max_upload_bytes:
                raise PayloadTooLarge(f"the archive exceeds the upload limit of {limits.max_upload_bytes} bytes",
                                      limit=limits.max_upload_bytes)
            members += await _feed(up, reader, request.data)
            if members > limits.max_upload_files:
                raise PayloadTooLarge(f"more than {limits.max_upload_files} entries in the archive",
                                      limit=limits.max_upload_files)
        reader.close()
        await up.commit()
    except BaseException:
        await up.abort()
        raise
    return pb.PutFilesResponse(files=up.files, total_bytes=up.total)
