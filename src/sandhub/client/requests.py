"""Request builders shared by the sync and async clients: generated messages
from plain Python values, no I/O beyond reading the local files an upload
names. The server validates everything; nothing here repeats its rules."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from google.protobuf import duration_pb2

from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.orchestrator.v1 import orchestrator_pb2 as pb

CHUNK = 1 << 20
"""Bytes per upload message: the contract's largest `data` chunk."""


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def create_container(
    *,
    image: str = "",
    cpu_millicores: int = 0,
    memory_mib: int = 0,
    pids: int = 0,
    disk_mib: int = 0,
    env: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    ports: Sequence[int] = (),
    ttl_s: float = 0.0,
    placement: str = "",
    request_id: str = "",
    wait_until_running: bool = False,
) -> pb.CreateContainerRequest:
    req = pb.CreateContainerRequest(
        image=image,
        resources=pb.Resources(cpu_millicores=cpu_millicores, memory_mib=memory_mib, pids=pids, disk_mib=disk_mib),
        env=dict(env or {}),
        labels=dict(labels or {}),
        ports=[pb.Port(port=p) for p in ports],
        placement=placement,
        request_id=request_id,
        wait_until_running=wait_until_running,
    )
    if ttl_s:
        req.ttl.CopyFrom(duration(ttl_s))
    return req


def container_state(state: str | int) -> pb.ContainerState:
    """"running", "RUNNING", "CONTAINER_STATE_RUNNING" or the enum value."""
    if isinstance(state, int):
        return cast("pb.ContainerState", state)
    if not state:
        return pb.CONTAINER_STATE_UNSPECIFIED
    return cast("pb.ContainerState", pb.ContainerState.Value("CONTAINER_STATE_" + state.upper().removeprefix("CONTAINER_STATE_")))


def command(argv: Sequence[str] | str, *, env: Mapping[str, str] | None = None, cwd: str = "") -> xpb.Command:
    """A list is argv (no shell); a string runs with ``/bin/sh -c``."""
    if isinstance(argv, str):
        return xpb.Command(shell=argv, env=dict(env or {}), cwd=cwd)
    return xpb.Command(argv=list(argv), env=dict(env or {}), cwd=cwd)


def signal(sig: int | str) -> xpb.Signal:
    """"TERM", "SIGTERM", "SIGNAL_SIGTERM" or the enum value (the Linux number)."""
    if isinstance(sig, int):
        return cast("xpb.Signal", sig)
    name = "SIGNAL_SIG" + sig.upper().removeprefix("SIGNAL_").removeprefix("SIG")
    if name not in xpb.Signal.keys():
        raise ValueError(f"unknown signal {sig!r}; known: {', '.join(xpb.Signal.keys()[1:])}")
    return cast("xpb.Signal", xpb.Signal.Value(name))


def run(
    container_id: str, cmd: xpb.Command, *, stdin: bytes = b"", timeout_s: float = 0.0, max_output_bytes: int = 0
) -> xpb.RunRequest:
    req = xpb.RunRequest(container_id=container_id, command=cmd, stdin=stdin, max_output_bytes=max_output_bytes)
    if timeout_s:
        req.timeout.CopyFrom(duration(timeout_s))
    return req


def exec_start(
    container_id: str, cmd: xpb.Command, *, pty: tuple[int, int] | None = None, timeout_s: float = 0.0
) -> xpb.ExecRequest:
    start = xpb.ExecStart(container_id=container_id, command=cmd)
    if pty is not None:
        start.pty.CopyFrom(xpb.PtySize(rows=pty[0], cols=pty[1]))
    if timeout_s:
        start.timeout.CopyFrom(duration(timeout_s))
    return xpb.ExecRequest(start=start)


@dataclass(frozen=True)
class LocalFile:
    """A local file to upload, and where it goes (relative to the destination)."""

    source: Path
    path: str
    mode: int
    size: int


def local_files(paths: Iterable[str | Path]) -> list[LocalFile]:
    """Files as named, and directories walked: ``dir/a/b`` goes to ``dir/a/b``."""
    out: list[LocalFile] = []
    for src in map(Path, paths):
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        if not files and not src.exists():
            raise FileNotFoundError(f"no such file or directory: {src}")
        for f in files:
            st = f.stat()
            rel = f.name if f == src else str(Path(src.name) / f.relative_to(src))
            out.append(LocalFile(f, rel, st.st_mode & 0o777, st.st_size))
    return out


def put_local(container_id: str, destination: str, files: Iterable[LocalFile]) -> Iterator[xpb.PutFilesRequest]:
    yield xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=container_id, destination=destination))
    for f in files:
        yield xpb.PutFilesRequest(file=xpb.FileHeader(path=f.path, mode=f.mode, size=f.size))
        with f.source.open("rb") as fh:
            while data := fh.read(CHUNK):
                yield xpb.PutFilesRequest(data=data)


def put_bytes(
    container_id: str, destination: str, files: Mapping[str, bytes], *, mode: int = 0
) -> Iterator[xpb.PutFilesRequest]:
    yield xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=container_id, destination=destination))
    for path, data in files.items():
        yield xpb.PutFilesRequest(file=xpb.FileHeader(path=path, mode=mode, size=len(data)))
        for i in range(0, len(data), CHUNK):
            yield xpb.PutFilesRequest(data=data[i:i + CHUNK])


def put_tar(container_id: str, destination: str, chunks: Iterable[bytes]) -> Iterator[xpb.PutFilesRequest]:
    yield xpb.PutFilesRequest(start=xpb.PutFilesStart(
        container_id=container_id, destination=destination, format=xpb.ARCHIVE_FORMAT_TAR))
    for chunk in chunks:
        for i in range(0, len(chunk), CHUNK):
            yield xpb.PutFilesRequest(data=chunk[i:i + CHUNK])
