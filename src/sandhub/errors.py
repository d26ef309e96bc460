"""Domain errors, and their one mapping to gRPC status codes.

Backends and domain code raise these; one server interceptor
(``rpc.error_status``) turns them into a status whose details are what
``sandhub.common.v1.ErrorReason`` promises: a ``google.rpc.ErrorInfo`` (domain
``sandhub.dev``, reason = the ErrorReason name without its prefix, metadata),
the typed ``ErrorDetail``, a ``google.rpc.BadRequest`` when the error names a
request field, and a ``google.rpc.RetryInfo`` when it says when to retry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from sandhub.common.v1 import errors_pb2

ERROR_DOMAIN = "sandhub.dev"
REASON_PREFIX = "ERROR_REASON_"
"""ErrorInfo.reason is the ErrorReason value's name without this prefix."""
METADATA_KEYS = frozenset({"field", "container_id", "process_id", "path", "state", "limit", "retry_after_s", "error"})
"""The only ErrorInfo.metadata keys the contract knows (errors.proto): clients
read these names, so no error sends another."""
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


def _utf8(text: str) -> str:
    """``text`` as valid UTF-8 (a tar member's name may hold undecodable
    bytes as surrogates, which a proto string can't carry)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class SandhubError(Exception):
    """Base of every error a caller may see. ``message`` is shown to callers;
    ``metadata`` uses only METADATA_KEYS; ``reason`` is an ErrorReason name
    (checked when a subclass is defined)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if REASON_PREFIX + cls.reason not in errors_pb2.ErrorReason.keys():
            raise TypeError(f"{cls.__name__}.reason {cls.reason!r} is not an ErrorReason of the contract")

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        message = clip(_utf8(message), MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        unknown = set(metadata or {}) - METADATA_KEYS
        if unknown:
            raise ValueError(f"ErrorInfo metadata keys {sorted(unknown)} are not in the contract's set")
        self.metadata: dict[str, str] = {k: clip(_utf8(v)) for k, v in (metadata or {}).items()}


class InvalidField(SandhubError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_FIELD"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{clip(field)}: {message}", metadata={"field": field})
        self.field = self.metadata["field"]
        """The field path as sent (a huge map key in it is cut short)."""
        self.description = message
        """What is wrong with the field, without its name."""


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
        """``state``: the short name ("PENDING", "TERMINATING", "FAILED"...);
        metadata "state" gets the enum's full name, as the contract says."""
        state = state.removeprefix("CONTAINER_STATE_")
        super().__init__(
            f"container {clip(container_id)!r} is {state}, not RUNNING",
            metadata={"container_id": container_id, "state": f"CONTAINER_STATE_{state}"},
        )


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
