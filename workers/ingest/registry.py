"""Which camera room a driver's stream key opens: each room, when it starts, opens its
credential (a secret the tenant receives with the room, not its session id) with a
factory for its `DriverSink`; the ingest asks `authorize` for every publisher. A room
takes one driver at a time: a second publisher is refused while the first publishes,
and the room's credential opens it again once that one has gone (a driver who
reconnects)."""

from __future__ import annotations

from collections.abc import Callable

from workers.ingest.rtmp import DriverSink, IngestRefused, Publisher

SinkFactory = Callable[[Publisher], DriverSink]  # a room's sink for the driver it takes


class DriverRooms:
    """The ingest's `authorize`: stream key -> the room's sink."""

    def __init__(self) -> None:
        self._rooms: dict[str, SinkFactory] = {}
        self._driven: set[str] = set()
        self._live: dict[str, _Released] = {}  # the sink of each room's current driver

    def open(self, credential: str, sink: SinkFactory) -> None:
        if len(credential) < 16:
            raise ValueError("a driver credential must be a secret of 16 characters or more")
        self._rooms[credential] = sink

    def close(self, credential: str) -> None:
        """The room has ended: its key opens nothing, and its driver is disconnected."""
        self._rooms.pop(credential, None)
        live = self._live.pop(credential, None)
        if live is not None:
            live.wanted = False

    def driven(self, credential: str) -> bool:
        return credential in self._driven

    def authorize(self, name: str, publisher: Publisher) -> DriverSink:
        factory = self._rooms.get(name)
        if factory is None:
            raise IngestRefused("no camera room takes this stream key")
        if name in self._driven:
            raise IngestRefused("this room already has its driver: one publisher at a time")
        self._driven.add(name)

        def release() -> None:
            self._driven.discard(name)
            self._live.pop(name, None)

        sink = self._live[name] = _Released(factory(publisher), release)
        return sink


class _Released:
    """A sink that frees its room for the next driver when its publisher goes."""

    def __init__(self, sink: DriverSink, release: Callable[[], None]) -> None:
        self._sink, self._release = sink, release
        self.wanted = True  # False: the room ended (`DriverRooms.close`)

    def tag(self, kind: int, timestamp_ms: int, payload: bytes) -> None:
        self._sink.tag(kind, timestamp_ms, payload)

    def closed(self, reason: str) -> None:
        self._release()
        self._sink.closed(reason)
