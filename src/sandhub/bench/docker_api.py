"""Docker's Engine API over its unix socket, with the standard library only.

Pure pieces (unit-tested against literal bytes): request encoding, response
head and body framing, the multiplexed exec output stream, container and exec
bodies, label filters and Docker's timestamps. The client opens one unix
connection per request: on a local socket that costs a fraction of a
millisecond, far below the calls themselves, and it keeps exec's hijacked
connections and ordinary ones from ever sharing a socket.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlencode

API_VERSION = "v1.41"
"""Engine 20.10 (Debian 12's docker.io) speaks it; later engines still accept it."""
HEAD_LIMIT = 64 * 1024


class DockerApiError(Exception):
    """A call failed: ``status`` 0 means no HTTP answer (connection, timeout)."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    """Below the API version, e.g. "/containers/create"."""
    query: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_type: str = "application/json"


def json_request(method: str, path: str, body: Any = None, query: Mapping[str, str] | None = None) -> Request:
    data = b"" if body is None else json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return Request(method, path, dict(query or {}), data)


def encode_request(req: Request) -> bytes:
    """HTTP/1.1 with ``Connection: close``: the answer ends the connection."""
    target = f"/{API_VERSION}{req.path}"
    if req.query:
        target += "?" + urlencode(sorted(req.query.items()), quote_via=quote)
    lines = [f"{req.method} {target} HTTP/1.1", "Host: docker", "Connection: close"]
    if req.body or req.method in ("POST", "PUT"):
        lines += [f"Content-Type: {req.content_type}", f"Content-Length: {len(req.body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + req.body


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    """Lower-case names."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """The status code and the headers (names lower-cased) of a response head,
    with or without its final blank line."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise DockerApiError(f"not an HTTP response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise DockerApiError(f"bad header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def body_framing(status: int, headers: Mapping[str, str], method: str) -> str | int:
    """How the body ends: "none", "chunked", "eof" or its length."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200 and status != 101:
        return "none"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return "chunked"
    if "content-length" in headers:
        return int(headers["content-length"])
    return "eof"  # a hijacked stream (exec start), or a server that closes


def decode_chunked(data: bytes) -> bytes:
    """The body of a complete chunked transfer encoding (trailers ignored)."""
    out, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise DockerApiError("truncated chunked body")
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        start = end + 2
        if len(data) < start + size + 2:
            raise DockerApiError("truncated chunked body")
        out += data[start : start + size]
        pos = start + size + 2


STDOUT, STDERR = 1, 2


def demux(stream: bytes) -> tuple[bytes, bytes]:
    """(stdout, stderr) of Docker's multiplexed stream (attach or exec without
    a TTY): frames of an 8-byte header — stream type, three zero bytes, a
    big-endian 32-bit length — followed by that many bytes."""
    out, err, pos = bytearray(), bytearray(), 0
    while pos < len(stream):
        if len(stream) - pos < 8:
            raise DockerApiError("truncated stream frame header")
        kind, size = stream[pos], int.from_bytes(stream[pos + 4 : pos + 8], "big")
        data = stream[pos + 8 : pos + 8 + size]
        if len(data) < size:
            raise DockerApiError("truncated stream frame")
        if kind == STDERR:
            err += data
        elif kind in (0, STDOUT):
            out += data
        pos += 8 + size
    return bytes(out), bytes(err)


@dataclass(frozen=True)
class ContainerSpec:
    """What the bench asks Docker for: the same limits and hardening a sandhub
    container gets by default."""

    image: str
    cmd: tuple[str, ...]
    labels: Mapping[str, str]
    memory_mib: int
    cpu_millicores: int
    pids: int
    open_files: int
    tmpfs_mib: Mapping[str, int]
    """Mount point -> size (sandhub: /tmp and /work, half the disk limit each)."""
    network: str
    """A network name, or "none"."""
    user: str = "1000:1000"
    workdir: str = "/work"


def container_body(spec: ContainerSpec) -> dict[str, Any]:
    """The JSON of POST /containers/create."""
    return {
        "Image": spec.image,
        "Cmd": list(spec.cmd),
        "Labels": dict(spec.labels),
        "User": spec.user,
        "WorkingDir": spec.workdir,
        "NetworkDisabled": spec.network == "none",
        "HostConfig": {
            "Memory": spec.memory_mib * 2**20,
            "NanoCpus": spec.cpu_millicores * 1_000_000,
            "PidsLimit": spec.pids,
            "Ulimits": [{"Name": "nofile", "Soft": spec.open_files, "Hard": spec.open_files}],
            "ReadonlyRootfs": True,
            "Tmpfs": {path: f"size={mib}m,mode={'1777' if path == '/tmp' else '755'}"
                      for path, mib in sorted(spec.tmpfs_mib.items())},
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "NetworkMode": spec.network,
        },
    }


def exec_body(argv: Sequence[str], *, detach: bool = False) -> dict[str, Any]:
    """The JSON of POST /containers/{id}/exec: output attached unless detached."""
    return {"Cmd": list(argv), "AttachStdin": False, "AttachStdout": not detach, "AttachStderr": not detach,
            "Tty": False}


def label_filter(labels: Mapping[str, str]) -> dict[str, str]:
    """The query of GET /containers/json for containers carrying all ``labels``
    (stopped ones too)."""
    return {"all": "1", "filters": json.dumps({"label": [f"{k}={v}" for k, v in sorted(labels.items())]})}


_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def parse_time(text: str) -> float:
    """Seconds since the epoch of Docker's RFC 3339 timestamps with up to
    nanoseconds ("2026-11-29T07:42:14.011763727Z"), to the nanosecond's float."""
    m = _TIME.match(text)
    if not m:
        raise DockerApiError(f"not a Docker timestamp: {text!r}")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    whole = datetime.fromisoformat(m.group(1) + zone).astimezone(timezone.utc).timestamp()
    return whole + (int(m.group(2)) / 10 ** len(m.group(2)) if m.group(2) else 0.0)


def error_message(resp: Response) -> str:
    """Docker's {"message": ...} or the start of the body."""
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return resp.body[:200].decode(errors="replace").strip()


class DockerClient:
    def __init__(self, socket_path: str, *, timeout_s: float = 60.0) -> None:
        self._socket = socket_path
        self._timeout_s = timeout_s

    async def call(self, req: Request, *, timeout_s: float | None = None) -> Response:
        """Sends one request on a new connection and reads the whole answer."""
        try:
            async with asyncio.timeout(timeout_s or self._timeout_s):
                reader, writer = await asyncio.open_unix_connection(self._socket, limit=HEAD_LIMIT)
                try:
                    writer.write(encode_request(req))
                    await writer.drain()
                    return await _read_response(reader, req.method)
                finally:
                    writer.close()
        except TimeoutError:
            raise DockerApiError(f"{req.method} {req.path.split('/')[1]}: no answer in {timeout_s or self._timeout_s:g}s")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            raise DockerApiError(f"{req.method} {req.path.split('/')[1]}: {type(e).__name__}: {e}") from None

    async def checked(self, req: Request, *, ok: Sequence[int] = (200, 201, 204)) -> Response:
        resp = await self.call(req)
        if resp.status not in ok:
            raise DockerApiError(f"{resp.status}: {error_message(resp)}", status=resp.status)
        return resp


async def _read_response(reader: asyncio.StreamReader, method: str) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    status, headers = parse_head(head)
    framing = body_framing(status, headers, method)
    if framing == "none":
        body = b""
    elif framing == "chunked":
        body = await _read_chunked(reader)
    elif framing == "eof":
        body = await reader.read(-1)
    else:
        assert isinstance(framing, int)
        body = await reader.readexactly(framing)
    return Response(status, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)
