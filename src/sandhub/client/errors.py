"""Errors a sandhub server answered, as exceptions.

Every error status sandhub sends carries a ``google.rpc.ErrorInfo`` detail in
the ``grpc-status-details-bin`` trailer: a machine-readable ``reason`` (an
``ErrorReason`` name without its ``ERROR_REASON_`` prefix, e.g.
``CONTAINER_NOT_FOUND``) and ``metadata`` (e.g. ``field``, ``container_id``,
``limit``). A RATE_LIMITED error also carries a ``google.rpc.RetryInfo``.
:func:`from_rpc_error` decodes them (with ``grpc_status.rpc_status``) into one
exception class per group of codes, so callers write ``except NotFound`` and
switch on ``err.reason`` when they need the detail.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

REQUEST_ID_KEY = "x-request-id"
"""The trailer that names the call in the server's log (quote it to an operator)."""


class ApiError(Exception):
    """An error status from sandhub (or from gRPC before sandhub saw the call).

    ``reason`` and ``metadata`` come from the ErrorInfo detail ("" and {} when
    there is none, e.g. a connection failure); ``retry_after_s`` from a
    RetryInfo detail (None when there is none)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        request_id: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{message} [{code.name}{' ' + reason if reason else ''}]")
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.request_id = request_id
        self.retry_after_s = retry_after_s

    @property
    def field(self) -> str:
        """The request field the error is about (metadata "field"), or ""."""
        return self.metadata.get("field", "")


class Unauthenticated(ApiError):
    """No API key, or one the Hub does not know (MISSING_CREDENTIALS, INVALID_CREDENTIALS)."""


class PermissionDenied(ApiError):
    pass


class InvalidArgument(ApiError):
    """The request is invalid (INVALID_FIELD, UNKNOWN_IMAGE, PATH_NOT_ALLOWED, ...); ``field`` names the field."""


class NotFound(ApiError):
    """CONTAINER_NOT_FOUND, PROCESS_NOT_FOUND or PATH_NOT_FOUND."""


class AlreadyExists(ApiError):
    pass


class FailedPrecondition(ApiError):
    """E.g. CONTAINER_NOT_RUNNING (metadata "state")."""


class ResourceExhausted(ApiError):
    """A limit was reached (metadata "limit" names it)."""


class QuotaExceeded(ResourceExhausted):
    """QUOTA_EXCEEDED: a per-tenant or per-host quota is used up; retry after freeing some."""


class RateLimited(ResourceExhausted):
    """RATE_LIMITED: calls came too fast; ``retry_after_s`` says when to retry."""


class PayloadTooLarge(ResourceExhausted):
    """PAYLOAD_TOO_LARGE: an upload or download is over its limit."""


class Unavailable(ApiError):
    """The Hub or its backend can't be reached (transient: retry with backoff)."""


class DeadlineExceeded(ApiError):
    pass


class Unimplemented(ApiError):
    """NOT_SUPPORTED: this backend does not offer the operation."""


class Cancelled(ApiError):
    pass


class Internal(ApiError):
    """A server fault (INTERNAL, UNKNOWN, DATA_LOSS); ``request_id`` finds it in the server's log."""


_BY_CODE: dict[grpc.StatusCode, type[ApiError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.CANCELLED: Cancelled,
}
_BY_REASON: dict[str, type[ApiError]] = {
    "QUOTA_EXCEEDED": QuotaExceeded,
    "RATE_LIMITED": RateLimited,
    "PAYLOAD_TOO_LARGE": PayloadTooLarge,
}


def from_rpc_error(err: grpc.RpcError) -> ApiError:
    """The ApiError for a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = err.code() if isinstance(err, (grpc.Call, grpc.aio.AioRpcError)) else grpc.StatusCode.UNKNOWN
    message = (err.details() if isinstance(err, (grpc.Call, grpc.aio.AioRpcError)) else "") or ""
    trailers = _trailers(err)
    reason, domain, metadata, retry_after = "", "", {}, None
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # details whose code disagrees with the call's: ignore them
        status = None
    for detail in status.details if status is not None else ():
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, Internal)
    return cls(code, message, reason=reason, domain=domain, metadata=metadata,
               request_id=str(trailers.get(REQUEST_ID_KEY, "")), retry_after_s=retry_after)


def _trailers(err: grpc.RpcError) -> dict[str, str | bytes]:
    if not isinstance(err, (grpc.Call, grpc.aio.AioRpcError)):
        return {}
    return {key: value for key, value in err.trailing_metadata() or ()}
