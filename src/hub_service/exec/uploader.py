"""Writing files into a container for PutFiles (RAW and TAR alike).

Small shell scripts run inside the container with its own uid, root and
limits, so the container's isolation is what keeps a write inside it. On top
of that, paths are checked here (no ``..``, nothing under /proc, /sys or /dev,
at most PATH_MAX bytes) and inside (no symlink on the way to the file).

All or nothing: each file is written to a temporary name next to its
destination (``.sandhub-put-<random>``) as its bytes arrive; only when the
whole upload has arrived and every file is written are they moved into place
(first every target is checked, then each temporary file is renamed onto its
target). If anything fails before that -- a refused path or archive member,
a full disk, the caller going away -- the temporary files and the directories
this upload created are removed, and the container is as it was. The one gap:
if the container changes a target meanwhile or can't fork during the final
renames, files already moved stay and the rest are removed.

A Hub killed mid-upload can remove nothing: its temporary files stay, counted
against the container's disk, until the next upload into the same directory
removes those untouched for longer than any upload may last (stale_minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import posixpath
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

import structlog

from orchestrator_service.backends.exec_base import CommandSpec, ExecDriver, RunningProcess
from sandhub.config import ExecLimits
from sandhub.errors import (
    BackendError, ContainerNotRunning, InvalidField, InvalidStream, PathNotAllowed, PayloadTooLarge, QuotaExceeded,
    SandhubError, clip,
)
from sandhub.exec.v1 import exec_pb2 as pb

log = structlog.get_logger("sandhub.hub.files")

WORK_DIR = "/work"
FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")
MAX_PATH_BYTES = 4096
"""Linux's PATH_MAX: a longer path can't be opened anyway, and would not fit
in a command line to the scripts."""
DEFAULT_MODE = 0o644
MODE_BITS = 0o1777
"""Permission bits and sticky; setuid/setgid are dropped (they would mean nothing
under no_new_privs, and are a smell in an upload)."""
ARGV_BATCH_BYTES = 64 << 10
"""Paths passed to one run of the commit or cleanup script (well under the
kernel's argument limits)."""
TEMP_PREFIX = ".sandhub-put-"

# $1 target (absolute, normalised), $2 mode (octal), $3 announced size or 0, $4 temp suffix,
# $5 minutes after which a temporary file is a leftover (see stale_minutes).
# Prints the topmost directory it is about to create, if any (so a failed
# upload can remove it again), removes the leftovers of uploads whose Hub was
# killed (temporary files in the same directory untouched for $5 minutes),
# then writes the temporary file.
# dd with 1 MiB blocks, not cat: busybox cat copies 4 KiB at a time and tops out
# near 300 MB/s here; dd moves what the (1 MiB) pipe holds in one go.
STAGE_SCRIPT = r"""
t=$1; d=${t%/*}; [ -n "$d" ] || d=/
n=$d; top=
while [ ! -e "$n" ] && [ ! -L "$n" ]; do top=$n; n=${n%/*}; [ -n "$n" ] || n=/; done
if [ -n "$top" ]; then echo "$top"; fi
$BB mkdir -p "$d" 2>/dev/null || exit 10
[ "$($BB realpath "$d")" = "$d" ] || exit 11
if [ -d "$t" ] && [ ! -L "$t" ]; then exit 12; fi
$BB find "$d" -maxdepth 1 -type f -name '.sandhub-put-*' -mmin "+$5" -exec $BB rm -f {} \; 2>/dev/null
tmp="$d/.sandhub-put-$4"
if ! why=$($BB dd of="$tmp" bs=1M 2>&1); then echo "$why" >&2; $BB rm -f "$tmp"; exit 13; fi
if [ "$3" -gt 0 ] && [ "$($BB stat -c %s "$tmp")" != "$3" ]; then $BB rm -f "$tmp"; exit 14; fi
$BB chmod "$2" "$tmp" || { $BB rm -f "$tmp"; exit 15; }
"""

# $1 "check" or "move", then pairs of temporary file and target.
# A symlink at the target is replaced, never followed (mv onto a link to a
# directory would put the file inside that directory).
COMMIT_SCRIPT = r"""
what=$1; shift
while [ $# -gt 1 ]; do
  if [ "$what" = check ]; then
    if [ -d "$2" ] && [ ! -L "$2" ]; then echo "$2"; exit 12; fi
  else
    if [ -L "$2" ]; then $BB rm -f "$2"; fi
    $BB mv -f "$1" "$2" || { echo "$2"; exit 15; }
  fi
  shift 2
done
"""

PUT_ERRORS = {
    10: "cannot create the directory",
    11: "a symbolic link is on the way to it; not followed",
    12: "a directory is in the way",
    13: "writing failed (no space left in the container, or a read-only place)",
    15: "cannot put it in place (read-only place or permission denied)",
}
FORK_FAILED = (b"can't fork", b"Resource temporarily unavailable", b"Cannot allocate memory")
"""What busybox says when the container has no process (or memory) left to fork."""


def check_path(path: str, *, field: str, base: str = WORK_DIR) -> str:
    """An absolute, normalised path inside the container, or PathNotAllowed."""
    if not path:
        raise InvalidField(field, "is empty")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise PathNotAllowed(field, path, f"{clip(path)} is longer than {MAX_PATH_BYTES} bytes")
    if "\0" in path:
        raise PathNotAllowed(field, path, "contains a NUL character")
    if ".." in path.split("/"):
        raise PathNotAllowed(field, path, f"{clip(path)} must not contain '..'")
    full = posixpath.normpath(path if path.startswith("/") else posixpath.join(base, path))
    if full.startswith("//"):
        full = "/" + full.lstrip("/")
    if any(full == r or full.startswith(r + "/") for r in FORBIDDEN_ROOTS):
        raise PathNotAllowed(field, full, f"{clip(full)} is a kernel filesystem, not the container's files")
    return full


def stale_minutes(limits: ExecLimits) -> int:
    """Minutes after which a temporary upload file nobody touched is a
    leftover: longer than any upload may last (put_files ends one at
    max_upload_s), and its mtime is never older than its upload's start."""
    return math.ceil(limits.max_upload_s / 60) + 1


def fork_failed(stderr: bytes) -> bool:
    return any(s in stderr for s in FORK_FAILED)


def pids_exhausted(container_id: str) -> QuotaExceeded:
    return QuotaExceeded(f"container {clip(container_id)!r} has no process left to start (its pids limit is "
                         "reached); end some of its processes and retry", limit="pids")


def shell(driver: ExecDriver, script: str, *args: str) -> CommandSpec:
    box = driver.toolbox
    sh = (box, "sh") if box else ("/bin/sh",)
    return CommandSpec(argv=(*sh, "-c", script, "sandhub", *args), env={"BB": box or "env"})


async def collect(proc: RunningProcess, limit: int = 4096) -> tuple[bytes, bytes]:
    """A process's stdout and stderr, each kept up to ``limit`` bytes."""
    kept = {"stdout": bytearray(), "stderr": bytearray()}
    while (chunk := await proc.read()) is not None:
        buf = kept[chunk.stream]
        if len(buf) < limit:
            buf += chunk.data[: limit - len(buf)]
    return bytes(kept["stdout"]), bytes(kept["stderr"])


def batches(args: list[str], *, group: int = 1) -> Iterator[list[str]]:
    """``args`` in runs of at most ARGV_BATCH_BYTES, never splitting a group."""
    batch: list[str] = []
    size = 0
    for i in range(0, len(args), group):
        item = args[i:i + group]
        n = sum(len(a) + 1 for a in item)
        if batch and size + n > ARGV_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch += item
        size += n
    if batch:
        yield batch


@dataclass
class _Upload:
    """One file being written: its process, what has been written so far."""

    path: str
    mode: int
    announced: int
    tmp: str
    proc: RunningProcess
    output: asyncio.Task[tuple[bytes, bytes]]
    sha: hashlib._Hash
    size: int = 0


@dataclass
class _Written:
    temps: list[tuple[str, str]] = field(default_factory=list)
    """(temporary file, target) of each file written and not yet in place."""
    dirs: list[str] = field(default_factory=list)
    """Directories this upload created, each before its parents."""


class Uploader:
    """One PutFiles call: ``begin``/``write`` per file, then ``commit`` once,
    or ``abort`` on any failure (which leaves nothing behind)."""

    def __init__(self, driver: ExecDriver, container_id: str, limits: ExecLimits, destination: str) -> None:
        self._driver = driver
        self._cid = container_id
        self._limits = limits
        self._dest = check_path(destination or WORK_DIR, field="start.destination")
        self._current: _Upload | None = None
        self._written = _Written()
        self.files: list[pb.FileInfo] = []
        self.total = 0

    @property
    def destination(self) -> str:
        return self._dest

    async def begin(self, f: pb.FileHeader, *, field: str = "file.path") -> None:
        await self.finish()
        if len(self.files) >= self._limits.max_upload_files:
            raise PayloadTooLarge(f"at most {self._limits.max_upload_files} files per upload",
                                  limit=self._limits.max_upload_files)
        path = check_path(f.path, field=field, base=self._dest)
        if f.size > 0 and self.total + f.size > self._limits.max_upload_bytes:
            raise PayloadTooLarge(f"{clip(f.path)}: {f.size} bytes would exceed the upload limit of "
                                  f"{self._limits.max_upload_bytes} bytes", limit=self._limits.max_upload_bytes)
        mode = (f.mode & MODE_BITS) or DEFAULT_MODE
        suffix = secrets.token_hex(6)
        cmd = shell(self._driver, STAGE_SCRIPT, path, f"{mode:o}", str(max(f.size, 0)), suffix,
                    str(stale_minutes(self._limits)))
        proc = await self._driver.spawn(container_id=self._cid, command=cmd)
        tmp = posixpath.join(posixpath.dirname(path), TEMP_PREFIX + suffix)
        self._current = _Upload(path, mode, max(f.size, 0), tmp, proc, asyncio.ensure_future(collect(proc)),
                                hashlib.sha256())

    async def write(self, data: bytes) -> None:
        up = self._current
        if up is None:
            raise InvalidStream("data before a file message: announce each file with `file` first")
        if up.announced and up.size + len(data) > up.announced:
            raise InvalidStream(f"{clip(up.path)}: more bytes than the {up.announced} announced")
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
        """Closes the current file and waits until it is written (under its
        temporary name)."""
        up = self._current
        if up is None:
            return
        with contextlib.suppress(OSError):
            await up.proc.close_stdin()
        out, err = await up.output
        info = await up.proc.wait()
        self._current = None
        self._note_new_dirs(up, out)
        self._written.temps.append((up.tmp, up.path))
        if info.exit_code or info.signal:
            await self._failed(up.path, info.exit_code, info.signal, err, size=up.size, announced=up.announced)
        self.files.append(pb.FileInfo(path=up.path, size=up.size, mode=up.mode, sha256=up.sha.hexdigest()))

    async def _failed(self, path: str, code: int, signal: int, err: bytes, *, size: int = 0, announced: int = 0) -> None:
        shown = clip(path)
        if signal == 9:
            raise ContainerNotRunning(self._cid, "TERMINATING")
        if fork_failed(err):
            raise pids_exhausted(self._cid)
        if code == 14:
            raise InvalidStream(f"{shown}: {size} bytes arrived, {announced} were announced")
        if code == 13 and b"No space left" in err:
            raise PayloadTooLarge(f"{shown}: no space left in the container", error="ENOSPC")
        if code in PUT_ERRORS:
            # The caller's path can't be written (a link, a directory in the
            # way, a read-only place): theirs to change, not an internal fault.
            raise PathNotAllowed("file.path", path, f"{shown}: {PUT_ERRORS[code]}")
        if await self._driver.out_of_pids(container_id=self._cid):  # its shell could not even say so
            raise pids_exhausted(self._cid)
        log.warning("files.write_failed", container_id=self._cid, exit_code=code, signal=signal,
                    stderr=clip(err.decode("utf-8", "replace")))
        raise SandhubError(f"{shown}: writing failed inside the container (exit {code}, signal {signal})")

    async def commit(self) -> None:
        """Puts every file written into place: all targets checked first, then moved."""
        await self.finish()
        pairs = [p for pair in self._written.temps for p in pair]
        for what in ("check", "move"):
            for batch in batches(pairs, group=2):
                proc = await self._driver.spawn(container_id=self._cid, command=shell(
                    self._driver, COMMIT_SCRIPT, what, *batch))
                out, err = await collect(proc)
                info = await proc.wait()
                if info.exit_code or info.signal:
                    await self._failed(out.decode("utf-8", "replace").strip(), info.exit_code, info.signal, err)
        self._written = _Written()

    def _note_new_dirs(self, up: _Upload, out: bytes) -> None:
        """The stage script's first line names the topmost directory it made:
        every directory from the file's own down to it is this upload's."""
        top = out.decode("utf-8", "replace").partition("\n")[0].strip()
        if top:
            d = posixpath.dirname(up.path)
            while len(d) >= len(top):
                self._written.dirs.append(d)
                d = posixpath.dirname(d)

    async def abort(self) -> None:
        """Called when the call fails: removes whatever this upload wrote."""
        up, self._current = self._current, None
        if up is not None:
            await up.proc.kill()
            # What the killed script printed says which directories it made.
            try:
                async with asyncio.timeout(2.0):
                    out, _ = await up.output
            except Exception:  # killed or stuck: nothing more to learn from it
                up.output.cancel()
                out = b""
            self._note_new_dirs(up, out)
            self._written.temps.append((up.tmp, up.path))
        written, self._written = self._written, _Written()
        box = self._driver.toolbox
        temps = [tmp for tmp, _ in written.temps]
        # Deepest first, so a directory is empty by the time it is removed.
        dirs = sorted(set(written.dirs), key=lambda d: d.count("/"), reverse=True)
        # Paths are absolute: none is taken for an option.
        for tool, flags, paths in (("rm", ("-f",), temps), ("rmdir", (), dirs)):
            for batch in batches(paths):
                argv = (*((box, tool) if box else (tool,)), *flags, *batch)
                with contextlib.suppress(SandhubError, BackendError, OSError):
                    proc = await self._driver.spawn(container_id=self._cid, command=CommandSpec(argv=argv))
                    await collect(proc)
                    await proc.wait()
                    await proc.kill()
