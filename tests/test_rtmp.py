"""RTMP push to a real local nginx-rtmp ingest, read back from its recording."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from avatarfarm import client
from avatarfarm.v1 import sessions_pb2, types_pb2
from tests import rtmp_ingest
from tests.media import mouth_motion, probe
from tests.test_farm import SPEECH, ended, farm, run

pytestmark = pytest.mark.slow


@pytest.fixture
def ingest(tmp_path: Path):  # type: ignore[no-untyped-def]
    why = rtmp_ingest.available()
    if why is not None:
        if os.environ.get("AVATARFARM_REQUIRE_RTMP"):
            pytest.fail(why)
        pytest.skip(why)
    server = rtmp_ingest.RtmpIngest(tmp_path / "nginx").start()
    yield server
    server.stop()


def test_a_room_pushes_h264_and_aac_over_rtmp(tmp_path: Path, model_dir: Path,
                                               ingest: rtmp_ingest.RtmpIngest) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as (stub, _worker):
            s = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
                "vendor", "live-1", width=384, height=384, fps=25, seconds=5.0,
                rtmp_url=ingest.url("live-1"), script=[types_pb2.ScriptSegment(text=SPEECH)])))
            done = await client.wait_for(stub, s.session_id, ended, 120)
            assert done.state == types_pb2.SESSION_STATE_ENDED, done.reason

    run(body())
    ingest.stop()  # closes the recording
    recorded = ingest.record_dir / "live-1.flv"
    assert recorded.exists(), list(ingest.record_dir.iterdir())
    f = probe(recorded)
    assert (f.video_codec, f.width, f.height) == ("h264", 384, 384)
    assert f.audio_codec == "aac" and f.audio_rms > 0.01
    assert f.frames == 125
    motion = mouth_motion(recorded)
    assert motion[5:60].mean() > motion[110:].mean()


def test_the_worker_connects_to_the_address_it_checked_not_to_a_second_lookup(
        tmp_path: Path, pipeline: Any, ingest: rtmp_ingest.RtmpIngest) -> None:
    """DNS rebinding: a name that answers an allowed address when checked and another
    when FFmpeg connects. Here the name exists only in the resolver the test controls
    (checked once, answering the ingest's address); FFmpeg looking it up again would
    find nothing, so the stream reaching the ingest proves the checked address is used."""
    import asyncio
    import ipaddress

    from avatarfarm.domain import OutputKind
    from avatarfarm.egress import EgressPolicy
    from tests.builders import make_spec
    from workers.output.targets import OutputTarget
    from workers.rooms.room import Pacing, Room, RoomState

    lookups: list[str] = []

    async def resolve(host: str, port: int) -> list[Any]:
        lookups.append(host)
        return [ipaddress.ip_address("127.0.0.1")] if len(lookups) == 1 else \
            [ipaddress.ip_address("169.254.169.254")]  # what a rebinding name answers next

    url = f"rtmp://ingest.rebinding.test:{ingest.port}/live/pinned"
    policy = EgressPolicy()
    target = OutputTarget.resolve(OutputKind.RTMP, url, tmp_path, policy)
    room = Room("s1", make_spec("r", seconds=2.0), target, pipeline, pacing=Pacing.FAST,
                egress=policy, resolve=resolve)
    asyncio.run(asyncio.wait_for(room.run(), 120))
    assert room.state is RoomState.ENDED, room.reason
    assert lookups == ["ingest.rebinding.test"]
    ingest.stop()
    recorded = ingest.record_dir / "pinned.flv"
    assert recorded.exists(), list(ingest.record_dir.iterdir())
    assert probe(recorded).frames == 50
