"""What both gRPC servers share: error mapping, the canonical log line per RPC,
health checking, reflection and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from sandhub.common.v1 import errors_pb2
from sandhub.errors import ERROR_DOMAIN, MESSAGE_CHARS, REASON_PREFIX, MalformedRequest, SandhubError, clip

log = structlog.get_logger("sandhub.rpc")

REQUEST_ID_KEY = "x-request-id"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
TENANT_KEY = "x-sandhub-tenant"
"""Metadata the Hub sets on every call to the orchestrator. Absent means an
operator call that sees all tenants: the orchestrator listens internally only."""


Ctx = grpc.aio.ServicerContext[Any, Any]
"""A servicer context, whatever the messages."""


@dataclass
class RpcInfo:
    """Per-RPC facts the canonical log line reports; servicers may fill in tenant."""

    method: str
    request_id: str
    tenant: str = ""
    code: str = ""
    peer: str = ""


current_rpc: contextvars.ContextVar[RpcInfo | None] = contextvars.ContextVar("current_rpc", default=None)


def set_tenant(tenant: str) -> None:
    info = current_rpc.get()
    if info is not None:
        info.tenant = tenant


def error_status(err: SandhubError) -> grpc.Status:
    """The status for ``err`` with the details ErrorReason's comment in
    errors.proto promises: ErrorInfo, the typed ErrorDetail, a BadRequest when
    the error names a request field, a RetryInfo when it says when to retry."""
    messages: list[Message] = [
        error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata),
        errors_pb2.ErrorDetail(reason=REASON_PREFIX + err.reason),
    ]
    field = err.metadata.get("field")
    if field is not None:  # the standard form every gRPC ecosystem can show
        messages.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=getattr(err, "description", err.message))]))
    retry_after_s = getattr(err, "retry_after_s", None)
    if retry_after_s is not None:  # the standard retry advice gRPC clients know
        messages.append(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=int(retry_after_s), nanos=int(retry_after_s % 1 * 1e9))))
    details = []
    for message in messages:
        detail = any_pb2.Any()
        detail.Pack(message)
        details.append(detail)
    status = status_pb2.Status(code=err.code.value[0], message=err.message, details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def internal_status(request_id: str) -> grpc.Status:
    """INTERNAL, naming the request id (also in the x-request-id trailer) the
    operator finds the traceback under."""
    return error_status(SandhubError(f"internal error; quote request id {request_id} to the operator"))


def error_reason(err: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a received error, or ""."""
    for key, value in err.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")
"""A request id a caller may choose: a short printable token, safe to log and echo."""


def _request_id(context: Ctx) -> str:
    """The caller's x-request-id if it is a REQUEST_ID token; otherwise one made
    here (the call goes on; the log says the caller's was replaced)."""
    for key, value in context.invocation_metadata() or ():
        if key != REQUEST_ID_KEY:
            continue
        if isinstance(value, str) and REQUEST_ID.match(value):
            return value
        made = uuid.uuid4().hex[:16]
        log.warning("rpc.request_id_replaced", request_id=made, length=len(value),
                    reason="not 1-128 characters of [A-Za-z0-9._:-]")
        return made
    return uuid.uuid4().hex[:16]


class CanonicalInterceptor(grpc.aio.ServerInterceptor):
    """Maps errors to statuses and logs one line per RPC.

    SandhubError → its code with ErrorInfo; an error received from another
    sandhub server → forwarded unchanged; anything else → INTERNAL with the
    request id (the traceback goes to the log, never to the caller).
    """

    def __init__(self, service: str) -> None:
        self._service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        # A request that does not parse reaches the handler as MALFORMED and is
        # answered INVALID_ARGUMENT; grpc itself would answer UNKNOWN with the
        # parser's exception text.
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary, streamed=False),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary, streamed=True),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream, streamed=False),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream, streamed=True),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    @contextlib.asynccontextmanager
    async def _scope(self, method: str, context: Ctx) -> AsyncIterator[None]:
        """One RPC: request id in, errors mapped, one log line out."""
        info, token, start = self._begin(method, context)
        code = "OK"
        try:
            yield
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:
            code = await self._fail(e, info, context)
            raise
        finally:
            self._end(info, token, start, code)

    def _wrap_unary(self, method: str, behavior: Any, *, streamed: bool) -> Any:
        async def wrapped(request: Any, context: Ctx) -> Any:
            async with self._scope(method, context):
                return await behavior(_checked(request, streamed=streamed), context)

        return wrapped

    def _wrap_stream(self, method: str, behavior: Any, *, streamed: bool) -> Any:
        async def wrapped(request: Any, context: Ctx) -> AsyncIterator[Any]:
            async with self._scope(method, context):
                async for item in behavior(_checked(request, streamed=streamed), context):
                    yield item

        return wrapped

    def _begin(
        self, method: str, context: Ctx
    ) -> tuple[RpcInfo, contextvars.Token[RpcInfo | None], float]:
        # The peer is read now: a streamed call the client cancelled ends (and
        # _end runs) after grpc has let go of the call, and reading it then crashed the process.
        info = RpcInfo(method=method, request_id=_request_id(context), peer=context.peer())
        context.set_trailing_metadata(((REQUEST_ID_KEY, info.request_id),))
        return info, current_rpc.set(info), time.perf_counter()

    async def _fail(self, e: Exception, info: RpcInfo, context: Ctx) -> str:
        """Aborts the RPC with the status for ``e`` (raising AbortError, which
        grpc handles quietly); returns the code name when ``e`` already was an abort."""
        if isinstance(e, grpc.aio.AbortError):
            code = context.code()
            return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        if isinstance(e, SandhubError):
            status = error_status(e)
        elif isinstance(e, grpc.aio.AioRpcError):
            trailing = tuple(
                (k, v) for k, v in (e.trailing_metadata() or ()) if k == STATUS_DETAILS_KEY
            )
            status = _Status(e.code(), clip(e.details() or "", MESSAGE_CHARS), trailing)
        else:
            log.error("rpc.internal_error", method=info.method, request_id=info.request_id, exc_info=e)
            status = internal_status(info.request_id)
        info.code = status.code.name
        # The status's trailers replace those set at the start, so the request
        # id the contract promises on every reply, errors included, goes here too.
        status = _Status(status.code, status.details,
                         tuple(status.trailing_metadata or ()) + ((REQUEST_ID_KEY, info.request_id),))
        await context.abort_with_status(status)
        raise AssertionError("abort_with_status returned")  # pragma: no cover

    def _end(
        self,
        info: RpcInfo,
        token: contextvars.Token[RpcInfo | None],
        start: float,
        code: str,
    ) -> None:
        """The canonical log line. Touches nothing of the call: by now grpc may have let go of it."""
        code = info.code or code
        log.info(
            "rpc",
            service=self._service,
            method=info.method,
            request_id=info.request_id,
            tenant=info.tenant or None,
            code=code,
            duration_ms=round((time.perf_counter() - start) * 1000, 2),
            peer=info.peer,
        )
        # A streamed call the client cancelled is closed from another context
        # than the one it began in, where the token can't be reset (and needn't).
        with contextlib.suppress(ValueError):
            current_rpc.reset(token)


MALFORMED = object()
"""What a request that does not parse deserializes to."""


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return MALFORMED

    return deserialize


def _checked(request: Any, *, streamed: bool) -> Any:
    """The request, or for a stream of them an iterator that raises at the
    first one that did not parse; MalformedRequest for a single one."""
    if not streamed:
        if request is MALFORMED:
            raise MalformedRequest()
        return request

    async def each() -> AsyncIterator[Any]:
        async for message in request:
            if message is MALFORMED:
                raise MalformedRequest()
            yield message

    return each()


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Iterable[str]
) -> health.HealthServicer:
    names = list(service_names)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in names + [""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    return health_servicer


def bind(server: grpc.aio.Server, address: str) -> int:
    """Binds an insecure port; returns the port (useful with ":0")."""
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


async def run_until_signalled(
    stop_callbacks: list[Callable[[], Awaitable[None]]], *, grace_s: float = 5.0
) -> None:
    """Waits for SIGTERM or SIGINT, then runs the stop callbacks in order."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutdown.begin", grace_s=grace_s)
    for callback in stop_callbacks:
        await callback()
    log.info("shutdown.done")
