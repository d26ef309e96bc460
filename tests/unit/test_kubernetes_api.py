"""Bounded retries of API calls (no API server: a stand-in callable answers
429, 5xx or refuses the connection, as a busy or absent server would)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from orchestrator_service.backends.kubernetes.api import Api
from sandhub.config import KubernetesBackendConfig
from sandhub.errors import BackendError, BackendUnavailable

CONFIG = KubernetesBackendConfig(retries=3, retry_backoff_s=0.001)


def api() -> Api:
    return Api(CONFIG, client.ApiClient())


def failing(*errors: BaseException) -> tuple[Callable[..., str], list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []

    def fn(**kwargs: Any) -> str:
        calls.append(kwargs)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "ok"

    return fn, calls


def api_error(status: int, retry_after: str = "") -> ApiException:
    e = ApiException(status=status, reason="x")
    e.headers = {"Retry-After": retry_after} if retry_after else {}
    return e


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_retried_statuses_then_success(status: int) -> None:
    fn, calls = failing(api_error(status, "0.001"), api_error(status))
    a = api()
    assert await a.call("x", fn) == "ok"
    assert len(calls) == 3 and a.stats.retries == 2
    assert calls[0]["_request_timeout"] == CONFIG.request_timeout_s


async def test_retries_are_bounded() -> None:
    fn, calls = failing(*[api_error(503)] * 10)
    with pytest.raises(BackendUnavailable):
        await api().call("x", fn)
    assert len(calls) == CONFIG.retries + 1
    fn, calls = failing(*[api_error(500)] * 10)
    with pytest.raises(BackendError):
        await api().call("x", fn)


@pytest.mark.parametrize("status", [400, 403, 404, 409, 422])
async def test_answers_that_mean_something_are_not_retried(status: int) -> None:
    fn, calls = failing(api_error(status))
    with pytest.raises(ApiException):
        await api().call("x", fn)
    assert len(calls) == 1


async def test_no_connection_is_unavailable() -> None:
    refused = urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
    fn, calls = failing(*[refused] * 10)
    with pytest.raises(BackendUnavailable) as e:
        await api().call("x", fn)
    assert "can't be reached" in e.value.message and len(calls) == CONFIG.retries + 1
    fn, calls = failing(refused, ConnectionResetError())
    assert await api().call("x", fn) == "ok"
