import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Licence(_message.Message):
    __slots__ = ("person_ref", "consent_record_id", "allowed_platforms", "allowed_categories", "forbidden_categories", "allowed_languages", "valid_from", "valid_until", "live_voice_conversion")
    PERSON_REF_FIELD_NUMBER: _ClassVar[int]
    CONSENT_RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    FORBIDDEN_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_LANGUAGES_FIELD_NUMBER: _ClassVar[int]
    VALID_FROM_FIELD_NUMBER: _ClassVar[int]
    VALID_UNTIL_FIELD_NUMBER: _ClassVar[int]
    LIVE_VOICE_CONVERSION_FIELD_NUMBER: _ClassVar[int]
    person_ref: str
    consent_record_id: str
    allowed_platforms: _containers.RepeatedScalarFieldContainer[str]
    allowed_categories: _containers.RepeatedScalarFieldContainer[str]
    forbidden_categories: _containers.RepeatedScalarFieldContainer[str]
    allowed_languages: _containers.RepeatedScalarFieldContainer[str]
    valid_from: _timestamp_pb2.Timestamp
    valid_until: _timestamp_pb2.Timestamp
    live_voice_conversion: bool
    def __init__(self, person_ref: _Optional[str] = ..., consent_record_id: _Optional[str] = ..., allowed_platforms: _Optional[_Iterable[str]] = ..., allowed_categories: _Optional[_Iterable[str]] = ..., forbidden_categories: _Optional[_Iterable[str]] = ..., allowed_languages: _Optional[_Iterable[str]] = ..., valid_from: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., valid_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., live_voice_conversion: _Optional[bool] = ...) -> None: ...

class VoiceSettings(_message.Message):
    __slots__ = ("voice", "rate", "pitch")
    VOICE_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    PITCH_FIELD_NUMBER: _ClassVar[int]
    voice: str
    rate: float
    pitch: float
    def __init__(self, voice: _Optional[str] = ..., rate: _Optional[float] = ..., pitch: _Optional[float] = ...) -> None: ...

class RegisterAvatarRequest(_message.Message):
    __slots__ = ("avatar_id", "tenant", "reference_image", "voice", "licence", "reference_video")
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    LICENCE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_VIDEO_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    tenant: str
    reference_image: bytes
    voice: VoiceSettings
    licence: Licence
    reference_video: bytes
    def __init__(self, avatar_id: _Optional[str] = ..., tenant: _Optional[str] = ..., reference_image: _Optional[bytes] = ..., voice: _Optional[_Union[VoiceSettings, _Mapping]] = ..., licence: _Optional[_Union[Licence, _Mapping]] = ..., reference_video: _Optional[bytes] = ...) -> None: ...

class Avatar(_message.Message):
    __slots__ = ("avatar_id", "tenant", "licence", "voice", "image_sha256", "width", "height", "registered_at", "revoked", "revoked_reason", "revoked_at", "bundle_id")
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LICENCE_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_REASON_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    tenant: str
    licence: Licence
    voice: VoiceSettings
    image_sha256: str
    width: int
    height: int
    registered_at: _timestamp_pb2.Timestamp
    revoked: bool
    revoked_reason: str
    revoked_at: _timestamp_pb2.Timestamp
    bundle_id: str
    def __init__(self, avatar_id: _Optional[str] = ..., tenant: _Optional[str] = ..., licence: _Optional[_Union[Licence, _Mapping]] = ..., voice: _Optional[_Union[VoiceSettings, _Mapping]] = ..., image_sha256: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked: _Optional[bool] = ..., revoked_reason: _Optional[str] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., bundle_id: _Optional[str] = ...) -> None: ...

class GetAvatarRequest(_message.Message):
    __slots__ = ("avatar_id",)
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    def __init__(self, avatar_id: _Optional[str] = ...) -> None: ...

class ListAvatarsRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListAvatarsResponse(_message.Message):
    __slots__ = ("avatars",)
    AVATARS_FIELD_NUMBER: _ClassVar[int]
    avatars: _containers.RepeatedCompositeFieldContainer[Avatar]
    def __init__(self, avatars: _Optional[_Iterable[_Union[Avatar, _Mapping]]] = ...) -> None: ...

class RevokeLicenceRequest(_message.Message):
    __slots__ = ("avatar_id", "reason")
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    reason: str
    def __init__(self, avatar_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("seq", "at", "avatar_id", "tenant", "action", "session_id", "room_id", "platform", "worker_id", "clause", "detail")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLAUSE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    at: _timestamp_pb2.Timestamp
    avatar_id: str
    tenant: str
    action: str
    session_id: str
    room_id: str
    platform: str
    worker_id: str
    clause: str
    detail: str
    def __init__(self, seq: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., avatar_id: _Optional[str] = ..., tenant: _Optional[str] = ..., action: _Optional[str] = ..., session_id: _Optional[str] = ..., room_id: _Optional[str] = ..., platform: _Optional[str] = ..., worker_id: _Optional[str] = ..., clause: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ListAuditEntriesRequest(_message.Message):
    __slots__ = ("avatar_id", "after_seq", "page_size")
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    after_seq: int
    page_size: int
    def __init__(self, avatar_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., page_size: _Optional[int] = ...) -> None: ...

class ListAuditEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_after_seq")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    next_after_seq: int
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ..., next_after_seq: _Optional[int] = ...) -> None: ...

class GetAvatarUsageRequest(_message.Message):
    __slots__ = ("avatar_id", "start", "end")
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    def __init__(self, avatar_id: _Optional[str] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AvatarUsageRow(_message.Message):
    __slots__ = ("avatar_id", "platform", "tenant", "sessions", "stream_seconds", "stream_hours", "cost", "voice")
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STREAM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STREAM_HOURS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    platform: str
    tenant: str
    sessions: int
    stream_seconds: float
    stream_hours: float
    cost: float
    voice: str
    def __init__(self, avatar_id: _Optional[str] = ..., platform: _Optional[str] = ..., tenant: _Optional[str] = ..., sessions: _Optional[int] = ..., stream_seconds: _Optional[float] = ..., stream_hours: _Optional[float] = ..., cost: _Optional[float] = ..., voice: _Optional[str] = ...) -> None: ...

class GetAvatarUsageResponse(_message.Message):
    __slots__ = ("rows", "as_of")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[AvatarUsageRow]
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, rows: _Optional[_Iterable[_Union[AvatarUsageRow, _Mapping]]] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PiperVoiceFiles(_message.Message):
    __slots__ = ("model", "config")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    model: bytes
    config: bytes
    def __init__(self, model: _Optional[bytes] = ..., config: _Optional[bytes] = ...) -> None: ...

class RegisterVoiceRequest(_message.Message):
    __slots__ = ("voice_id", "tenant", "licence", "piper", "service_config")
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LICENCE_FIELD_NUMBER: _ClassVar[int]
    PIPER_FIELD_NUMBER: _ClassVar[int]
    SERVICE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    tenant: str
    licence: Licence
    piper: PiperVoiceFiles
    service_config: str
    def __init__(self, voice_id: _Optional[str] = ..., tenant: _Optional[str] = ..., licence: _Optional[_Union[Licence, _Mapping]] = ..., piper: _Optional[_Union[PiperVoiceFiles, _Mapping]] = ..., service_config: _Optional[str] = ...) -> None: ...

class Voice(_message.Message):
    __slots__ = ("voice_id", "tenant", "licence", "kind", "sha256", "registered_at", "revoked", "revoked_reason", "revoked_at")
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LICENCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_REASON_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    tenant: str
    licence: Licence
    kind: str
    sha256: str
    registered_at: _timestamp_pb2.Timestamp
    revoked: bool
    revoked_reason: str
    revoked_at: _timestamp_pb2.Timestamp
    def __init__(self, voice_id: _Optional[str] = ..., tenant: _Optional[str] = ..., licence: _Optional[_Union[Licence, _Mapping]] = ..., kind: _Optional[str] = ..., sha256: _Optional[str] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked: _Optional[bool] = ..., revoked_reason: _Optional[str] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetVoiceRequest(_message.Message):
    __slots__ = ("voice_id",)
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    def __init__(self, voice_id: _Optional[str] = ...) -> None: ...

class ListVoicesRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListVoicesResponse(_message.Message):
    __slots__ = ("voices",)
    VOICES_FIELD_NUMBER: _ClassVar[int]
    voices: _containers.RepeatedCompositeFieldContainer[Voice]
    def __init__(self, voices: _Optional[_Iterable[_Union[Voice, _Mapping]]] = ...) -> None: ...

class RevokeVoiceLicenceRequest(_message.Message):
    __slots__ = ("voice_id", "reason")
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    reason: str
    def __init__(self, voice_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
