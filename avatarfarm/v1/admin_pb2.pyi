from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "device_type", "provider", "utilisation", "load", "capacity", "rooms", "accepting", "draining", "drain_reason", "drain_seconds_left", "seen_seconds_ago")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    UTILISATION_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ROOMS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTING_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    DRAIN_REASON_FIELD_NUMBER: _ClassVar[int]
    DRAIN_SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    SEEN_SECONDS_AGO_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    device_type: str
    provider: str
    utilisation: float
    load: float
    capacity: float
    rooms: int
    accepting: bool
    draining: bool
    drain_reason: str
    drain_seconds_left: float
    seen_seconds_ago: float
    def __init__(self, worker_id: _Optional[str] = ..., device_type: _Optional[str] = ..., provider: _Optional[str] = ..., utilisation: _Optional[float] = ..., load: _Optional[float] = ..., capacity: _Optional[float] = ..., rooms: _Optional[int] = ..., accepting: _Optional[bool] = ..., draining: _Optional[bool] = ..., drain_reason: _Optional[str] = ..., drain_seconds_left: _Optional[float] = ..., seen_seconds_ago: _Optional[float] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "deadline_seconds", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    deadline_seconds: float
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., deadline_seconds: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class ListPoolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolInfo(_message.Message):
    __slots__ = ("pool", "device_type", "desired", "ready", "booting", "draining", "reason")
    POOL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    BOOTING_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    pool: str
    device_type: str
    desired: int
    ready: int
    booting: int
    draining: int
    reason: str
    def __init__(self, pool: _Optional[str] = ..., device_type: _Optional[str] = ..., desired: _Optional[int] = ..., ready: _Optional[int] = ..., booting: _Optional[int] = ..., draining: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("autoscaler", "pools")
    AUTOSCALER_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    autoscaler: bool
    pools: _containers.RepeatedCompositeFieldContainer[PoolInfo]
    def __init__(self, autoscaler: _Optional[bool] = ..., pools: _Optional[_Iterable[_Union[PoolInfo, _Mapping]]] = ...) -> None: ...
