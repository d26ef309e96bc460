"""PutFiles and GetFiles, as small shell scripts run inside the container.

The scripts run with the container's own uid, root and limits, so the
container's isolation is what keeps a transfer inside it: a write can't reach
the host however the path is spelled. On top of that, paths are checked here
(no ``..``, nothing under /proc, /sys or /dev) and inside (no symlink on the
way to the file), and a file is written to a temporary name next to its
destination and renamed into place: it appears whole or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import posixpath
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from orchestrator_service.backends.exec_base import CommandSpec, ExecDriver, RunningProcess
from sandhub.config import ExecLimits
from sandhub.errors import (
    BackendError, ContainerNotRunning, InvalidField, InvalidStream, PathNotAllowed, PathNotFound, PayloadTooLarge, SandhubError,
)
from sandhub.exec.v1 import exec_pb2 as pb

WORK_DIR = "/work"
FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")
DEFAULT_MODE = 0o644
FILE_CHUNK = 1 << 20
"""Largest data message of a download (the contract allows 1 MiB)."""
MODE_BITS = 0o1777
"""Permission bits and sticky; setuid/setgid are dropped (they would mean nothing
under no_new_privs, and are a smell in an upload)."""

# $1 target (absolute, normalised), $2 mode (octal), $3 announced size or 0, $4 temp suffix.
# dd with 1 MiB blocks, not cat: busybox cat copies 4 KiB at a time and tops out
# near 300 MB/s here; dd moves what the (1 MiB) pipe holds in one go.
PUT_SCRIPT = r"""
t=$1; d=${t%/*}; [ -n "$d" ] || d=/
$BB mkdir -p "$d" 2>/dev/null || exit 10
[ "$($BB realpath "$d")" = "$d" ] || exit 11
if [ -d "$t" ] && [ ! -L "$t" ]; then exit 12; fi
tmp="$d/.sandhub-put-$4"
if ! why=$($BB dd of="$tmp" bs=1M 2>&1); then echo "$why" >&2; $BB rm -f "$tmp"; exit 13; fi
if [ "$3" -gt 0 ] && [ "$($BB stat -c %s "$tmp")" != "$3" ]; then $BB rm -f "$tmp"; exit 14; fi
# A symlink at the target is replaced, never followed (mv onto a link to a
# directory would put the file inside that directory).
if [ -L "$t" ]; then $BB rm -f "$t"; fi
$BB chmod "$2" "$tmp" && $BB mv -f "$tmp" "$t" || { $BB rm -f "$tmp"; exit 15; }
"""

# $1 path. Prints one header line "F <size> <mode>" or "D 0 <mode>", then the content.
GET_SCRIPT = r"""
p=$1
if [ -d "$p" ]; then
  echo "D 0 $($BB stat -c %a "$p")"; exec $BB tar -cf - -C "$p" .
elif [ -f "$p" ]; then
  [ -r "$p" ] || exit 21
  echo "F $($BB stat -c '%s %a' "$p")"
  if [ "$2" = tar ]; then exec $BB tar -cf - -C "${p%/*}/" "./${p##*/}"; fi
  exec $BB dd if="$p" bs=1M 2>/dev/null
else
  exit 20
fi
"""

PUT_ERRORS = {
    10: "cannot create the directory",
    11: "a symbolic link is on the way to it; not followed",
    12: "a directory is in the way",
    13: "writing failed (no space left in the container, or a read-only place)",
    15: "cannot put it in place (read-only place or permission denied)",
}


def check_path(path: str, *, field: str, base: str = WORK_DIR) -> str:
    """An absolute, normalised path inside the container, or PathNotAllowed."""
    if not path:
        raise InvalidField(field, "is empty")
    if "\0" in path:
        raise PathNotAllowed(field, "contains a NUL character")
    if ".." in path.split("/"):
        raise PathNotAllowed(field, "must not contain '..'")
    full = posixpath.normpath(path if path.startswith("/") else posixpath.join(base, path))
    if full.startswith("//"):
        full = "/" + full.lstrip("/")
    if any(full == r or full.startswith(r + "/") for r in FORBIDDEN_ROOTS):
        raise PathNotAllowed(field, f"{full} is a kernel filesystem, not the container's files")
    return full


def _shell(driver: ExecDriver, script: str, *args: str) -> CommandSpec:
    box = driver.toolbox
    sh = (box, "sh") if box else ("/bin/sh",)
    return CommandSpec(argv=(*sh, "-c", script, "sandhub", *args), env={"BB": box or "env"})


async def _drain(proc: RunningProcess, limit: int = 4096) -> bytes:
    kept = bytearray()
    while (chunk := await proc.read()) is not None:
        if len(kept) < limit:
            kept += chunk.data[: limit - len(kept)]
    return bytes(kept)


@dataclass
class _Upload:
    """One file being written: its process, what has been written so far."""

    path: str
    mode: int
    announced: int
    suffix: str
    proc: RunningProcess
    drain: asyncio.Task[bytes]
    sha: hashlib._Hash
    size: int = 0


class Uploader:
    def __init__(self, driver: ExecDriver, container_id: str, limits: ExecLimits, destination: str) -> None:
        self._driver = driver
        self._cid = container_id
        self._limits = limits
        self._dest = check_path(destination or WORK_DIR, field="start.destination")
        self._current: _Upload | None = None
        self.files: list[pb.FileInfo] = []
        self.total = 0

    async def begin(self, f: pb.PutFilesRequest.File) -> None:
        await self.finish()
        if len(self.files) >= self._limits.max_upload_files:
            raise PayloadTooLarge(f"at most {self._limits.max_upload_files} files per upload",
                                  limit=self._limits.max_upload_files)
        path = check_path(f.path, field="file.path", base=self._dest)
        if f.size > 0 and self.total + f.size > self._limits.max_upload_bytes:
            raise PayloadTooLarge(f"{f.path}: {f.size} bytes would exceed the upload limit of "
                                  f"{self._limits.max_upload_bytes} bytes", limit=self._limits.max_upload_bytes)
        mode = (f.mode & MODE_BITS) or DEFAULT_MODE
        suffix = secrets.token_hex(6)
        cmd = _shell(self._driver, PUT_SCRIPT, path, f"{mode:o}", str(max(f.size, 0)), suffix)
        proc = await self._driver.spawn(container_id=self._cid, command=cmd)
        self._current = _Upload(path, mode, max(f.size, 0), suffix, proc,
                                asyncio.ensure_future(_drain(proc)), hashlib.sha256())

    async def write(self, data: bytes) -> None:
        up = self._current
        if up is None:
            raise InvalidStream("data before a file message: announce each file with `file` first")
        if up.announced and up.size + len(data) > up.announced:
            raise InvalidStream(f"{up.path}: more bytes than the {up.announced} announced")
        if self.total + len(data) > self._limits.max_upload_bytes:
            raise PayloadTooLarge(f"the upload exceeds its limit of {self._limits.max_upload_bytes} bytes",
                                  limit=self._limits.max_upload_bytes)
        up.sha.update(data)
        up.size += len(data)
        self.total += len(data)
        try:
            await up.proc.write_stdin(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the script failed; finish() reports why

    async def finish(self) -> None:
        """Closes the current file and waits until it is in place."""
        up, self._current = self._current, None
        if up is None:
            return
        try:
            with contextlib.suppress(OSError):
                await up.proc.close_stdin()
            err = await up.drain
            info = await up.proc.wait()
        except BaseException:
            await self._discard(up)
            raise
        if info.exit_code == 14:
            raise InvalidStream(f"{up.path}: {up.size} bytes arrived, {up.announced} were announced")
        if info.exit_code == 13 and b"No space left" in err:
            raise PayloadTooLarge(f"{up.path}: no space left in the container", limit=0)
        if info.exit_code in PUT_ERRORS:
            # The caller's path can't be written (a link, a directory in the
            # way, a read-only place): theirs to change, not an internal fault.
            raise PathNotAllowed("file.path", f"{up.path}: {PUT_ERRORS[info.exit_code]}")
        if info.exit_code or info.signal:
            raise ContainerNotRunning(self._cid, "stopping") if info.signal == 9 else SandhubError(
                f"{up.path}: writing failed inside the container (exit {info.exit_code})")
        self.files.append(pb.FileInfo(path=up.path, size=up.size, mode=up.mode, sha256=up.sha.hexdigest()))

    async def abort(self) -> None:
        """Called when the stream fails: the file being written never appears."""
        up, self._current = self._current, None
        if up is not None:
            await self._discard(up)

    async def _discard(self, up: _Upload) -> None:
        await up.proc.kill()
        up.drain.cancel()
        tmp = posixpath.join(posixpath.dirname(up.path), f".sandhub-put-{up.suffix}")
        box = self._driver.toolbox
        rm = (box, "rm") if box else ("rm",)
        with contextlib.suppress(SandhubError, BackendError, OSError):
            proc = await self._driver.spawn(container_id=self._cid, command=CommandSpec(argv=(*rm, "-f", tmp)))
            await _drain(proc)
            await proc.wait()
            await proc.kill()


async def put_files(
    driver: ExecDriver, container_id: str, start: pb.PutFilesRequest.Start,
    requests: AsyncIterator[pb.PutFilesRequest], limits: ExecLimits,
) -> pb.PutFilesResponse:
    if start.format == pb.ARCHIVE_FORMAT_TAR:
        from hub_service.exec.tar_upload import put_tar

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
        await up.finish()
    except BaseException:
        await up.abort()
        raise
    return pb.PutFilesResponse(files=up.files, total_bytes=up.total)


async def get_files(
    driver: ExecDriver, container_id: str, request: pb.GetFilesRequest, limits: ExecLimits
) -> AsyncIterator[pb.GetFilesResponse]:
    path = check_path(request.path, field="path")
    tar = request.format == pb.ARCHIVE_FORMAT_TAR
    proc = await driver.spawn(container_id=container_id,
                              command=_shell(driver, GET_SCRIPT, path, "tar" if tar else "raw"))
    try:
        header = bytearray()
        pending = b""
        while b"\n" not in header:
            chunk = await proc.read(FILE_CHUNK)
            if chunk is None:
                break
            if chunk.stream == "stdout":
                header += chunk.data
        line, _, pending = bytes(header).partition(b"\n")
        if not line:
            info = await proc.wait()
            if info.exit_code == 20:
                raise PathNotFound(path)
            if info.exit_code == 21:
                raise PathNotAllowed("path", f"{path} is not readable by the container's user")
            raise SandhubError(f"cannot read {path} in the container (exit {info.exit_code})")
        kind, size, mode = line.decode().split()
        is_dir = kind == "D"
        if is_dir and request.format == pb.ARCHIVE_FORMAT_RAW:
            raise InvalidField("format", f"{path} is a directory: ask for TAR (or leave format unspecified)")
        yield pb.GetFilesResponse(info=pb.FileInfo(path=path, size=int(size), mode=int(mode, 8), is_dir=is_dir))
        if pending:
            yield pb.GetFilesResponse(data=pending)
        while (chunk := await proc.read(FILE_CHUNK)) is not None:
            if chunk.stream == "stdout":
                yield pb.GetFilesResponse(data=chunk.data)
        info = await proc.wait()
        if info.exit_code or info.signal:
            raise SandhubError(f"reading {path} failed inside the container (exit {info.exit_code})")
    finally:
        await proc.kill()
