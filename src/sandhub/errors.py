"""Domain errors, and their one mapping to gRPC status codes.

Backends and domain code raise these; one server interceptor turns them into a
status with a ``google.rpc.ErrorInfo`` detail (domain ``sandhub.dev``) whose
reason is a ``sandhub.common.v1.ErrorReason`` name without its prefix.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

ERROR_DOMAIN = "sandhub.dev"
ECHO_CHARS = 256
"""How much of a caller's input an error repeats (a path, a label key, an id):
enough to recognise it; a megabyte of it would overflow the reply's trailers."""
MESSAGE_CHARS = 1024
"""The longest error message sent: a few echoed values and the explanation."""
CLIP_MARKER = "...[{} more chars]"


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` cut to about ``limit`` characters, saying how much was cut. Every
    piece of caller input an error message or its metadata repeats goes
    through here (SandhubError applies it to the whole message and each
    metadata value, so a forgotten call still stays bounded)."""
    if len(text) <= limit:
        return text
    return text[:limit] + CLIP_MARKER.format(len(text) - limit)


class SandhubError(Exception):
    """Base of every error a caller may see. ``message`` is shown to callers."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        message = clip(message, MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = {clip(k): clip(v) for k, v in (metadata or {}).items()}


class InvalidField(SandhubError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_FIELD"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{clip(field)}: {message}", metadata={"field": field})
        self.field = field


class UnknownImage(InvalidField):
    reason = "UNKNOWN_IMAGE"

    def __init__(self, image: str, hint: str = "") -> None:
        super().__init__("image", f"unknown image {clip(image)!r}{hint}")


class UnknownPlacement(InvalidField):
    reason = "UNKNOWN_PLACEMENT"

    def __init__(self, placement: str, known: list[str]) -> None:
        super().__init__("placement", f"unknown placement {clip(placement)!r}; known: {', '.join(known)}")


class InvalidPageToken(SandhubError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_PAGE_TOKEN"

    def __init__(self) -> None:
        super().__init__(
            "page_token: not a token from a previous page of this query",
            metadata={"field": "page_token"},
        )


class ContainerNotFound(SandhubError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "CONTAINER_NOT_FOUND"

    def __init__(self, container_id: str) -> None:
        super().__init__(f"container {clip(container_id)!r} not found", metadata={"container_id": container_id})


class ContainerNotRunning(SandhubError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "CONTAINER_NOT_RUNNING"

    def __init__(self, container_id: str, state: str) -> None:
        super().__init__(
            f"container {clip(container_id)!r} is {state}, not RUNNING",
            metadata={"container_id": container_id, "state": state},
        )


class ProcessNotFound(SandhubError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "PROCESS_NOT_FOUND"

    def __init__(self, container_id: str, process_id: str) -> None:
        super().__init__(
            f"process {clip(process_id)!r} not found in container {clip(container_id)!r}",
            metadata={"container_id": container_id, "process_id": process_id},
        )


class PayloadTooLarge(SandhubError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "PAYLOAD_TOO_LARGE"

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message, metadata={"limit": str(limit)})


class PathNotAllowed(SandhubError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "PATH_NOT_ALLOWED"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", metadata={"field": field})


class PathNotFound(SandhubError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "PATH_NOT_FOUND"

    def __init__(self, path: str) -> None:
        super().__init__(f"no such file or directory in the container: {clip(path)!r}", metadata={"path": path})


class InvalidStream(SandhubError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_STREAM"


class MalformedRequest(SandhubError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "MALFORMED_REQUEST"

    def __init__(self) -> None:
        super().__init__("the request is not a valid message of this method's request type "
                         "(e.g. a string field that is not UTF-8)")


class QuotaExceeded(SandhubError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message, metadata={"limit": limit})


class RateLimited(SandhubError):
    """Too many calls of one kind too fast; ``retry_after_s`` says when one
    will be let through (also sent as a google.rpc.RetryInfo detail)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"

    def __init__(self, message: str, *, limit: str, retry_after_s: float) -> None:
        super().__init__(message, metadata={"limit": limit, "retry_after_s": f"{retry_after_s:.3f}"})
        self.retry_after_s = retry_after_s


class BackendUnavailable(SandhubError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "BACKEND_UNAVAILABLE"


class StateStorageFull(SandhubError):
    """The backend's state disk has no room for a record: the change was not
    made (a delete still is: teardown never waits for space)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "STATE_STORAGE_FULL"

    def __init__(self, error: str) -> None:
        super().__init__(
            f"the orchestrator's state disk is full ({error}), so nothing was changed; "
            "retry once the operator has freed space",
            metadata={"error": error},
        )


class NotSupported(SandhubError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "NOT_SUPPORTED"


class MissingCredentials(SandhubError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "MISSING_CREDENTIALS"

    def __init__(self) -> None:
        super().__init__("send metadata `authorization: Bearer <api key>`")


class InvalidCredentials(SandhubError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "INVALID_CREDENTIALS"

    def __init__(self) -> None:
        super().__init__("the API key is not valid")


class BackendError(Exception):
    """A backend fault that callers must not see verbatim; logged, sent as INTERNAL."""


class Timeout(SandhubError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "TIMEOUT"
