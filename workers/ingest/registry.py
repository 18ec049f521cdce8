"""Which camera room a driver's stream key opens: each room, when it starts, opens its
credential (a secret the tenant receives with the room, not its session id) with a
factory for its `DriverCallbacks`; each ingest (RTMP, WHIP) claims the room for every
publisher. A room takes one driver at a time: a second publisher is refused while the
first publishes, whatever they publish with, and the room's credential opens it again
once that one has gone (a driver who reconnects)."""

from __future__ import annotations

from collections.abc import Callable

from workers.ingest.feed import DriverCallbacks, DriverFeed
from workers.ingest.rtmp import DriverSink, IngestRefused, Publisher
from workers.output.preview import PreviewTap

CallbacksFactory = Callable[[Publisher], DriverCallbacks]  # a room's, for the driver it takes


class Claim:
    """A publisher's hold on a room: its callbacks, whether the room still wants them
    (False once it ended), and `release` when they go."""

    def __init__(self, callbacks: DriverCallbacks, release: Callable[[], None]) -> None:
        self.callbacks = callbacks
        self._release = release
        self.wanted = True
        self._unwanted: list[Callable[[], None]] = []

    def on_unwanted(self, fn: Callable[[], None]) -> None:
        """Calls ``fn`` when the room ends while this publisher holds it."""
        self._unwanted.append(fn)

    def unwanted(self) -> None:
        self.wanted = False
        for fn in self._unwanted:
            fn()

    def release(self) -> None:
        self._release()


class DriverRooms:
    """Stream key -> the room's callbacks, one publisher at a time."""

    def __init__(self) -> None:
        self._rooms: dict[str, CallbacksFactory] = {}
        self._claims: dict[str, Claim] = {}  # each driven room's current publisher
        self._previews: dict[str, PreviewTap] = {}

    def open(self, credential: str, factory: CallbacksFactory, preview: PreviewTap | None = None) -> None:
        """The room's credential opens it to a driver (``factory`` makes where their stream
        goes) and, with ``preview``, to their preview of the avatar."""
        if len(credential) < 16:
            raise ValueError("a driver credential must be a secret of 16 characters or more")
        self._rooms[credential] = factory
        if preview is not None:
            self._previews[credential] = preview

    def preview(self, credential: str) -> PreviewTap | None:
        """The room's preview, for its driver's credential (None: no such room)."""
        return self._previews.get(credential)

    def close(self, credential: str) -> None:
        """The room has ended: its key opens nothing, and its driver is disconnected."""
        self._rooms.pop(credential, None)
        preview = self._previews.pop(credential, None)
        if preview is not None:
            preview.close()
        claim = self._claims.pop(credential, None)
        if claim is not None:
            claim.unwanted()

    def driven(self, credential: str) -> bool:
        return credential in self._claims

    def check(self, name: str) -> None:
        """Raises IngestRefused for a key that opens no room, or a room that has its driver."""
        if name not in self._rooms:
            raise IngestRefused("no camera room takes this stream key")
        if name in self._claims:
            raise IngestRefused("this room already has its driver: one publisher at a time")

    def claim(self, name: str, publisher: Publisher) -> Claim:
        """The room ``name`` opens, for ``publisher`` (refused as by `check`)."""
        self.check(name)
        factory = self._rooms[name]

        def release() -> None:
            if self._claims.get(name) is claim:
                del self._claims[name]

        claim = self._claims[name] = Claim(factory(publisher), release)
        return claim

    def authorize(self, name: str, publisher: Publisher) -> DriverSink:
        """The RTMP ingest's `authorize`: the room's claim, its stream decoded by a feed."""
        claim = self.claim(name, publisher)
        return _Released(DriverFeed(claim.callbacks), claim)


class _Released:
    """An RTMP sink that frees its room for the next driver when its publisher goes."""

    def __init__(self, sink: DriverSink, claim: Claim) -> None:
        self._sink, self._claim = sink, claim

    @property
    def wanted(self) -> bool:
        return self._claim.wanted and self._sink.wanted

    def tag(self, kind: int, timestamp_ms: int, payload: bytes) -> None:
        self._sink.tag(kind, timestamp_ms, payload)

    def closed(self, reason: str) -> None:
        self._claim.release()
        self._sink.closed(reason)
