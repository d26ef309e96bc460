"""Calls to the API server: off the event loop, bounded, retried, wrapped.

Every call runs in a worker thread (the kubernetes client blocks), has a
timeout, and is retried a bounded number of times with doubling backoff on
what is worth retrying: 429 (honouring a short Retry-After), 5xx and no
connection. What is left becomes a domain error at this boundary: no
connection -> BackendUnavailable (UNAVAILABLE); anything else the caller
can't fix -> BackendError (logged, INTERNAL without the raw text).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
import urllib3
from kubernetes import client, config as kube_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from sandhub.config import KubernetesBackendConfig
from sandhub.errors import BackendError, BackendUnavailable, ContainerNotFound

log = structlog.get_logger("sandhub.kubernetes")
T = TypeVar("T")

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 5.0


def new_api_client(config: KubernetesBackendConfig) -> client.ApiClient:
    """An ApiClient of its own (exec needs a separate one: stream() patches
    the client it is given). In-cluster config when no kubeconfig is named and
    we run in a pod; the client's own retries are off, ours are bounded."""
    try:
        if not config.kubeconfig and not config.context:
            try:
                kube_config.load_incluster_config()
                conf = client.Configuration.get_default_copy()
            except ConfigException:
                conf = client.Configuration()
                kube_config.load_kube_config(client_configuration=conf)
        else:
            conf = client.Configuration()
            kube_config.load_kube_config(config_file=config.kubeconfig or None, context=config.context or None,
                                         client_configuration=conf)
    except (ConfigException, OSError) as e:
        raise BackendUnavailable(f"no usable Kubernetes configuration: {e}") from e
    conf.retries = False
    return client.ApiClient(conf)


@dataclass
class CallStats:
    """API calls made, by verb: the cost of a container, for `sandhub bench`."""

    calls: int = 0
    retries: int = 0


class Api:
    def __init__(self, config: KubernetesBackendConfig, api_client: client.ApiClient) -> None:
        self._config = config
        self.client = api_client
        self.core = client.CoreV1Api(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self.stats = CallStats()

    @property
    def timeout(self) -> float:
        return self._config.request_timeout_s

    async def read_container_pod(self, namespace: str, container_id: str, *, id_label: str) -> client.V1Pod:
        """The pod of a container; ContainerNotFound when there is none, or when
        the pod of that name is not one of ours (its id label differs)."""
        try:
            pod = await self.call("read pod", self.core.read_namespaced_pod, container_id, namespace)
        except ApiException as e:
            if e.status == 404:
                raise ContainerNotFound(container_id) from None
            raise BackendError(f"read pod: {e.status} {e.reason}") from e
        if (pod.metadata.labels or {}).get(id_label) != container_id:
            raise ContainerNotFound(container_id)
        return pod

    async def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a thread, retried; ApiException other than
        the retried ones goes to the caller (409 and 404 mean something there)."""
        kwargs.setdefault("_request_timeout", self.timeout)
        delay = self._config.retry_backoff_s
        for attempt in range(self._config.retries + 1):
            self.stats.calls += 1
            last = attempt == self._config.retries
            try:
                return await asyncio.to_thread(fn, *args, **kwargs)
            except ApiException as e:
                if e.status not in RETRY_STATUS and e.status != 0:  # 0: the client's own TLS/connection error
                    raise
                if last:
                    if e.status == 0:
                        raise BackendUnavailable("the Kubernetes API server can't be reached; try again later") from e
                    if e.status == 429 or e.status in (502, 503, 504):
                        raise BackendUnavailable(f"the Kubernetes API server is overloaded ({e.status}); try again") from e
                    raise BackendError(f"{what}: API server error {e.status}") from e
                wait = _retry_after(e) or delay
            except (urllib3.exceptions.HTTPError, OSError) as e:
                if last:
                    raise BackendUnavailable("the Kubernetes API server can't be reached; try again later") from e
                wait = delay
            self.stats.retries += 1
            log.info("kubernetes.retry", what=what, attempt=attempt + 1, wait_s=round(wait, 3))
            await asyncio.sleep(wait * (0.5 + random.random() / 2))
            delay *= 2
        raise AssertionError("unreachable")


def _retry_after(e: ApiException) -> float:
    raw = (e.headers or {}).get("Retry-After", "")
    try:
        return min(float(raw), MAX_RETRY_AFTER_S)
    except ValueError:
        return 0.0


def is_status(e: BaseException, *codes: int) -> bool:
    return isinstance(e, ApiException) and e.status in codes
