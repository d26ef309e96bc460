"""Errors a sandhub server answered, as exceptions.

Every error status sandhub sends carries, in the ``grpc-status-details-bin``
trailer, a ``google.rpc.ErrorInfo`` (a ``reason`` string, e.g.
``CONTAINER_NOT_FOUND``, and ``metadata`` such as ``container_id`` or
``limit``) and its typed twin ``sandhub.common.v1.ErrorDetail``; an error about
a request field also a ``google.rpc.BadRequest``, and RATE_LIMITED a
``google.rpc.RetryInfo``. :func:`from_rpc_error` decodes them (with
``grpc_status.rpc_status``) into one exception class per group of codes, so
callers write ``except NotFound`` and compare ``err.reason`` with an
``ErrorReason`` constant when they need the detail::

    from sandhub.common.v1.errors_pb2 import ERROR_REASON_PROCESS_NOT_FOUND
    except NotFound as e:
        if e.reason == ERROR_REASON_PROCESS_NOT_FOUND: ...
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sandhub.common.v1 import errors_pb2
from sandhub.errors import REASON_PREFIX

REQUEST_ID_KEY = "x-request-id"
"""The trailer that names the call in the server's log (quote it to an operator)."""


class ApiError(Exception):
    """An error status from sandhub (or from gRPC before sandhub saw the call).

    ``reason`` is an ``ErrorReason`` value (from the ErrorDetail, else from the
    ErrorInfo's reason string; ERROR_REASON_UNSPECIFIED when there is neither,
    e.g. a connection failure); ``metadata`` is the ErrorInfo's; ``field`` the
    request field a BadRequest names ("" when none); ``retry_after_s`` comes
    from a RetryInfo (None when there is none)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: int = errors_pb2.ERROR_REASON_UNSPECIFIED,
        metadata: Mapping[str, str] | None = None,
        field: str = "",
        request_id: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        name = _reason_name(reason)
        super().__init__(f"{message} [{code.name}{' ' + name if name else ''}]")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field = field
        self.request_id = request_id
        self.retry_after_s = retry_after_s


def _reason_name(reason: int) -> str:
    """An ErrorReason value's name as ErrorInfo spells it ("CONTAINER_NOT_FOUND");
    "" for UNSPECIFIED, the number for one newer than this client."""
    if reason == errors_pb2.ERROR_REASON_UNSPECIFIED:
        return ""
    try:
        return errors_pb2.ErrorReason.Name(reason).removeprefix(REASON_PREFIX)
    except ValueError:
        return str(reason)


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
_BY_REASON: dict[int, type[ApiError]] = {
    errors_pb2.ERROR_REASON_QUOTA_EXCEEDED: QuotaExceeded,
    errors_pb2.ERROR_REASON_RATE_LIMITED: RateLimited,
    errors_pb2.ERROR_REASON_PAYLOAD_TOO_LARGE: PayloadTooLarge,
}


def from_rpc_error(err: grpc.RpcError) -> ApiError:
    """The ApiError for a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = err.code() if isinstance(err, (grpc.Call, grpc.aio.AioRpcError)) else grpc.StatusCode.UNKNOWN
    message = (err.details() if isinstance(err, (grpc.Call, grpc.aio.AioRpcError)) else "") or ""
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # details whose code disagrees with the call's: ignore them
        status = None
    typed, named, metadata, field, retry_after = 0, "", {}, "", None
    for detail in status.details if status is not None else ():
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        typed_detail, bad = errors_pb2.ErrorDetail(), error_details_pb2.BadRequest()
        if detail.Unpack(typed_detail):
            typed = typed_detail.reason
        elif detail.Unpack(info):
            named, metadata = info.reason, dict(info.metadata)
        elif detail.Unpack(bad):
            field = bad.field_violations[0].field if bad.field_violations else ""
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    reason = typed or _reason_of(named)
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, Internal)
    return cls(code, message, reason=reason, metadata=metadata, field=field or metadata.get("field", ""),
               request_id=str(_trailers(err).get(REQUEST_ID_KEY, "")), retry_after_s=retry_after)


def _reason_of(name: str) -> int:
    """The ErrorReason value of an ErrorInfo reason string (UNSPECIFIED if unknown)."""
    try:
        return int(errors_pb2.ErrorReason.Value(REASON_PREFIX + name)) if name else 0
    except ValueError:
        return errors_pb2.ERROR_REASON_UNSPECIFIED


def _trailers(err: grpc.RpcError) -> dict[str, str | bytes]:
    if not isinstance(err, (grpc.Call, grpc.aio.AioRpcError)):
        return {}
    return {key: value for key, value in err.trailing_metadata() or ()}
