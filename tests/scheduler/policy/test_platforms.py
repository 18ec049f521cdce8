"""Platform policies over real gRPC: a platform that requires a live human driver
refuses text-driven rooms; the platform's label travels in the assignment; usage
is reported by platform."""

from __future__ import annotations

from pathlib import Path

import grpc

from avatarfarm import client
from avatarfarm.v1 import sessions_pb2, types_pb2
from scheduler.policy.platforms import LabelPosition, PlatformPolicy
from tests.scheduler.api.test_service import ProtocolWorker, create_req, expect_status, run, scheduler

POLICIES = {
    "douyin": PlatformPolicy(require_live_driver=True, label_text="AI-GENERATED",
                             label_position=LabelPosition.BOTTOM_LEFT, label_size=0.08),
    "own-site": PlatformPolicy(label=False),
}


def req(room: str, platform: str, drive: int = types_pb2.DRIVE_MODE_TEXT) -> sessions_pb2.CreateSessionRequest:
    r = create_req(room, drive=drive, seconds=0.0)
    r.spec.platform = platform
    return r


def test_platform_policies_refuse_label_and_meter(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir, platforms=POLICIES) as (_, stub, ch):
            details = await expect_status(grpc.StatusCode.PERMISSION_DENIED,
                                          stub.CreateSession(req("text-room", "douyin")))
            assert "live human driver" in details
            worker = ProtocolWorker(ch, "w1")
            voice = await stub.CreateSession(req("voice-room", "douyin", types_pb2.DRIVE_MODE_VOICE))
            a = (await worker.next("assign")).assign
            assert a.session_id == voice.session_id and a.spec.platform == "douyin"
            assert (a.label.text, a.label.position, round(a.label.size, 3)) == \
                ("AI-GENERATED", "bottom-left", 0.08)
            own = await stub.CreateSession(req("own", "own-site"))
            b = (await worker.next("assign")).assign
            assert b.session_id == own.session_id and not b.HasField("label")
            other = await stub.CreateSession(req("elsewhere", "youtube"))
            c = (await worker.next("assign")).assign  # unlisted: labelled with the defaults
            assert c.session_id == other.session_id and c.label.text == "AI-generated"
            for s in (voice, own, other):
                worker.report(s.session_id, types_pb2.SESSION_STATE_RUNNING)
            worker.usage(1, [(voice.session_id, 50, 0.5), (own.session_id, 25, 0.25),
                             (other.session_id, 25, 0.25)])
            await client.wait_for(stub, other.session_id, lambda x: x.progress.frames_rendered == 25, 10)
            r = await stub.GetUsage(sessions_pb2.GetUsageRequest(
                group_by=[sessions_pb2.USAGE_DIMENSION_PLATFORM]))
            assert {row.platform: row.stream_seconds for row in r.rows} == \
                {"douyin": 2.0, "own-site": 1.0, "youtube": 1.0}
            await worker.close()

    run(body)
