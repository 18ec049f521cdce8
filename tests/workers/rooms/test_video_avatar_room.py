"""A room on a video avatar: the Wav2Lip family inside the farm's room, through the
batcher, encoder and lip-sync check, on a bundle prepared from a video of a real
photograph (scikit-image's astronaut)."""

from __future__ import annotations

import asyncio
import dataclasses
import typing
from pathlib import Path

import numpy as np
import pytest
from skimage import data

from avatarfarm.avatars import write_bundle_pointer
from avatarfarm.domain import DriveMode, ScriptSegment
from avatarfarm.preparation.bundle import Bundle, VideoLimits, prepare
from avatarfarm.preparation.faces import TrackPolicy
from tests.builders import make_video_room
from tests.media import encode_clip, head_motion, probe, video_avatar_mouths
from workers.device.onnx import ProviderChoice
from workers.device.pipeline import Pipeline
from workers.media.alignment import SyncEstimate
from workers.media.face_paste import seam
from workers.models.folder import ModelFolder, build_reference
from workers.rooms.room import Room, RoomRefused, RoomState
from workers.rooms.wav2lip_frames import loop_index

AVATAR = "astronaut"


@pytest.fixture(scope="module")
def video_pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, Bundle]:
    root = tmp_path_factory.mktemp("models")
    folder = build_reference(root, "lite", wav2lip="tiny")
    frames, _ = head_motion(data.astronaut(), 30)
    bundle = prepare(encode_clip(frames), folder.avatar_dir / "bundles", (96,),
                     limits=VideoLimits(min_seconds=1.0), policy=TrackPolicy(min_side=64))
    write_bundle_pointer(folder.avatar_dir, AVATAR, bundle.manifest.bundle_id)
    p = Pipeline(ModelFolder.open(root), ProviderChoice.CPU, intra_op_threads=2)
    yield p, bundle  # type: ignore[misc]
    p.close()


def video_room(pipeline: Pipeline, tmp_path: Path, *, drive: DriveMode = DriveMode.TEXT,
               seconds: float = 4.0, script: tuple[ScriptSegment, ...] = ()) -> Room:
    return typing.cast(Room, make_video_room(pipeline, tmp_path, AVATAR, drive=drive, seconds=seconds,
                                             script=script, sync_interval_seconds=1.0))


def test_a_text_room_on_a_video_avatar_moves_the_mouth_with_speech_and_skips_pauses(
        video_pipeline: tuple[Pipeline, Bundle], tmp_path: Path) -> None:
    pipeline, bundle = video_pipeline
    script = (ScriptSegment("Welcome to the live room, three new offers today."),)
    room = video_room(pipeline, tmp_path, script=script)
    checks: list[SyncEstimate | None] = []
    room.on_sync = lambda r, est: checks.append(est)
    assert AVATAR not in pipeline.warm_avatars()
    asyncio.run(room.run())
    assert room.state is RoomState.ENDED, room.reason
    st = room.stats
    assert st.frames_rendered == 100 and st.late_frames == 0
    assert AVATAR in pipeline.warm_avatars()  # reported to the scheduler as warm
    # Speech ran the model, the pause after it did not: device time only where speaking.
    assert 0 < st.batched_items < st.frames_rendered
    assert st.stage_seconds["render"] > 0 and st.stage_seconds["audio_to_motion"] == 0
    # The lip-sync check reads the redrawn mouth: lips and voice found together.
    assert any(est is not None and est.offset_frames == 0 for est in checks)

    facts = probe(tmp_path / "v.mp4")
    assert (facts.width, facts.height, facts.frames) == (320, 256, 100)
    assert facts.duration == pytest.approx(4.0, abs=0.05)
    decoded, opened = video_avatar_mouths(tmp_path / "v.mp4", bundle, rows=(0.62, 0.80), cols=(0.38, 0.62))
    base = bundle.frames()
    # The clip (512x512) is fitted into the 320x256 canvas: scaled to 256, centred.
    scale, left = 256 / 512, (320 - 256) // 2
    speaking, quiet = opened[:room.stats.batched_items // 2], opened[-25:]
    # The speech's frames open the mouth well past the pause's (base frames, mouth shut).
    assert np.median(speaking) > np.median(quiet) + 10
    # No seam: the canvas around the pasted face steps no more than the base frame's.
    for i in range(5, 30, 5):
        b = bundle.boxes[loop_index(i, len(base))]
        box = dataclasses.replace(b, x=left + int(b.x * scale), y=int(b.y * scale),
                                  w=int(b.w * scale), h=int(b.h * scale))
        canvas_base = np.pad(base[loop_index(i, len(base))][::2, ::2], ((0, 0), (left, left), (0, 0)),
                             mode="edge")
        assert seam(decoded[i], box) < seam(canvas_base, box) + 4.0


def test_a_motion_capture_room_on_a_video_avatar_is_refused(
        video_pipeline: tuple[Pipeline, Bundle], tmp_path: Path) -> None:
    pipeline, _ = video_pipeline
    with pytest.raises(RoomRefused, match="no motion input"):
        video_room(pipeline, tmp_path, drive=DriveMode.MOCAP)


def test_a_live_voice_drives_a_video_avatar(video_pipeline: tuple[Pipeline, Bundle],
                                            tmp_path: Path) -> None:
    from workers.media.tts import EspeakTTS

    pipeline, _ = video_pipeline
    room = video_room(pipeline, tmp_path, drive=DriveMode.VOICE, seconds=3.0)
    voice = EspeakTTS().synthesize("Live from the studio.")

    async def body() -> None:
        task = room.start()
        for i in range(0, voice.size, 1600):  # 100 ms chunks, as a client sends them
            await room.audio_in.push(voice[i:i + 1600])
        room.audio_in.producer_closed()
        await asyncio.wait_for(task, 60)

    asyncio.run(body())
    assert room.state is RoomState.ENDED, room.reason
    # Exactly 3 s of stream, though each frame waited for 0.2 s of audio past it.
    assert room.stats.frames_rendered == 75 and probe(tmp_path / "v.mp4").frames == 75
    speech_frames = round(voice.size / 16_000 * 25)
    assert 0.5 * speech_frames < room.stats.batched_items <= speech_frames + 6


def test_the_start_up_profile_measures_the_face_model_beside_a_video_avatar(
        video_pipeline: tuple[Pipeline, Bundle]) -> None:
    from avatarfarm.domain import Stage
    from workers.device.profile import measure

    pipeline, _ = video_pipeline
    # "astronaut" sorts before "presenter": the renderer is still measured on a portrait.
    assert pipeline.folder.avatar_ids() == [AVATAR, "presenter"]
    profiles = measure(pipeline, [64], [], iterations=1, max_batch=2)
    face = [p for p in profiles if p.stage is Stage.FACE]
    # Named by family and export, as the scheduler matches a video avatar's rooms to it.
    assert len(face) == 1 and (face[0].width, face[0].model) == (96, f"wav2lip/{pipeline.face_key.model}")
    assert [b for b, _ in face[0].latencies] == [1, 2]
    assert any(p.stage is Stage.RENDER and p.width == 64 for p in profiles)


def test_drift_on_a_video_avatar_is_measured_on_the_redrawn_mouth_and_corrected(
        video_pipeline: tuple[Pipeline, Bundle], tmp_path: Path) -> None:
    speech = ("Welcome to the live room. Today we have three new offers for you, and every one "
              "of them ships tomorrow morning. Stay with us and ask your questions.")
    pipeline, _ = video_pipeline
    room = video_room(pipeline, tmp_path, seconds=10.0, script=(ScriptSegment(speech),))
    # The redrawn mouth is made to lag its audio by 3 frames (120 ms), as a drifting stream would.
    room.video_lag_frames = 3
    assert room.sync is not None
    room.sync.every_frames = room.sync.window
    checks: list[SyncEstimate] = []
    room.on_sync = lambda r, est: checks.append(est) if est is not None else None
    asyncio.run(room.run())
    assert room.state is RoomState.ENDED, room.reason
    assert len(checks) >= 3
    assert 3 <= checks[0].offset_frames <= 4
    assert room.stats.sync_corrections >= 1 and room.av_delay.audio_frames >= 3
    assert all(abs(c.offset_frames) <= 1 for c in checks[1:])
    assert probe(tmp_path / "v.mp4").frames == 250
