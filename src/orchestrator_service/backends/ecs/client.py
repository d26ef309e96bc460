"""Calls to ECS: off the event loop, rate-limited, retried, wrapped.

Every call waits for its operation's token (limiter.py), runs in a worker
thread (boto3 blocks), has a timeout, and is retried a bounded number of
times with jittered doubling backoff when AWS throttles it or can't be
reached. What is left becomes a domain error here: throttled or unreachable
-> BackendUnavailable (UNAVAILABLE, saying so); other refusals are
ClientErrors the backend maps per call (a missing task is not an outage).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import structlog

from orchestrator_service.backends.ecs.limiter import Limiter
from sandhub.config import EcsBackendConfig
from sandhub.errors import BackendUnavailable

log = structlog.get_logger("sandhub.ecs")

THROTTLED = frozenset({"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded"})
TRANSIENT = frozenset({"ServerException", "ServiceUnavailableException", "InternalFailure"})
UNREACHABLE = (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
               botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError)


def error_code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def error_message(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Message", ""))


def new_ecs_client(config: EcsBackendConfig) -> Any:
    """A boto3 ECS client whose own retries are off (ours are bounded and
    rate-aware) and whose calls time out."""
    conf = botocore.config.Config(
        connect_timeout=config.request_timeout_s, read_timeout=config.request_timeout_s,
        retries={"total_max_attempts": 1}, max_pool_connections=64)
    return boto3.session.Session().client(
        "ecs", region_name=config.region or None, endpoint_url=config.endpoint_url or None, config=conf)


@dataclass
class CallStats:
    """Calls made and retried, for `sandhub bench ecs-burst`."""

    calls: int = 0
    throttled: int = 0


class EcsApi:
    """The ECS client (``ecs``) behind the limiter. Call its methods only as
    ``await api.call(api.ecs.<operation>, ...)``: the IAM policy test finds
    every operation the backend uses by those ``ecs.<operation>`` references."""

    def __init__(self, config: EcsBackendConfig, ecs: Any, *, limiter: Limiter | None = None) -> None:
        self._config = config
        self.ecs = ecs
        read = (config.read_rate, config.read_burst)
        self.limiter = limiter or Limiter(
            call_rates={"run_task": (config.run_task_rate, config.run_task_burst)},
            default_rate=read, launch_rate=(config.launch_rate, config.launch_burst))
        self.stats = CallStats()

    async def call(self, method: Callable[..., Any], /, **kwargs: Any) -> Any:
        operation = method.__name__
        bucket = self.limiter.call(operation)
        backoff = self._config.retry_backoff_s
        attempts = self._config.retries + 1
        for attempt in range(attempts):
            await bucket.take()
            self.stats.calls += 1
            try:
                return await asyncio.to_thread(method, **kwargs)
            except botocore.exceptions.ClientError as e:
                code = error_code(e)
                if code not in THROTTLED and code not in TRANSIENT:
                    raise
                self.stats.throttled += code in THROTTLED
                why = f"throttled by ECS ({code})" if code in THROTTLED else f"ECS failed ({code})"
            except UNREACHABLE as e:
                why = f"ECS unreachable ({type(e).__name__})"
            if attempt + 1 == attempts:
                raise BackendUnavailable(f"{operation}: {why} {attempts} times in a row; retry later")
            log.info("ecs.retry", operation=operation, why=why, attempt=attempt + 1)
            # Full jitter: callers throttled together don't come back together.
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff *= 2
        raise AssertionError("unreachable")
