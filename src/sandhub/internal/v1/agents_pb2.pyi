from sandhub.orchestrator.v1 import orchestrator_pb2 as _orchestrator_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetAgentEndpointRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class GetAgentEndpointResponse(_message.Message):
    __slots__ = ("target", "state", "backend")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    target: str
    state: _orchestrator_pb2.ContainerState
    backend: str
    def __init__(self, target: _Optional[str] = ..., state: _Optional[_Union[_orchestrator_pb2.ContainerState, str]] = ..., backend: _Optional[str] = ...) -> None: ...
