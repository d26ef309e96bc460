from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_MISSING_CREDENTIALS: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_CREDENTIALS: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_FIELD: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_IMAGE: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_PLACEMENT: _ClassVar[ErrorReason]
    ERROR_REASON_CONTAINER_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_CONTAINER_NOT_RUNNING: _ClassVar[ErrorReason]
    ERROR_REASON_QUOTA_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_BACKEND_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_PAGE_TOKEN: _ClassVar[ErrorReason]
    ERROR_REASON_PROCESS_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_PAYLOAD_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_PATH_NOT_ALLOWED: _ClassVar[ErrorReason]
    ERROR_REASON_PATH_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_STREAM: _ClassVar[ErrorReason]
    ERROR_REASON_TIMEOUT: _ClassVar[ErrorReason]
    ERROR_REASON_NOT_SUPPORTED: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_RATE_LIMITED: _ClassVar[ErrorReason]
    ERROR_REASON_MALFORMED_REQUEST: _ClassVar[ErrorReason]
    ERROR_REASON_STATE_STORAGE_FULL: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_MISSING_CREDENTIALS: ErrorReason
ERROR_REASON_INVALID_CREDENTIALS: ErrorReason
ERROR_REASON_INVALID_FIELD: ErrorReason
ERROR_REASON_UNKNOWN_IMAGE: ErrorReason
ERROR_REASON_UNKNOWN_PLACEMENT: ErrorReason
ERROR_REASON_CONTAINER_NOT_FOUND: ErrorReason
ERROR_REASON_CONTAINER_NOT_RUNNING: ErrorReason
ERROR_REASON_QUOTA_EXCEEDED: ErrorReason
ERROR_REASON_BACKEND_UNAVAILABLE: ErrorReason
ERROR_REASON_INVALID_PAGE_TOKEN: ErrorReason
ERROR_REASON_PROCESS_NOT_FOUND: ErrorReason
ERROR_REASON_PAYLOAD_TOO_LARGE: ErrorReason
ERROR_REASON_PATH_NOT_ALLOWED: ErrorReason
ERROR_REASON_PATH_NOT_FOUND: ErrorReason
ERROR_REASON_INVALID_STREAM: ErrorReason
ERROR_REASON_TIMEOUT: ErrorReason
ERROR_REASON_NOT_SUPPORTED: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_RATE_LIMITED: ErrorReason
ERROR_REASON_MALFORMED_REQUEST: ErrorReason
ERROR_REASON_STATE_STORAGE_FULL: ErrorReason

class ErrorDetail(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: ErrorReason
    def __init__(self, reason: _Optional[_Union[ErrorReason, str]] = ...) -> None: ...
