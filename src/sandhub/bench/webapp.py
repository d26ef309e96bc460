"""The webserver scenario's tiny web app, and the wait for its first HTTP 200.

Neither server resolves names: `python -m http.server` looks up the host's
fully qualified name when it binds (HTTPServer.server_bind calls getfqdn),
which stalls for ~20 s in a network namespace without DNS. The Python app
binds a plain TCPServer instead; busybox httpd never resolves.
"""

from __future__ import annotations

import asyncio
import contextlib

from sandhub.bench.target import FileToPut, TargetError

PORT = 8000
BODY = b"hello from sandhub\n"

PYTHON_APP = f'''\
"""A student's first web app: answers every GET with a greeting."""
import http.server
import socketserver


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {BODY!r}
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


Server(("0.0.0.0", {PORT}), Handler).serve_forever()
'''.encode()

SERVERS = ("python", "busybox")


def app(server: str) -> tuple[list[FileToPut], list[str]]:
    """Files to upload (relative to the work directory) and the command that
    serves them on PORT, for ``server`` in SERVERS."""
    if server == "python":
        return [FileToPut("app.py", PYTHON_APP)], ["python3", "app.py"]
    if server == "busybox":
        bb = "/.sandhub/busybox"  # the local backend binds its static busybox here
        return [FileToPut("www/index.html", BODY)], [bb, "httpd", "-f", "-p", str(PORT), "-h", "www"]
    raise ValueError(f"unknown web server {server!r}; choose one of {', '.join(SERVERS)}")


async def http_status(host: str, port: int, *, timeout_s: float = 1.0) -> int:
    """The status code of ``GET /``; raises OSError or TimeoutError."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET / HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise OSError(f"not an HTTP answer: {line[:40]!r}")
    return int(parts[1])


async def wait_for_200(host: str, port: int = PORT, *, timeout_s: float, poll_s: float = 0.02) -> None:
    """Polls ``GET /`` until it answers 200; raises TargetError after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = "no answer"
    while True:
        try:
            status = await http_status(host, port, timeout_s=min(1.0, max(deadline - loop.time(), 0.05)))
            if status == 200:
                return
            last = f"HTTP {status}"
        except TimeoutError:
            last = "timed out"
        except OSError as e:
            last = e.strerror or str(e)
        if loop.time() >= deadline:
            raise TargetError(f"no HTTP 200 within {timeout_s:g}s (last: {last})")
        await asyncio.sleep(poll_s)
