"""What an agent's error status becomes for the caller.

The agent is untrusted (the tenant owns that process and can replace it), so
nothing of its status reaches the caller as it came: a code the caller can
act on is passed on with details the Hub rebuilds (a known ErrorReason that
goes with that code, the contract's metadata keys only, values clipped);
anything else — UNAUTHENTICATED, INTERNAL, UNKNOWN, a transport failure, a
reason the contract does not pair with the code — means the agent could not
serve the call, and the caller gets UNAVAILABLE (BACKEND_UNAVAILABLE). Never
INTERNAL: nothing an agent does is a fault of the Hub.
"""

from __future__ import annotations

import math

import grpc
from google.rpc import error_details_pb2, status_pb2

from sandhub import errors, rpc
from sandhub.errors import METADATA_KEYS, MESSAGE_CHARS, BackendUnavailable, SandhubError, clip

PASSED_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
})
"""Codes that tell the caller something about its own request or container."""
MAX_DETAILS_BYTES = 16 << 10
"""Larger status details from an agent are not even parsed (the channel's
metadata limit bounds them anyway)."""


def _reason_codes() -> dict[str, grpc.StatusCode]:
    """Each ErrorReason's code, as errors.proto pairs them (one SandhubError
    subclass per reason); only those of codes that are passed on."""
    found: dict[str, grpc.StatusCode] = {}
    todo: list[type[SandhubError]] = [SandhubError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.code in PASSED_CODES:
            found[cls.reason] = cls.code
    return found


AGENT_ONLY_REASONS = {
    "PROCESS_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "PATH_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "PATH_NOT_ALLOWED": grpc.StatusCode.INVALID_ARGUMENT,
    "PAYLOAD_TOO_LARGE": grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""Reasons only the agent gives (no Python code raises them, so no
SandhubError subclass carries them), with their codes as errors.proto pairs them."""
REASON_CODES = {**AGENT_ONLY_REASONS, **_reason_codes()}


class AgentError(SandhubError):
    """An agent's error, rebuilt: its code and reason are set per instance
    (``of`` checks them against REASON_CODES first)."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, metadata: dict[str, str]) -> None:
        super().__init__(message, metadata=metadata)
        self.code = code
        self.reason = reason
        self.description = message
        if reason == "RATE_LIMITED":
            self.retry_after_s = _seconds(metadata.get("retry_after_s", ""))


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        return 1.0
    return min(max(value, 0.0), 3600.0) if math.isfinite(value) else 1.0


def agent_unavailable(container_id: str, what: str) -> BackendUnavailable:
    return BackendUnavailable(f"the container's agent {what} (container {container_id}); "
                              "try again shortly, or recreate the container if it persists")


def _error_info(e: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The status's sandhub ErrorInfo, or None (absent, malformed, oversized)."""
    for key, value in e.trailing_metadata() or ():
        if key != rpc.STATUS_DETAILS_KEY or not isinstance(value, bytes) or len(value) > MAX_DETAILS_BYTES:
            continue
        try:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info) and info.domain == errors.ERROR_DOMAIN:
                    return info
        except Exception:  # any parse failure: the agent sent garbage, treated as no details
            return None
    return None


def passed_on(e: grpc.aio.AioRpcError, *, container_id: str, proven: bool = True) -> SandhubError | None:
    """The caller's error for an agent's status, or None when the agent
    could not serve the call (the caller then gets ``agent_unavailable``).
    ``proven``: whether the agent proved it is this container's before it
    ended the call; if not, only its code and reason go on, with a message
    the Hub writes (whoever answered may not be this container's agent)."""
    code = e.code()
    if code not in PASSED_CODES:
        return None
    info = _error_info(e)
    if info is None or REASON_CODES.get(info.reason) is not code:
        # Without a reason that goes with its code the status is not the
        # contract's; two codes also arise in this process with no details.
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return errors.Timeout(f"the command or transfer in container {container_id} did not finish in time")
        if code is grpc.StatusCode.UNIMPLEMENTED:
            return errors.NotSupported(f"the agent of container {container_id} does not offer this call "
                                       "(it is older than this Hub)")
        return None
    if not proven:
        message = unproven_message(container_id, info.reason)
        return AgentError(code, info.reason, message, {"container_id": container_id})
    metadata = {k: v for k, v in info.metadata.items() if k in METADATA_KEYS}
    if "container_id" in metadata:
        metadata["container_id"] = container_id  # the only container it may speak of
    return AgentError(code, info.reason, clip(e.details() or info.reason, MESSAGE_CHARS), metadata)


def unproven_message(container_id: str, reason: str) -> str:
    return (f"the agent of container {container_id} refused the call ({reason}) before it proved "
            "it is that container's; its own words are not passed on")
