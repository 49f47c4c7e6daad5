from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor
ACCESS_FIELD_NUMBER: _ClassVar[int]
access: _descriptor.FieldDescriptor

class AccessPolicy(_message.Message):
    __slots__ = ("permission", "channel_required")
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    permission: str
    channel_required: bool
    def __init__(self, permission: _Optional[str] = ..., channel_required: _Optional[bool] = ...) -> None: ...
