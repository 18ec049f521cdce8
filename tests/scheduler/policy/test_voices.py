"""What a tenant is told of a text room's voice: that it failed (and why) and that it
speaks again, once each way; the reason survives the progress round trip and a room
that moved to another worker starts from its new worker's word."""

from __future__ import annotations

from avatarfarm import convert
from avatarfarm.domain import Progress
from scheduler.policy.voices import voice_change
from scheduler.state.sessions import plus

DOWN = "TTS service for voice 'anna' is failing (HTTP 503); next try in 4.5 s"


def test_a_voice_failing_and_coming_back_is_told_once_each_way() -> None:
    ok, down = Progress(), Progress(voice_unavailable=DOWN)
    assert voice_change(ok, ok) is None
    told = voice_change(ok, down)
    assert told is not None and "holds on its idle loop" in told and DOWN in told
    # Only the wording changed (when the next try is): not news.
    assert voice_change(down, Progress(voice_unavailable=DOWN.replace("4.5", "0.5"))) is None
    assert voice_change(down, ok) == "the voice speaks again"


def test_the_reason_travels_with_progress_and_a_moved_room_takes_its_new_workers_word() -> None:
    down = Progress(stream_seconds=10.0, voice_unavailable=DOWN)
    assert convert.checked_progress_from_pb(convert.progress_to_pb(down)) == down
    # The earlier assignment's voice failed; the new worker's speaks.
    assert plus(down, Progress(stream_seconds=2.0)).voice_unavailable == ""
    assert plus(Progress(), down).voice_unavailable == DOWN
