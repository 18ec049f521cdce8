"""End to end in one process: a real scheduler and a real worker on free ports,
driven by a tenant client; outputs read back with PyAV."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from avatarfarm import client
from avatarfarm.face_motion import FACE_MOTION_DIM, INDEX
from avatarfarm.v1 import live_input_pb2, live_input_pb2_grpc, sessions_pb2, sessions_pb2_grpc, types_pb2
from scheduler.config import SchedulerConfig
from scheduler.server import start as start_scheduler
from tests.media import mouth_motion, mouth_openness, probe
from workers.config import WorkerConfig
from workers.device.onnx import ProviderChoice
from workers.media.audio import SAMPLE_RATE
from workers.media.tts import EspeakTTS
from workers.rooms.room import Pacing
from workers.server import RunningWorker
from workers.server import start as start_worker

SPEECH = "Hello and welcome! Today every pair of running shoes is half price."


@contextlib.asynccontextmanager
async def farm(tmp_path: Path, model_dir: Path, scheduler_kw: dict[str, Any] | None = None,
               **worker_kw: Any) -> AsyncIterator[
        tuple[sessions_pb2_grpc.SessionServiceStub, RunningWorker]]:
    sched = await start_scheduler(SchedulerConfig(
        listen="127.0.0.1:0", metrics_port=0, database=tmp_path / "state.db",
        avatar_dir=model_dir / "avatars", overcommit=20.0, **(scheduler_kw or {})))
    conf = WorkerConfig(scheduler=f"127.0.0.1:{sched.port}", listen="127.0.0.1:0", worker_id="w1",
                        model_dir=model_dir, output_dir=tmp_path / "out", provider=ProviderChoice.CPU,
                        profile_encode_sizes="256x256", profile_iterations=1,
                        **{"metrics_port": 0, "pacing": Pacing.FAST, "profile_render_sides": "256",
                           **worker_kw})
    worker = await start_worker(conf)
    await asyncio.wait_for(worker.agent.connected.wait(), 30)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{sched.port}")
    try:
        yield sessions_pb2_grpc.SessionServiceStub(channel), worker
    finally:
        await channel.close()
        await worker.stop(grace=0.1)
        await sched.stop(grace=0.1)


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 240))


def ended(s: types_pb2.Session) -> bool:
    return s.state in client.TERMINAL


@pytest.mark.parametrize("encoder_processes", [0, 1], ids=["encoder-threads", "encoder-process"])
def test_a_text_room_renders_speech_and_idle_to_a_playable_file(tmp_path: Path, model_dir: Path,
                                                               encoder_processes: int) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir, encoder_processes=encoder_processes) as (stub, _worker):
            s = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
                "vendor", "room-1", width=320, height=256, fps=25, file_path="rooms/room-1.mp4",
                seconds=6.0, script=[types_pb2.ScriptSegment(text=SPEECH)])))
            assert s.state == types_pb2.SESSION_STATE_PLACED and s.worker_id == "w1"
            done = await client.wait_for(stub, s.session_id, ended, 120)
            assert done.state == types_pb2.SESSION_STATE_ENDED, done.reason
            assert done.provider == "CPUExecutionProvider"
            assert done.progress.frames_rendered == 150
            assert done.progress.stream_seconds == pytest.approx(6.0)
            assert done.progress.device_seconds > 0
            assert set(done.progress.stage_seconds) == {"tts", "audio_to_motion", "render", "encode",
                                                    "alignment"}
            out = tmp_path / "out" / "@vendor" / "rooms" / "room-1.mp4"
            f = probe(out)
            assert (f.video_codec, f.width, f.height, f.frames) == ("h264", 320, 256, 150)
            assert f.fps == pytest.approx(25.0)
            assert f.audio_codec == "aac" and f.audio_rms > 0.01
            assert f.duration == pytest.approx(6.0, abs=0.1)
            # The speech lasts ~3.5 s; the last 1.5 s are idle. Lips move with the voice.
            speech_s = EspeakTTS().synthesize(SPEECH).size / SAMPLE_RATE
            assert 2.0 < speech_s < 4.4
            motion = mouth_motion(out)
            during = motion[5:int(speech_s * 25) - 5].mean()
            after = motion[int(speech_s * 25) + 10:].mean()
            assert during > 3 * after, (during, after)
            openness = mouth_openness(out)
            assert openness[5:int(speech_s * 25) - 5].mean() > openness[int(speech_s * 25) + 10:].mean() + 5

    run(body())


def test_live_voice_and_mocap_inputs_drive_their_rooms(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as (stub, worker):
            voice = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
                "vendor", "voice", drive=types_pb2.DRIVE_MODE_VOICE, width=256, height=256,
                file_path="voice.mp4", seconds=4.0)))
            mocap = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
                "vendor", "mocap", drive=types_pb2.DRIVE_MODE_MOCAP, width=256, height=256,
                file_path="mocap.mp4", seconds=4.0)))
            # Live inputs go to the worker named in the session, not through the scheduler.
            assert voice.input_endpoint == f"127.0.0.1:{worker.port}"
            speech = EspeakTTS().synthesize(SPEECH)[: int(2.0 * SAMPLE_RATE)]
            jaw = np.zeros((100, FACE_MOTION_DIM), np.float32)  # ARKit blendshapes, head rotation
            jaw[:50, INDEX["jawOpen"]] = np.tile([0.0, 0.0, 1.0, 1.0, 1.0], 10)  # open-close for 2 s
            pushed = await asyncio.gather(
                client.push_audio(voice.input_endpoint, voice.session_id, speech, SAMPLE_RATE,
                                  input_token=voice.input_token),
                client.push_motion(mocap.input_endpoint, mocap.session_id, jaw, 25,
                                   input_token=mocap.input_token))
            assert pushed[0].accepted == 20 and pushed[1].accepted == 100
            for s in (voice, mocap):
                done = await client.wait_for(stub, s.session_id, ended, 120)
                assert done.state == types_pb2.SESSION_STATE_ENDED, done.reason
            v = mouth_motion(tmp_path / "out" / "@vendor" / "voice.mp4")
            assert v[5:45].mean() > 3 * v[60:].mean()
            assert probe(tmp_path / "out" / "@vendor" / "voice.mp4").audio_rms > 0.01
            m = mouth_openness(tmp_path / "out" / "@vendor" / "mocap.mp4")
            said = jaw[:50, INDEX["jawOpen"]]
            opened, closed = m[:50][said > 0.5].mean(), m[:50][said < 0.5].mean()
            assert opened > closed + 10
            # Mocap rooms skip audio-to-motion, so they cost less.
            voice_done = await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=voice.session_id))
            mocap_done = await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=mocap.session_id))
            assert mocap_done.progress.stage_seconds["audio_to_motion"] == 0.0
            assert voice_done.progress.stage_seconds["audio_to_motion"] > 0.0

    run(body())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_rtmp_room_fails_clearly_and_others_keep_streaming(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as (stub, _worker):
            bad = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
                "vendor", "bad", width=256, height=256, seconds=3.0,
                rtmp_url=f"rtmp://127.0.0.1:{_closed_port()}/live/bad")))
            good = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
                "vendor", "good", width=256, height=256, seconds=3.0, file_path="good.mp4")))
            failed = await client.wait_for(stub, bad.session_id, ended, 60)
            assert failed.state == types_pb2.SESSION_STATE_FAILED
            assert "rtmp://127.0.0.1" in failed.reason and "failed" in failed.reason
            ok = await client.wait_for(stub, good.session_id, ended, 60)
            assert ok.state == types_pb2.SESSION_STATE_ENDED
            assert probe(tmp_path / "out" / "@vendor" / "good.mp4").frames == 75

    run(body())


def test_worker_live_input_refuses_wrong_inputs(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir) as (stub, worker):
            text = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
                "vendor", "text", width=256, height=256, seconds=0.0, file_path="t.mp4")))
            voice = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
                "vendor", "voice", drive=types_pb2.DRIVE_MODE_VOICE, width=256, height=256,
                seconds=1.0, file_path="v.mp4")))
            mocap = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
                "vendor", "mocap", drive=types_pb2.DRIVE_MODE_MOCAP, width=256, height=256,
                seconds=1.0, file_path="m.mp4")))
            async with grpc.aio.insecure_channel(text.input_endpoint) as ch:
                live = live_input_pb2_grpc.LiveInputServiceStub(ch)

                async def one(msg: Any) -> Any:
                    yield msg

                def by(s: Any) -> Any:  # the room's own input token
                    return (("authorization", f"Bearer {s.input_token}"),)

                cases = [
                    (grpc.StatusCode.INVALID_ARGUMENT, live.PushAudio(one(live_input_pb2.AudioChunk(
                        session_id=voice.session_id, sample_rate=16000, pcm_s16le=b"\0" * 64001)), metadata=by(voice))),
                    (grpc.StatusCode.INVALID_ARGUMENT, live.PushAudio(one(live_input_pb2.AudioChunk(
                        session_id=voice.session_id, sample_rate=1000, pcm_s16le=b"\0\0")), metadata=by(voice))),
                    (grpc.StatusCode.INVALID_ARGUMENT, live.PushMotion(one(live_input_pb2.MotionFrame(
                        session_id=mocap.session_id, coefficients=[0.0] * 3)), metadata=by(mocap))),
                    (grpc.StatusCode.INVALID_ARGUMENT, live.PushMotion(one(live_input_pb2.MotionFrame(
                        session_id=mocap.session_id, coefficients=[float("nan")] * 8)), metadata=by(mocap))),
                    (grpc.StatusCode.FAILED_PRECONDITION, live.PushAudio(one(live_input_pb2.AudioChunk(
                        session_id=text.session_id, sample_rate=16000, pcm_s16le=b"\0\0")), metadata=by(text))),
                    (grpc.StatusCode.FAILED_PRECONDITION, live.PushMotion(one(live_input_pb2.MotionFrame(
                        session_id=text.session_id, coefficients=[0.0] * 8)), metadata=by(text))),
                    (grpc.StatusCode.NOT_FOUND, live.PushAudio(one(live_input_pb2.AudioChunk(
                        session_id="nope", sample_rate=16000, pcm_s16le=b"\0\0")), metadata=by(voice))),
                    # Another room's token, or none, opens nothing: the answer of an unknown room.
                    (grpc.StatusCode.NOT_FOUND, live.PushAudio(one(live_input_pb2.AudioChunk(
                        session_id=voice.session_id, sample_rate=16000, pcm_s16le=b"\0\0")),
                        metadata=by(mocap))),
                    (grpc.StatusCode.NOT_FOUND, live.PushMotion(one(live_input_pb2.MotionFrame(
                        session_id=mocap.session_id, coefficients=[0.0] * 8)))),
                ]
                for code, call in cases:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call
                    assert err.value.code() == code
                health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
                assert health.status == health_pb2.HealthCheckResponse.SERVING
            # A room without a duration streams until it is ended, then closes its output.
            await stub.EndSession(sessions_pb2.EndSessionRequest(session_id=text.session_id))
            for _ in range(200):
                if worker.agent.room(text.session_id) is None:
                    break
                await asyncio.sleep(0.05)
            assert worker.agent.room(text.session_id) is None
            assert probe(tmp_path / "out" / "@vendor" / "t.mp4").video_codec == "h264"

    run(body())


def test_the_worker_exports_its_metrics(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path, model_dir, metrics_port=-1) as (stub, worker):
            s = await stub.CreateSession(sessions_pb2.CreateSessionRequest(spec=client.spec(
                "vendor", "m", tier=types_pb2.TIER_PREMIUM, width=256, height=256, seconds=1.0,
                file_path="m.mp4")))
            done = await client.wait_for(stub, s.session_id, ended, 60)
            assert done.state == types_pb2.SESSION_STATE_ENDED
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{worker.metrics_port}/metrics").read().decode())
            assert 'avatarfarm_worker_frames_rendered_total{tier="premium"} 25.0' in text
            assert 'avatarfarm_worker_info{device_type="cpu",provider="CPUExecutionProvider"} 1.0' in text
            assert 'avatarfarm_worker_stage_seconds_total{stage="render"}' in text
            # What a worker behind sheds, by tier (counted from the rooms' stats).
            assert 'avatarfarm_worker_frames_given_up_total{tier="premium"}' in text
            assert 'avatarfarm_worker_frames_held_total{tier="premium"}' in text

    run(body())


def test_rooms_at_different_resolutions_batch_on_the_worker(tmp_path: Path, model_dir: Path) -> None:
    """Real-time rooms at two portrait sides on one worker: their items run as cross-room
    batches (size > 1 where the measured profile says batching pays: on a 2-core CPU the
    small audio-to-motion model, whose calls are mostly overhead; on a GPU the renderer
    too), each side's renders are their own queue, and every frame is delivered."""
    import re

    async def body() -> None:
        async with farm(tmp_path, model_dir, metrics_port=-1, pacing=Pacing.REALTIME,
                        profile_render_sides="192,256") as (stub, worker):
            sizes = {"a": (256, 256), "b": (256, 256), "c": (320, 192), "d": (320, 192)}
            made = await asyncio.gather(*(stub.CreateSession(sessions_pb2.CreateSessionRequest(
                spec=client.spec("vendor", room, width=w, height=h, seconds=2.0,
                                 file_path=f"{room}.mp4",
                                 script=[types_pb2.ScriptSegment(text=SPEECH)])))
                for room, (w, h) in sizes.items()))
            done = await asyncio.gather(*(client.wait_for(stub, s.session_id, ended, 60)
                                          for s in made))
            assert [d.state for d in done] == [types_pb2.SESSION_STATE_ENDED] * 4
            assert [d.progress.frames_rendered for d in done] == [50] * 4
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{worker.metrics_port}/metrics").read().decode())
            calls = [(model, int(b), float(n)) for b, model, n in re.findall(
                r'avatarfarm_worker_batches_total\{batch_size="(\d+)",model="([^"]+)"\} ([\d.]+)',
                text)]
            # Audio-to-motion windows of all four rooms share calls: batches larger than one.
            assert max(b for m, b, _ in calls if m == "audio_to_motion") > 1, calls
            # Each portrait side is its own batch queue; no frame was rendered twice, and every
            # frame was rendered or replaced (a render that finished past its deadline is
            # both, so the sum may exceed 200 on a busy machine).
            rendered = {m: sum(b * n for mm, b, n in calls if mm == m) for m, _, _ in calls}
            late = sum(d.progress.late_frames for d in done)
            both = rendered["reference-lite@256"] + rendered["reference-lite@192"]
            assert both <= 200 and both + late >= 200, (rendered, late)
        for room in sizes:
            assert probe(tmp_path / "out" / "@vendor" / f"{room}.mp4").frames == 50

    run(body())
