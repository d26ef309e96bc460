"""PutFiles with a tar archive: spooled on the Hub, checked, then written file
by file through the same path as RAW uploads (atomic per file, sha256 each).

Spooling (memory up to 8 MiB, then a temporary file, never beyond the upload
limit) lets every member name be checked before anything is written, and
keeps one code path writing into containers. Regular files and directories
are taken; links, devices and fifos are refused: an archive must not plant a
symlink that a later upload would follow.
"""

from __future__ import annotations

import asyncio
import tarfile
import tempfile
from collections.abc import AsyncIterator
from typing import IO

from orchestrator_service.backends.exec_base import ExecDriver
from sandhub.config import ExecLimits
from sandhub.errors import InvalidField, InvalidStream, PathNotAllowed, PayloadTooLarge
from sandhub.exec.v1 import exec_pb2 as pb

SPOOL_IN_MEMORY = 8 << 20
READ_CHUNK = 1 << 20


async def _spool(requests: AsyncIterator[pb.PutFilesRequest], limits: ExecLimits) -> IO[bytes]:
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
    size = 0
    async for request in requests:
        kind = request.WhichOneof("msg")
        if kind != "data":
            spool.close()
            raise InvalidStream(f"a TAR upload carries only data messages after start, not {kind or 'an empty one'}")
        size += len(request.data)
        if size > limits.max_upload_bytes:
            spool.close()
            raise PayloadTooLarge(f"the archive exceeds the upload limit of {limits.max_upload_bytes} bytes",
                                  limit=limits.max_upload_bytes)
        spool.write(request.data)
    spool.seek(0)
    return spool


def _members(spool: IO[bytes]) -> list[tarfile.TarInfo]:
    try:
        with tarfile.open(fileobj=spool, mode="r:*") as archive:
            members = archive.getmembers()
    except tarfile.TarError as e:
        raise InvalidField("data", f"not a readable tar archive: {e}") from None
    for m in members:
        if not (m.isfile() or m.isdir()):
            raise PathNotAllowed("data", f"{m.name}: only regular files and directories are taken from archives")
    return members


async def put_tar(
    driver: ExecDriver, container_id: str, start: pb.PutFilesRequest.Start,
    requests: AsyncIterator[pb.PutFilesRequest], limits: ExecLimits,
) -> pb.PutFilesResponse:
    from hub_service.exec.files import Uploader

    spool = await _spool(requests, limits)
    try:
        members = await asyncio.to_thread(_members, spool)
        up = Uploader(driver, container_id, limits, start.destination)
        archive = tarfile.open(fileobj=spool, mode="r:*")
        try:
            for m in members:
                if not m.isfile():
                    continue
                await up.begin(pb.PutFilesRequest.File(path=m.name.lstrip("/") or m.name, mode=m.mode, size=m.size))
                src = archive.extractfile(m)
                assert src is not None  # a regular file
                while data := await asyncio.to_thread(src.read, READ_CHUNK):
                    await up.write(data)
            await up.finish()
        except BaseException:
            await up.abort()
            raise
        finally:
            archive.close()
        return pb.PutFilesResponse(files=up.files, total_bytes=up.total)
    finally:
        spool.close()
