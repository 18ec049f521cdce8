"""The reference models behave like avatar models: speech opens the mouth,
silence closes it; the renderer animates the regions the motion names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from workers.device.onnx import ModelInterfaceError, OrtModel, ProviderChoice
from workers.device.pipeline import Pipeline
from workers.media.audio import SAMPLE_RATE, MelStream, log_mel
from workers.media.motion import MOTION_DIM, Coef
from workers.media.tts import EspeakTTS
from workers.models.folder import RENDERER, ModelFolder, ModelFolderError, build_reference
from workers.models.reference import build_renderer
from workers.models.template import TEMPLATE


def mel_windows(audio: np.ndarray, frame_samples: int = 640) -> list[np.ndarray]:
    stream = MelStream()
    return [stream.push(audio[i:i + frame_samples]) for i in range(0, audio.size, frame_samples)]


def test_speech_opens_the_jaw_and_silence_closes_it(pipeline: Pipeline) -> None:
    speech = EspeakTTS().synthesize("Welcome to the show, today everything is half price.")
    silence = np.zeros(SAMPLE_RATE, np.float32)
    jaw_speech = [pipeline.audio_to_motion_sync(m).value[Coef.JAW_OPEN] for m in mel_windows(speech)]
    jaw_silence = [pipeline.audio_to_motion_sync(m).value[Coef.JAW_OPEN] for m in mel_windows(silence)]
    assert max(jaw_silence) < 0.05
    assert np.mean(jaw_speech) > 0.3
    assert np.percentile(jaw_speech, 90) > 0.7
    # Louder is more open: the same speech at a tenth of the amplitude opens less.
    quiet = [pipeline.audio_to_motion_sync(m).value[Coef.JAW_OPEN] for m in mel_windows(speech * 0.1)]
    assert np.mean(quiet) < np.mean(jaw_speech)


def test_silence_keeps_the_head_still(pipeline: Pipeline) -> None:
    m = pipeline.audio_to_motion_sync(log_mel(np.zeros(4000, np.float32))[:, :16]).value
    assert m.shape == (MOTION_DIM,)
    assert np.allclose(m[Coef.HEAD_YAW:], 0.0, atol=1e-6)


def region(frame: np.ndarray, center: tuple[float, float], half: tuple[float, float]) -> np.ndarray:
    s = frame.shape[-1]
    cx, cy = center
    return frame[:, int((cy - half[1]) * s):int((cy + half[1]) * s),
                 int((cx - half[0]) * s):int((cx + half[0]) * s)]


@pytest.mark.parametrize("side", [256, 384])
def test_renderer_moves_the_mouth_with_the_jaw_and_keeps_the_rest(pipeline: Pipeline, side: int) -> None:
    avatar = pipeline.avatar_tensor_sync("presenter", side)
    rest = pipeline.render_sync(avatar, np.zeros(MOTION_DIM, np.float32)).value
    open_ = np.zeros(MOTION_DIM, np.float32)
    open_[Coef.JAW_OPEN] = 1.0
    opened = pipeline.render_sync(avatar, open_).value
    assert rest.shape == opened.shape == (3, side, side)
    assert rest.min() >= 0.0 and rest.max() <= 1.0
    # At rest the renderer reproduces the avatar (refinement is a small residual).
    assert np.abs(rest - avatar).mean() < 0.01
    mouth = (TEMPLATE.mouth_center[0], TEMPLATE.mouth_center[1] + 0.02)
    d_mouth = np.abs(region(opened, mouth, (0.06, 0.04)) - region(rest, mouth, (0.06, 0.04))).mean()
    d_top = np.abs(region(opened, (0.5, 0.15), (0.3, 0.1)) - region(rest, (0.5, 0.15), (0.3, 0.1))).mean()
    assert d_mouth > 0.05
    assert d_top < 0.005
    # An open mouth is a darker mouth (the cavity).
    assert region(opened, mouth, (0.04, 0.02)).mean() < region(rest, mouth, (0.04, 0.02)).mean() - 0.05


def test_blink_closes_the_eyes(pipeline: Pipeline) -> None:
    avatar = pipeline.avatar_tensor_sync("presenter", 256)
    blink = np.zeros(MOTION_DIM, np.float32)
    blink[Coef.BLINK] = 1.0
    rest = pipeline.render_sync(avatar, np.zeros(MOTION_DIM, np.float32)).value
    closed = pipeline.render_sync(avatar, blink).value
    eye = region(rest, TEMPLATE.eye_left, (0.03, 0.015))
    shut = region(closed, TEMPLATE.eye_left, (0.03, 0.015))
    # The lid (plain skin) covers white, iris and pupil: the eye loses its contrast.
    assert np.abs(shut - eye).mean() > 0.1
    assert shut.std() < 0.8 * eye.std()


def test_models_are_reproducible(tmp_path: Path) -> None:
    a = build_renderer().SerializeToString()
    b = build_renderer().SerializeToString()
    assert a == b


def test_a_user_model_with_the_same_interface_loads_the_same_way(tmp_path: Path, model_dir: Path) -> None:
    root = tmp_path / "mine"
    build_reference(root, "lite", wav2lip="tiny")
    # Replace the renderer by another one of the same interface (a different size).
    from workers.models.reference import RendererSize

    onnx.save(build_renderer(RendererSize(4, 2), seed=1), str(root / "renderer.onnx"))
    m = OrtModel("renderer", root / "renderer.onnx", RENDERER, ProviderChoice.AUTO)
    assert m.provider == "CPUExecutionProvider"  # no GPU here, whatever the providers list says
    (out,), _ = m.run({"avatar": np.zeros((2, 3, 128, 128), np.float32),
                       "motion": np.zeros((2, MOTION_DIM), np.float32)})
    assert out.shape == (2, 3, 128, 128)


def test_models_with_the_wrong_interface_are_refused(tmp_path: Path) -> None:
    from workers.models.reference import build_audio_to_motion

    path = tmp_path / "a2m.onnx"
    onnx.save(build_audio_to_motion(channels=8, layers=1), str(path))
    with pytest.raises(ModelInterfaceError, match="no input named 'avatar'"):
        OrtModel("renderer", path, RENDERER, ProviderChoice.CPU)


def test_model_folder_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="build-models"):
        ModelFolder.open(tmp_path)
    root = tmp_path / "m"
    build_reference(root, wav2lip=None)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["motion"] = ["jaw_open"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="motion layout"):
        ModelFolder.open(root)


def test_an_avatar_replaced_under_its_id_is_read_again(pipeline: Pipeline) -> None:
    from workers.models.avatar import draw_default_avatar, write_png

    path = pipeline.folder.root / "avatars" / "replaced-avatar.png"
    try:
        write_png(path, draw_default_avatar(256))
        first = pipeline.avatar_tensor_sync("replaced-avatar", 128).copy()
        assert np.array_equal(pipeline.avatar_tensor_sync("replaced-avatar", 128), first)
        write_png(path, 255 - draw_default_avatar(256))  # re-registered: a new image
        second = pipeline.avatar_tensor_sync("replaced-avatar", 128)
        assert not np.allclose(second, first)
    finally:
        path.unlink(missing_ok=True)
