"""A camera room end to end: the scheduler places it and says where its driver publishes,
a driver publishes the real photograph with a moving mouth and a tone over RTMP
(FFmpeg's client, as OBS or ffmpeg would), and the room's stream opens the avatar's
mouth where the driver opened theirs, with the driver's own sound; a stream key that is
not the room's is refused. On a platform that requires a live driver, a frozen feed is
told to watchers, recorded in the audit log and, past the grace period, ends the room."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import numpy as np

from avatarfarm import client
from avatarfarm.v1 import avatars_pb2, avatars_pb2_grpc, sessions_pb2, sessions_pb2_grpc, types_pb2
from scheduler.policy.platforms import PlatformPolicy
from tests.driver_publisher import mouth_open
from tests.media import mouth_openness, probe
from tests.test_farm import ended, farm, run


async def publish(url: str, seconds: float, pattern: str = "live") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.driver_publisher", url, "--seconds", str(seconds),
        "--pattern", pattern,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def camera_room(stub: sessions_pb2_grpc.SessionServiceStub, output: str, seconds: float,
                      room: str = "cam", platform: str = "") -> types_pb2.Session:
    """A 256x256 camera room writing ``output``, once placed (it has its driver's URLs)."""
    spec = client.spec("vendor", room, drive=types_pb2.DRIVE_MODE_CAMERA, width=256, height=256,
                       file_path=output, seconds=seconds)
    spec.platform = platform or spec.platform
    created = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=spec))
    return await client.wait_for(stub, created.session_id, lambda s: bool(s.driver_url), 30)


def test_a_camera_room_moves_with_its_driver_and_speaks_with_their_voice(tmp_path: Path,
                                                                       model_dir: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as (stub, worker):
            room = await camera_room(stub, "cam.mp4", 3.0)
            url = room.driver_url
            assert url.startswith(f"rtmp://127.0.0.1:{worker.ingest.port}/live/")  # type: ignore[union-attr]
            key = url.rsplit("/", 1)[1]
            assert len(key) >= 32 and room.session_id not in key
            # Someone else's key is refused before any media is taken.
            code, out = await publish(url[:-4] + "AAAA", 0.5)
            assert code == 3 and "refused" in out
            # The room lasts 3 s of stream; a driver who would go on is cut off when it ends.
            code, out = await publish(url, 8.0)
            assert code == 3, out
            done = await client.wait_for(stub, room.session_id, ended, 60)
            assert done.state == types_pb2.SESSION_STATE_ENDED, done.reason
            assert done.progress.frames_rendered == 75 and done.driver_url == ""
            # A live driver (a person with a webcam's noise, never the same picture twice).
            assert done.progress.driver_state == types_pb2.DRIVER_STATE_LIVE
            assert 2.0 < done.progress.driven_seconds < 3.0 + 1e-6
            assert done.progress.driver.startswith("127.0.0.1:")
            # How far behind its driver the avatar is, measured on every driven frame.
            registry = worker.agent.metrics.registry
            count = registry.get_sample_value("avatarfarm_worker_driver_latency_seconds_count",
                                              {"tier": "standard"})
            total = registry.get_sample_value("avatarfarm_worker_driver_latency_seconds_sum",
                                              {"tier": "standard"})
            assert count is not None and total is not None and count >= 60
            assert 0 < total / count < 2.0

        path = tmp_path / "out" / "@vendor" / "cam.mp4"
        assert probe(path).frames == 75
        # The avatar's mouth follows the driver's, a few frames behind at most.
        openness = mouth_openness(path)
        said = np.array([mouth_open(i, "live") for i in range(100)], np.float32)
        best = max(np.corrcoef(openness[10:70], said[10 - lag:70 - lag])[0, 1] for lag in range(0, 8))
        assert best > 0.7
        # And the stream's sound is the driver's: the tone while their mouth is open, in
        # step with the avatar's mouth (within a frame).
        import av

        with av.open(str(path)) as c:
            audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
        rate = 48_000 if audio.size > 100_000 else 16_000
        per = rate // 25
        rms = np.array([np.sqrt(np.mean(audio[i * per:(i + 1) * per] ** 2)) for i in range(70)])
        loud = (rms > 0.05).astype(np.float32)
        assert 0.3 < loud.mean() < 0.7
        opened = (openness[:70] > (openness.max() + openness.min()) / 2).astype(np.float32)
        assert max(float(np.mean(loud[lag:] == opened[:70 - lag])) for lag in (0, 1)) > 0.85

    run(body())


def test_a_frozen_driver_is_told_audited_and_ends_the_room_where_a_live_one_is_required(
        tmp_path: Path, model_dir: Path) -> None:
    policy = PlatformPolicy(require_live_driver=True, end_when_driver_lost=True,
                            driver_grace_seconds=1.0)

    async def body() -> None:
        async with farm(tmp_path, model_dir, {"platforms": {"live-only": policy}}) as (stub, worker):
            room = await camera_room(stub, "frozen.mp4", 30.0, platform="live-only")
            events: list[sessions_pb2.SessionEvent] = []

            async def watch() -> None:
                async for ev in stub.WatchSession(sessions_pb2.WatchSessionRequest(
                        session_id=room.session_id)):
                    events.append(ev)

            watching = asyncio.create_task(watch())
            # The driver sends one picture over and over: frozen within 2 s, then 1 s of
            # grace on the idle loop, and the room ends, long before its 30 s.
            code, out = await publish(room.driver_url, 20.0, "still")
            assert code == 3, out  # cut off when the room ended
            done = await client.wait_for(stub, room.session_id, ended, 60)
            watching.cancel()
            assert done.state == types_pb2.SESSION_STATE_ENDED
            assert "frozen" in done.reason and "live driver" in done.reason, done.reason
            assert done.progress.driver_state == types_pb2.DRIVER_STATE_FROZEN
            assert done.progress.driven_seconds < 2.5 and done.progress.stream_seconds < 8.0
            told = [e.message for e in events if e.kind == sessions_pb2.SESSION_EVENT_KIND_DRIVER]
            assert any("frozen" in m for m in told), told
            # Who drove the avatar, and when they stopped being live, in its audit log.
            async with grpc.aio.insecure_channel(worker.agent.scheduler_address) as channel:
                log = await avatars_pb2_grpc.AvatarServiceStub(channel).ListAuditEntries(
                    avatars_pb2.ListAuditEntriesRequest(avatar_id=room.spec.avatar_id))
            mine = [e for e in log.entries if e.session_id == room.session_id]
            actions = [e.action for e in mine]
            assert actions[0] == "room_started" and actions[-1] == "room_ended"
            assert actions.index("driver_live") < actions.index("driver_not_live")
            live = next(e for e in mine if e.action == "driver_live")
            assert "127.0.0.1:" in live.detail and "Lavf" in live.detail
            assert "frozen" in next(e for e in mine if e.action == "driver_not_live").detail
        # The frozen driver's tone played while they counted as live; once held, the
        # room is silent on its idle loop.
        import av

        with av.open(str(tmp_path / "out" / "@vendor" / "frozen.mp4")) as c:
            audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
            rate = c.streams.audio[0].rate
        assert np.sqrt(np.mean(audio[rate // 2: rate] ** 2)) > 0.1
        assert np.sqrt(np.mean(audio[-rate // 2:] ** 2)) < 0.01

    run(body())


def test_a_driver_who_leaves_gets_a_grace_period_then_the_platform_decides(
        tmp_path: Path, model_dir: Path) -> None:
    platforms = {"strict": PlatformPolicy(end_when_driver_lost=True, driver_grace_seconds=2.0),
                 "lenient": PlatformPolicy()}  # holds on the idle loop until the room's end

    async def body() -> None:
        async with farm(tmp_path, model_dir, {"platforms": platforms}) as (stub, _):
            rooms = {}
            for name in platforms:
                rooms[name] = await camera_room(stub, f"{name}.mp4", 8.0, room=name, platform=name)
            for room in rooms.values():
                code, out = await publish(room.driver_url, 2.0)  # then they leave
                assert code == 0, out
            strict = await client.wait_for(stub, rooms["strict"].session_id, ended, 60)
            lenient = await client.wait_for(stub, rooms["lenient"].session_id, ended, 60)
            for done in (strict, lenient):
                assert done.state == types_pb2.SESSION_STATE_ENDED
                assert done.progress.driver_state == types_pb2.DRIVER_STATE_ABSENT
                assert 1.5 < done.progress.driven_seconds < 2.5
            # 2 s driven, 2 s of grace on the idle loop, then the end.
            assert "the driver left for 2 s" in strict.reason, strict.reason
            assert 3.5 < strict.progress.stream_seconds < 5.0
            assert lenient.reason == "reached max duration"
            assert lenient.progress.stream_seconds == 8.0

    run(body())


def test_a_camera_room_driven_over_whip(tmp_path: Path, model_dir: Path) -> None:
    """The same room, its driver publishing from WebRTC (as a browser or OBS's WHIP output)
    to the room's WHIP address: the avatar's mouth follows theirs."""
    from tests.whip_publisher import publish as publish_whip

    async def body() -> None:
        async with farm(tmp_path, model_dir) as (stub, worker):
            room = await camera_room(stub, "whip.mp4", 3.0)
            url = room.driver_whip_url
            assert url == f"http://127.0.0.1:{worker.whip.port}/whip/{room.driver_url.rsplit('/', 1)[1]}"  # type: ignore[union-attr]
            code, why = await publish_whip(url, 5.0)
            assert code == 201, why
            done = await client.wait_for(stub, room.session_id, ended, 60)
            assert done.state == types_pb2.SESSION_STATE_ENDED, done.reason
            assert done.progress.frames_rendered == 75
            assert done.progress.driver_state == types_pb2.DRIVER_STATE_LIVE
            assert done.progress.driver.startswith("127.0.0.1 (WHIP ")
        openness = mouth_openness(tmp_path / "out" / "@vendor" / "whip.mp4")
        said = np.array([mouth_open(i, "live") for i in range(100)], np.float32)
        best = max(np.corrcoef(openness[10:70], said[10 - lag:70 - lag])[0, 1] for lag in range(0, 8))
        assert best > 0.6

    run(body())


def test_the_driver_watches_their_avatar_in_a_browser_with_little_delay(tmp_path: Path,
                                                                        model_dir: Path) -> None:
    """Headless chromium opens the room's preview page while a driver publishes: it plays
    the room's frames over WebRTC and reports how late they reach it (the worker's clock
    in each frame's top edge against the browser's)."""
    from tests.browser import chromium_binary, start_chromium

    binary = chromium_binary()

    async def body() -> None:
        async with farm(tmp_path, model_dir) as (stub, worker):
            room = await camera_room(stub, "watched.mp4", 12.0)
            key = room.driver_url.rsplit("/", 1)[1]
            assert room.driver_preview_url == \
                f"http://127.0.0.1:{worker.whip.port}/preview/{key}"  # type: ignore[union-attr]
            driving = asyncio.create_task(publish(room.driver_url, 14.0))
            browser = await start_chromium(
                binary, room.driver_preview_url + "?report=1", tmp_path,
                "--autoplay-policy=no-user-gesture-required",
                "--disable-features=WebRtcHideLocalIpsWithMdns")
            try:
                # The page reports once it has shown 50 frames.
                await asyncio.wait_for(worker.whip.reported.wait(), 60)  # type: ignore[union-attr]
                reports = worker.whip.reports  # type: ignore[union-attr]
            finally:
                browser.kill()
                await browser.wait()
            report = reports[key]
            assert (report["width"], report["height"], report["frames"]) == (256, 256, 50)
            assert 0 <= report["latency_ms"] < 1000, report
            await driving
            done = await client.wait_for(stub, room.session_id, ended, 60)
            assert done.state == types_pb2.SESSION_STATE_ENDED, done.reason

    run(body())


def test_blendshapes_from_the_drivers_own_tracker_drive_the_room_over_whip(
        tmp_path: Path, model_dir: Path) -> None:
    """A driver whose face tracker sends ARKit blendshapes over a WebRTC data channel: the
    avatar's mouth follows those (opening every other 5 frames), not what the face reader
    would make of the camera (which opens at random), and no face is read on the device."""
    from tests.whip_publisher import publish as publish_whip
    from workers.device.pipeline import FACE_READER_KEY

    def jaw(i: int) -> dict[str, float]:
        return {"jawOpen": 1.0 if i % 10 >= 5 else 0.0}

    async def body() -> None:
        async with farm(tmp_path, model_dir) as (stub, worker):
            before = worker.pipeline.engine.stats().get(FACE_READER_KEY)
            room = await camera_room(stub, "tracked.mp4", 3.0)
            code, why = await publish_whip(room.driver_whip_url, 5.0, blendshapes=jaw)
            assert code == 201, why
            done = await client.wait_for(stub, room.session_id, ended, 60)
            assert done.state == types_pb2.SESSION_STATE_ENDED, done.reason
            assert done.progress.driver_state == types_pb2.DRIVER_STATE_LIVE
            after = worker.pipeline.engine.stats().get(FACE_READER_KEY)
            # The first frames may come before the first message: a few reads at most.
            assert (after.items if after else 0) - (before.items if before else 0) <= 10
        openness = mouth_openness(tmp_path / "out" / "@vendor" / "tracked.mp4")
        sent = np.array([jaw(i)["jawOpen"] for i in range(100)], np.float32)
        camera = np.array([mouth_open(i, "live") for i in range(100)], np.float32)

        def best(said: np.ndarray) -> float:
            return max(np.corrcoef(openness[15:70], said[15 - lag:70 - lag])[0, 1] for lag in range(-3, 8))

        assert best(sent) > 0.7 and best(camera) < 0.5

    run(body())
