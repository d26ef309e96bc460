"""PutFiles with a tar archive: spooled on the Hub, checked, then written file
by file through the same path as RAW uploads (atomic per file, sha256 each).

Spooling (memory up to 8 MiB, then a temporary file, never beyond the upload
limit) lets every member name be checked before anything is written (headers
read one at a time, uncompressed archives only, at most max_upload_files), and
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


def _members(spool: IO[bytes], limits: ExecLimits, destination: str) -> list[tarfile.TarInfo]:
    """Every member, checked before anything is written: an uncompressed tar
    (a compressed one could expand without bound), at most max_upload_files
    files, each path allowed. Headers are read one by one, so a flood of tiny
    members stops at the limit instead of filling the Hub's memory."""
    from hub_service.exec.files import WORK_DIR, check_path

    base = check_path(destination or WORK_DIR, field="start.destination")
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(fileobj=spool, mode="r:") as archive:
            while (m := archive.next()) is not None:
                if not (m.isfile() or m.isdir()):
                    raise PathNotAllowed("data", f"{m.name}: only regular files and directories are taken from archives")
                check_path(m.name.lstrip("/") or ".", field="data", base=base)
                members.append(m)
                if len(members) > limits.max_upload_files:
                    raise PayloadTooLarge(f"more than {limits.max_upload_files} entries in the archive",
                                          limit=limits.max_upload_files)
    except tarfile.TarError as e:
        raise InvalidField("data", f"not a readable (uncompressed) tar archive: {e}") from None
    return members


async def put_tar(
    driver: ExecDriver, container_id: str, start: pb.PutFilesRequest.Start,
    requests: AsyncIterator[pb.PutFilesRequest], limits: ExecLimits,
) -> pb.PutFilesResponse:
    from hub_service.exec.files import Uploader

    spool = await _spool(requests, limits)
    try:
        members = await asyncio.to_thread(_members, spool, limits, start.destination)
        up = Uploader(driver, container_id, limits, start.destination)
        spool.seek(0)
        archive = tarfile.open(fileobj=spool, mode="r:")
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
