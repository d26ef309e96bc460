"""Domain errors, and their one mapping to gRPC status codes.

Backends and domain code raise these; one server interceptor turns them into a
status with a ``google.rpc.ErrorInfo`` detail (domain ``sandhub.dev``) whose
reason is a ``sandhub.common.v1.ErrorReason`` name without its prefix.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

ERROR_DOMAIN = "sandhub.dev"


class SandhubError(Exception):
    """Base of every error a caller may see. ``message`` is shown to callers."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidField(SandhubError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_FIELD"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", metadata={"field": field})
        self.field = field


class UnknownImage(InvalidField):
    reason = "UNKNOWN_IMAGE"

    def __init__(self, image: str, hint: str = "") -> None:
        super().__init__("image", f"unknown image {image!r}{hint}")


class UnknownPlacement(InvalidField):
    reason = "UNKNOWN_PLACEMENT"

    def __init__(self, placement: str, known: list[str]) -> None:
        super().__init__("placement", f"unknown placement {placement!r}; known: {', '.join(known)}")


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
        super().__init__(f"container {container_id!r} not found", metadata={"container_id": container_id})


class ContainerNotRunning(SandhubError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "CONTAINER_NOT_RUNNING"

    def __init__(self, container_id: str, state: str) -> None:
        super().__init__(
            f"container {container_id!r} is {state}, not RUNNING",
            metadata={"container_id": container_id, "state": state},
        )


class ProcessNotFound(SandhubError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "PROCESS_NOT_FOUND"

    def __init__(self, container_id: str, process_id: str) -> None:
        super().__init__(
            f"process {process_id!r} not found in container {container_id!r}",
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
        super().__init__(f"no such file or directory in the container: {path!r}", metadata={"path": path})


class InvalidStream(SandhubError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_STREAM"


class QuotaExceeded(SandhubError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message, metadata={"limit": limit})


class BackendUnavailable(SandhubError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "BACKEND_UNAVAILABLE"


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
