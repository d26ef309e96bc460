"""PutFiles and GetFiles, as small shell scripts run inside the container.

Writing is uploader.py's (all or nothing, per-file atomic); TAR archives are
read by tar_upload.py. Reading: one script prints a header line, then the
file's bytes or a tar of the directory. Every way the script can fail maps to
a code of its own: a missing or vanished path is NOT_FOUND, an unreadable one
PATH_NOT_ALLOWED, a container out of processes RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog

from hub_service.exec.tar_upload import put_tar
from hub_service.exec.uploader import Uploader, check_path, fork_failed, pids_exhausted, shell
from orchestrator_service.backends.exec_base import ExecDriver, RunningProcess
from sandhub.config import ExecLimits
from sandhub.errors import (ContainerNotRunning, InvalidField, InvalidStream, PathNotAllowed, PathNotFound, SandhubError,
                            Timeout, clip)
from sandhub.exec.v1 import exec_pb2 as pb

log = structlog.get_logger("sandhub.hub.files")

FILE_CHUNK = 1 << 20
"""Largest data message of a download (the contract allows 1 MiB)."""
STDERR_KEPT = 4096
TAR_SIZE = -1
"""FileInfo.size of a download sent as a tar stream (its length is not known up front)."""

# $1 path, $2 "tar" or "raw". Prints one header line "F <size> <mode>" or
# "D 0 <mode>", then the content. Exit 20: no such path (or gone meanwhile),
# 21: not readable by the container's user, 22: neither file nor directory.
GET_SCRIPT = r"""
p=$1; d=${p%/*}; [ -n "$d" ] || d=/
if [ -d "$p" ]; then
  { [ -r "$p" ] && [ -x "$p" ]; } || { [ -e "$p" ] && exit 21; exit 20; }
  m=$($BB stat -c %a "$p") || exit 20
  echo "D 0 $m"; exec $BB tar -cf - -C "$p" .
elif [ -f "$p" ]; then
  [ -r "$p" ] || { [ -e "$p" ] && exit 21; exit 20; }
  m=$($BB stat -c '%s %a' "$p") || exit 20
  echo "F $m"
  if [ "$2" = tar ]; then exec $BB tar -cf - -C "$d/" "./${p##*/}"; fi
  exec $BB dd if="$p" bs=1M 2>/dev/null
elif [ -e "$p" ] && [ ! -d "$p" ] && [ ! -f "$p" ]; then
  exit 22
elif [ -d "$d" ] && [ ! -x "$d" ]; then
  exit 21
else
  exit 20
fi
"""


async def put_files(
    driver: ExecDriver, container_id: str, start: pb.PutFilesStart,
    requests: AsyncIterator[pb.PutFilesRequest], limits: ExecLimits,
) -> pb.PutFilesResponse:
    """Bounded by max_upload_s, which also tells the next upload when a
    temporary file is a leftover (uploader.stale_minutes)."""
    bound = asyncio.timeout(limits.max_upload_s)
    try:
        async with bound:
            return await _put_files(driver, container_id, start, requests, limits)
    except TimeoutError:
        if not bound.expired():
            raise
        raise Timeout(f"the upload took over {limits.max_upload_s:g}s, the most one may; nothing of it was "
                      "kept") from None


async def _put_files(
    driver: ExecDriver, container_id: str, start: pb.PutFilesStart,
    requests: AsyncIterator[pb.PutFilesRequest], limits: ExecLimits,
) -> pb.PutFilesResponse:
    if start.format == pb.ARCHIVE_FORMAT_TAR:
        return await put_tar(driver, container_id, start, requests, limits)
    up = Uploader(driver, container_id, limits, start.destination)
    try:
        async for request in requests:
            kind = request.WhichOneof("msg")
            if kind == "file":
                await up.begin(request.file)
            elif kind == "data":
                await up.write(request.data)
            elif kind == "start":
                raise InvalidStream("a second start message")
            else:
                raise InvalidStream("an empty message: set file or data")
        await up.commit()
    except BaseException:
        await up.abort()
        raise
    return pb.PutFilesResponse(files=up.files, total_bytes=up.total)


async def _read_failed(
    driver: ExecDriver, container_id: str, path: str, code: int, signal: int, err: bytes,
) -> SandhubError:
    """The error for a GET_SCRIPT that failed, before or after its header."""
    if signal == 9:
        return ContainerNotRunning(container_id, "TERMINATING")
    if fork_failed(err):
        return pids_exhausted(container_id)
    if code == 20 or b"No such file" in err:
        return PathNotFound(path)
    if code == 21 or b"Permission denied" in err:
        return PathNotAllowed("path", path, f"{clip(path)} (or something in it) is not readable by the container's user")
    if code == 22:
        return PathNotAllowed("path", path, f"{clip(path)} is neither a regular file nor a directory")
    if await driver.out_of_pids(container_id=container_id):  # its shell could not even say so
        return pids_exhausted(container_id)
    log.warning("files.read_failed", container_id=container_id, exit_code=code, signal=signal,
                stderr=clip(err.decode("utf-8", "replace")))
    return SandhubError(f"cannot read {clip(path)} in the container (exit {code}, signal {signal})")


async def _header(proc: RunningProcess, err: bytearray) -> tuple[bytes, bytes]:
    """The script's header line and what followed it in the same read."""
    header = bytearray()
    while b"\n" not in header and len(header) < 256:
        chunk = await proc.read(FILE_CHUNK)
        if chunk is None:
            break
        if chunk.stream == "stdout":
            header += chunk.data
        elif len(err) < STDERR_KEPT:
            err += chunk.data[:STDERR_KEPT - len(err)]
    line, _, pending = bytes(header).partition(b"\n")
    return line, pending


async def get_files(
    driver: ExecDriver, container_id: str, request: pb.GetFilesRequest, limits: ExecLimits
) -> AsyncIterator[pb.GetFilesResponse]:
    path = check_path(request.path, field="path")
    tar = request.format == pb.ARCHIVE_FORMAT_TAR
    proc = await driver.spawn(container_id=container_id,
                              command=shell(driver, GET_SCRIPT, path, "tar" if tar else "raw"))
    try:
        err = bytearray()
        line, pending = await _header(proc, err)
        parts = line.decode("ascii", "replace").split()
        if len(parts) != 3 or parts[0] not in ("D", "F") or not parts[1].isdigit() \
                or not parts[2] or parts[2].strip("01234567"):
            info = await proc.wait()
            raise await _read_failed(driver, container_id, path, info.exit_code or 20, info.signal, bytes(err))
        kind, size, mode = parts
        is_dir = kind == "D"
        if is_dir and request.format == pb.ARCHIVE_FORMAT_RAW:
            raise InvalidField("format", f"{clip(path)} is a directory: ask for TAR (or leave format unspecified)")
        # A tar stream (a directory, or a file asked as TAR) has no size known
        # before it ends: -1, as the contract says; raw bytes have the file's.
        streamed_tar = is_dir or tar
        yield pb.GetFilesResponse(info=pb.FileInfo(path=path, size=TAR_SIZE if streamed_tar else int(size),
                                                   mode=int(mode, 8), is_dir=is_dir))
        if pending:
            yield pb.GetFilesResponse(data=pending)
        while (chunk := await proc.read(FILE_CHUNK)) is not None:
            if chunk.stream == "stdout":
                yield pb.GetFilesResponse(data=chunk.data)
            elif len(err) < STDERR_KEPT:
                err += chunk.data[:STDERR_KEPT - len(err)]
        info = await proc.wait()
        if info.exit_code or info.signal:
            # Changed while being read (removed, made unreadable): the
            # caller's race, reported as what it found. tar and dd exit 1
            # when a file goes away under them.
            code = 20 if info.exit_code == 1 and not fork_failed(bytes(err)) \
                and b"Permission denied" not in err else info.exit_code
            raise await _read_failed(driver, container_id, path, code, info.signal, bytes(err))
    finally:
        await proc.kill()
