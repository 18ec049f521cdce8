"""A text room's voice failing on its worker (a TTS service down) reaches the room's
watchers as a VOICE event once, with the worker's reason, and again once it speaks."""

from __future__ import annotations

import asyncio
from pathlib import Path

from avatarfarm.domain import Progress, SessionState
from scheduler.state.sessions import EventKind
from scheduler.state.worker_conn import AssignCmd
from tests.builders import connect, make_core, make_spec, sent

DOWN = "TTS service for voice 'anna' failed 3 times: HTTP 503"


def test_a_voice_failing_and_coming_back_is_told_to_watchers_once_each_way(tmp_path: Path) -> None:
    async def body() -> None:
        core, _ = make_core(tmp_path)
        conn = connect(core)
        sid = core.create(make_spec("r1")).session_id
        [assign] = [c for c in sent(conn) if isinstance(c, AssignCmd)]

        def report(seconds: float, unavailable: str = "") -> None:
            core.worker_update(conn, sid, assign.epoch, SessionState.RUNNING, "",
                               Progress(stream_seconds=seconds, voice_unavailable=unavailable))

        report(1.0)
        watch = core.watch(sid)
        assert (await anext(watch)).kind is EventKind.STATE
        report(2.0, DOWN)
        ev = await anext(watch)
        assert ev.kind is EventKind.VOICE and DOWN in ev.message
        assert ev.session.progress.voice_unavailable == DOWN
        report(3.0, DOWN + "; next try in 0.5 s")  # still down: progress, not news
        assert (await anext(watch)).kind is EventKind.STATE
        report(4.0)
        ev = await anext(watch)
        assert ev.kind is EventKind.VOICE and ev.message == "the voice speaks again"

    asyncio.run(body())
