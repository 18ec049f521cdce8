from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioChunk(_message.Message):
    __slots__ = ("session_id", "sample_rate", "pcm_s16le")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    PCM_S16LE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sample_rate: int
    pcm_s16le: bytes
    def __init__(self, session_id: _Optional[str] = ..., sample_rate: _Optional[int] = ..., pcm_s16le: _Optional[bytes] = ...) -> None: ...

class MotionFrame(_message.Message):
    __slots__ = ("session_id", "coefficients", "blendshapes", "head")
    class BlendshapesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    BLENDSHAPES_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    coefficients: _containers.RepeatedScalarFieldContainer[float]
    blendshapes: _containers.ScalarMap[str, float]
    head: HeadRotation
    def __init__(self, session_id: _Optional[str] = ..., coefficients: _Optional[_Iterable[float]] = ..., blendshapes: _Optional[_Mapping[str, float]] = ..., head: _Optional[_Union[HeadRotation, _Mapping]] = ...) -> None: ...

class HeadRotation(_message.Message):
    __slots__ = ("yaw_degrees", "pitch_degrees", "roll_degrees")
    YAW_DEGREES_FIELD_NUMBER: _ClassVar[int]
    PITCH_DEGREES_FIELD_NUMBER: _ClassVar[int]
    ROLL_DEGREES_FIELD_NUMBER: _ClassVar[int]
    yaw_degrees: float
    pitch_degrees: float
    roll_degrees: float
    def __init__(self, yaw_degrees: _Optional[float] = ..., pitch_degrees: _Optional[float] = ..., roll_degrees: _Optional[float] = ...) -> None: ...

class PushSummary(_message.Message):
    __slots__ = ("accepted", "dropped")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    dropped: int
    def __init__(self, accepted: _Optional[int] = ..., dropped: _Optional[int] = ...) -> None: ...
