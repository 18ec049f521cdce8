"""The scheduler's state as data: sessions and the transitions between them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from avatarfarm.domain import TRANSITIONS, Progress, SessionSpec, SessionState


class InvalidTransition(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    spec: SessionSpec
    state: SessionState
    seq: int  # admission order, also the list order
    created_at: float
    updated_at: float
    request_id: str = ""
    reason: str = ""
    worker_id: str = ""
    input_endpoint: str = ""
    progress: Progress = Progress()
    provider: str = ""
    device_type: str = ""
    load: float = 0.0  # device-seconds per second it costs its worker

    def moved(self, state: SessionState, now: float, **changes: object) -> Session:
        """This session in ``state``; raises InvalidTransition if the table forbids it."""
        if state is not self.state and state not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"session {self.session_id}: {self.state.value} -> {state.value}")
        return dataclasses.replace(self, state=state, updated_at=now, **changes)  # type: ignore[arg-type]
