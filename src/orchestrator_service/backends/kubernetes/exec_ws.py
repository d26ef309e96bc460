"""pods/exec over a websocket speaking v5.channel.k8s.io, blocking.

The kubernetes client's stream() speaks v4 only, which can't close stdin
(a command reading to EOF never ends), and it patches the ApiClient it is
given. v5 adds exactly that: a frame [255, channel] closes one channel.
Frames are binary, their first byte the channel: 0 stdin, 1 stdout,
2 stderr, 3 status (a metav1.Status once the command ends), 4 resize.
"""

from __future__ import annotations

import json
import ssl
import threading
import urllib.parse
from collections.abc import Sequence
from typing import Any

import websocket
from kubernetes import client

from sandhub.errors import BackendUnavailable, NotSupported

V5 = "v5.channel.k8s.io"
STDIN, STDOUT, STDERR, STATUS, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
MAX_FRAME = 32 * 1024
"""Largest stdin frame sent: big writes are split, so a resize or signal is
never stuck behind megabytes of input."""


def exec_url(conf: client.Configuration, *, namespace: str, pod: str, container: str,
             argv: Sequence[str], stdin: bool, tty: bool) -> str:
    query: list[tuple[str, str]] = [("command", a) for a in argv]
    query += [("container", container), ("stdin", str(stdin).lower()), ("stdout", "true"),
              ("stderr", str(not tty).lower()), ("tty", str(tty).lower())]
    base = conf.host.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    path = f"/api/v1/namespaces/{urllib.parse.quote(namespace)}/pods/{urllib.parse.quote(pod)}/exec"
    return f"{base}{path}?{urllib.parse.urlencode(query)}"


def _ssl_options(conf: client.Configuration) -> dict[str, Any]:
    if not conf.verify_ssl:
        return {"cert_reqs": ssl.CERT_NONE, "check_hostname": False}
    opts: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED}
    if conf.ssl_ca_cert:
        opts["ca_certs"] = conf.ssl_ca_cert
    if conf.cert_file:
        opts["certfile"] = conf.cert_file
    if conf.key_file:
        opts["keyfile"] = conf.key_file
    if getattr(conf, "tls_server_name", None):
        opts["server_hostname"] = conf.tls_server_name
    return opts


class ChannelSocket:
    """One exec session. recv() from one thread, send() from any (locked)."""

    def __init__(self, ws: websocket.WebSocket) -> None:
        self._ws = ws
        self._send_lock = threading.Lock()
        self.closed = False

    @classmethod
    def connect(cls, conf: client.Configuration, url: str, *, timeout_s: float) -> ChannelSocket:
        if conf.refresh_api_key_hook is not None:  # exec plugins (EKS tokens) expire
            conf.refresh_api_key_hook(conf)
        headers = []
        auth = conf.get_api_key_with_prefix("authorization") or conf.get_api_key_with_prefix("BearerToken")
        if auth:
            headers.append(f"Authorization: {auth}")
        try:
            ws = websocket.create_connection(url, header=headers, subprotocols=[V5], sslopt=_ssl_options(conf),
                                             timeout=timeout_s, enable_multithread=True)
        except websocket.WebSocketBadStatusException as e:
            raise _refused(e) from e
        except (websocket.WebSocketException, OSError) as e:
            raise BackendUnavailable("the Kubernetes API server can't be reached for exec; try again") from e
        if ws.getsubprotocol() != V5:
            ws.close()
            raise NotSupported("the Kubernetes API server does not speak the v5 exec protocol (1.30+ needed)")
        ws.settimeout(None)  # reads block until data; the deadline was for the handshake
        return cls(ws)

    def send(self, channel: int, data: bytes) -> None:
        with self._send_lock:
            for i in range(0, max(len(data), 1), MAX_FRAME):
                self._ws.send_binary(bytes([channel]) + data[i:i + MAX_FRAME])

    def close_channel(self, channel: int) -> None:
        with self._send_lock:
            self._ws.send_binary(bytes([CLOSE, channel]))

    def resize(self, rows: int, cols: int) -> None:
        self.send(RESIZE, json.dumps({"Width": cols, "Height": rows}).encode())

    def recv(self) -> tuple[int, bytes] | None:
        """The next data frame as (channel, payload); None when the session ended."""
        while True:
            try:
                opcode, data = self._ws.recv_data()
            except (websocket.WebSocketException, OSError):
                return None
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return None
            if opcode in (websocket.ABNF.OPCODE_BINARY, websocket.ABNF.OPCODE_TEXT) and data:
                payload = data if isinstance(data, bytes) else data.encode()
                return payload[0], payload[1:]

    def close(self) -> None:
        """Ends the session (the kubelet then ends the command); unblocks recv()."""
        if self.closed:
            return
        self.closed = True
        try:
            self._ws.close(timeout=1)
        except (websocket.WebSocketException, OSError):
            pass
        try:
            self._ws.shutdown()  # type: ignore[no-untyped-call]
        except (websocket.WebSocketException, OSError):
            pass


def exit_code_of(status: bytes) -> int | None:
    """The exit code from the status channel's metav1.Status: 0 on Success,
    the ExitCode cause on NonZeroExitCode, None when it says something else
    (the command never ran, or the runtime failed)."""
    try:
        doc = json.loads(status or b"{}")
    except ValueError:
        return None
    if doc.get("status") == "Success":
        return 0
    if doc.get("reason") == "NonZeroExitCode":
        for cause in (doc.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                try:
                    return int(cause.get("message", ""))
                except ValueError:
                    return None
    return None


def status_message(status: bytes) -> str:
    try:
        return str(json.loads(status or b"{}").get("message", ""))
    except ValueError:
        return ""


def _refused(e: websocket.WebSocketBadStatusException) -> Exception:
    code = e.status_code
    if code in (401, 403):
        return BackendUnavailable(f"the Kubernetes API server refused exec ({code}): check the RBAC Role (pods/exec)")
    if code == 404:
        return BackendUnavailable("the container's pod is gone")
    return BackendUnavailable(f"exec was refused by the Kubernetes API server ({code}); try again")
