"""The rooms this worker runs, by session and the assignment epoch each runs under.

A session has at most one room here. An assignment repeated after a reconnect (the
same epoch) is the room already running; a newer epoch for a session still here
means the room moved away and back, and the old run is abandoned. When the worker
registers again after being away, the scheduler says which rooms it keeps here
(`confirm`): the others were moved meanwhile and stop without writing another
frame.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

from workers.rooms.room import Room, RoomState

log = logging.getLogger(__name__)


class RoomRegistry(Mapping[str, Room]):
    """The rooms by session id; read as a mapping, changed through its methods."""

    def __init__(self) -> None:
        self._rooms: dict[str, Room] = {}

    def __getitem__(self, session_id: str) -> Room:
        return self._rooms[session_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rooms)

    def __len__(self) -> int:
        return len(self._rooms)

    def admit(self, session_id: str, epoch: int) -> bool:
        """Whether an assignment starts a room: False when the room already runs here
        under that epoch. An older run of the session is abandoned and forgotten."""
        old = self._rooms.get(session_id)
        if old is None:
            return True
        if old.epoch == epoch:
            return False
        old.abandon(f"superseded by assignment {epoch}")
        del self._rooms[session_id]
        return True

    def add(self, room: Room) -> None:
        self._rooms[room.session_id] = room

    def remove(self, room: Room) -> None:
        """Forgets a room that ended, unless a newer run of its session replaced it."""
        if self._rooms.get(room.session_id) is room:
            del self._rooms[room.session_id]

    def active(self) -> dict[str, int]:
        """The epoch of each room still this worker's (not moved elsewhere), by session:
        what the worker registers with."""
        return {sid: r.epoch for sid, r in self._rooms.items() if not r.superseded}

    def running(self) -> list[Room]:
        """Rooms streaming for this worker: those whose progress is reported."""
        return [r for r in self._rooms.values() if r.state is RoomState.RUNNING and not r.superseded]

    def hold_all(self) -> None:
        """Every room writes nothing more to its output until `confirm` says it is ours."""
        for r in self._rooms.values():
            r.hold()

    def confirm(self, confirmed: dict[str, int]) -> None:
        """After registering: rooms the scheduler kept (session and epoch) go on; the
        others were moved while this worker was away and stop without writing another
        frame."""
        for sid, room in list(self._rooms.items()):
            if confirmed.get(sid) == room.epoch:
                if room.held:
                    log.info("room %s confirmed (assignment %d): output resumes", sid, room.epoch)
                room.release_hold()
            else:
                log.warning("room %s (assignment %d) was moved while this worker was away; "
                            "stopping it", sid, room.epoch)
                room.abandon("moved to another worker while this one was away")

    def load(self) -> float:
        """Measured device time per second over the rooms' lifetimes (a rough live figure)."""
        total = 0.0
        for r in self._rooms.values():
            secs = r.stats.stream_seconds
            if secs > 0:
                total += r.stats.device_seconds / secs
        return total
