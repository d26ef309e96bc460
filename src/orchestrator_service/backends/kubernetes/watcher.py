"""One shared watch of every container pod, feeding the event loop.

One watch for all containers (not a poll per container) is what keeps the
API server's load flat as containers grow. It lists once, then watches from
that resourceVersion in a thread of its own; every event is handed to the
event loop. When the server says the version is too old (410) or the
connection breaks, it lists again and hands over the full list, so the
backend's view is repaired, never left stale.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import structlog
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = structlog.get_logger("sandhub.kubernetes")

OnEvent = Callable[[str, client.V1Pod], None]
OnList = Callable[[list[client.V1Pod]], None]

WATCH_TIMEOUT_S = 240
"""Server-side end of one watch request; it is renewed from the last version."""
MAX_BACKOFF_S = 5.0


class PodWatcher:
    def __init__(self, *, api_client: client.ApiClient, namespace: str, selector: str,
                 on_event: OnEvent, on_list: OnList, request_timeout_s: float) -> None:
        self._client = api_client
        self._core = client.CoreV1Api(api_client)
        self._namespace = namespace
        self._selector = selector
        self._on_event = on_event
        self._on_list = on_list
        self._timeout = request_timeout_s
        self._stopped = threading.Event()
        self._resp: Any = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def list_pods(self, _request_timeout: float | None = None) -> tuple[list[client.V1Pod], str]:
        pods = self._core.list_namespaced_pod(self._namespace, label_selector=self._selector,
                                              _request_timeout=_request_timeout or self._timeout)
        return list(pods.items), str(pods.metadata.resource_version)

    def start(self, pods: list[client.V1Pod], resource_version: str) -> None:
        """Starts watching after an initial list the caller made (and applied)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, args=(resource_version,), name="k8s-pod-watch",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the watch at once: shutting the response down unblocks its read."""
        self._stopped.set()
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:  # already closed; nothing else to release
                pass

    async def join(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)

    # -- the thread -----------------------------------------------------------------

    def _hand(self, fn: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        if not self._stopped.is_set():
            try:
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop is closed: we are shutting down
                self._stopped.set()

    def _run(self, resource_version: str) -> None:
        backoff = 0.2
        rv = resource_version
        while not self._stopped.is_set():
            try:
                rv = self._watch_once(rv)
                backoff = 0.2
            except _Expired:
                rv = self._relist()
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as e:
                if self._stopped.is_set():
                    return
                log.warning("kubernetes.watch_broken", error=type(e).__name__, retry_in_s=backoff)
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                try:
                    rv = self._relist()
                except (ApiException, urllib3.exceptions.HTTPError, OSError) as e2:
                    log.warning("kubernetes.relist_failed", error=type(e2).__name__)

    def _relist(self) -> str:
        pods, rv = self.list_pods()
        self._hand(self._on_list, pods)
        return rv

    def _watch_once(self, rv: str) -> str:
        resp = self._core.list_namespaced_pod(
            self._namespace, label_selector=self._selector, watch=True, resource_version=rv,
            allow_watch_bookmarks=True, timeout_seconds=WATCH_TIMEOUT_S, _preload_content=False,
            _request_timeout=(self._timeout, WATCH_TIMEOUT_S + 30),
        )
        self._resp = resp
        try:
            if self._stopped.is_set():
                return rv
            for line in iter_resp_lines(resp):
                if self._stopped.is_set():
                    break
                if not line.strip():
                    continue
                rv = self._event(json.loads(line), rv)
        finally:
            self._resp = None
            resp.release_conn()
        return rv

    def _event(self, event: dict[str, Any], rv: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Expired()
            raise ValueError(f"watch error {obj.get('code')}: {obj.get('message')}")
        new_rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
        if kind == "BOOKMARK":
            return new_rv
        pod = self._client.deserialize(SimpleNamespace(data=json.dumps(obj)), "V1Pod")
        self._hand(self._on_event, str(kind), pod)
        return new_rv


class _Expired(Exception):
    """The resourceVersion we watch from is gone from the server's history (410)."""
