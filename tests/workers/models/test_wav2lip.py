"""The Wav2Lip stand-in has the public signature and behaves like a lip-sync model;
binding finds its inputs by shape under every known export's names, order and batch
axis; a fixed batch axis is rewritten to a dynamic one only where the graph allows."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from workers.device.binding import (
    BatchRewriteError,
    ChannelOrder,
    ColourOrder,
    FaceLayout,
    InputScale,
    LipSyncRunner,
    ModelBindingError,
    bind_lipsync,
    make_batch_dynamic,
    make_feeds,
    read_output,
)
from workers.device.onnx import ModelInterfaceError
from workers.media.alignment import MouthCrop, SyncEstimate, estimate
from workers.models.reference import SYNC_WINDOW, build_lipsync
from workers.models.wav2lip import (
    COMMUNITY,
    FACEFUSION,
    MEL_SILENCE,
    WAV2LIP_FACE,
    WAV2LIP_PRESETS,
    IoNames,
    build_wav2lip,
    conv_gmac_per_frame,
)

TINY = WAV2LIP_PRESETS["tiny"]
S = 96
FPS = 25


def session(model: onnx.ModelProto) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def make_model(side: int = S, **kw: Any) -> onnx.ModelProto:
    return build_wav2lip(side, TINY, **kw)


def face_crops(n: int, side: int = S, seed: int = 0) -> np.ndarray:
    """[n, S, S, 3] uint8 BGR: skin with shading, eyes, red lips at the Wav2Lip crop's
    mouth; each crop slightly different so batch items are distinguishable."""
    rng = np.random.default_rng(seed)
    v, u = (np.mgrid[0:side, 0:side] + 0.5) / side
    out = []
    for _ in range(n):
        img = np.empty((side, side, 3), np.float32)
        img[:] = np.array([0.55, 0.65, 0.85]) + rng.uniform(-0.05, 0.05, 3)  # BGR skin
        img *= (1 - 0.2 * v)[..., None]
        for ex in (0.35, 0.65):
            eye = np.exp(-((u - ex) / 0.05) ** 2 - ((v - 0.35) / 0.02) ** 2)[..., None]
            img = img * (1 - eye) + eye * 0.15
        lips = np.exp(-((u - 0.5) / 0.12) ** 2 - ((v - 0.72) / 0.025) ** 2)[..., None]
        img = img * (1 - lips) + lips * np.array([0.3, 0.3, 0.7])
        img += rng.normal(0, 0.01, img.shape)
        out.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.stack(out)


def mel_at(levels: list[float]) -> np.ndarray:
    """[B, 1, 80, 16] windows, each flat at one normalised level (-4: silence)."""
    return np.stack([np.full((1, 80, 16), lv, np.float32) for lv in levels])


# -- the graph


@pytest.mark.parametrize("names", [FACEFUSION, COMMUNITY], ids=["facefusion", "community"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "batch1"])
@pytest.mark.parametrize("faces_first", [False, True], ids=["mel-first", "faces-first"])
def test_built_graph_has_the_signature_checks_and_runs(names: IoNames, dynamic: bool,
                                                       faces_first: bool) -> None:
    model = make_model(names=names, dynamic_batch=dynamic, faces_first=faces_first)
    onnx.checker.check_model(model, full_check=True)
    sess = session(model)
    ins = {i.name: i for i in sess.get_inputs()}
    batch: str | int = "B" if dynamic else 1
    assert [i.name for i in sess.get_inputs()] == (
        [names.faces, names.mel] if faces_first else [names.mel, names.faces])
    assert ins[names.mel].shape == [batch, 1, 80, 16] and ins[names.mel].type == "tensor(float)"
    assert ins[names.faces].shape == [batch, 6, S, S] and ins[names.faces].type == "tensor(float)"
    (out_arg,) = sess.get_outputs()
    assert out_arg.name == names.output and out_arg.shape == [batch, 3, S, S]
    n = 2 if dynamic else 1
    feeds = {names.mel: mel_at([0.0] * n), names.faces: np.random.default_rng(1).uniform(
        0, 1, (n, 6, S, S)).astype(np.float32)}
    (out,) = sess.run(None, feeds)
    assert out.shape == (n, 3, S, S) and out.dtype == np.float32


def test_the_256_option_and_a_bad_side() -> None:
    sess = session(make_model(256))
    assert bind_lipsync(sess).side == 256
    with pytest.raises(ValueError, match="multiple of"):
        build_wav2lip(100, TINY)


def test_builds_are_deterministic() -> None:
    assert make_model().SerializeToString() == make_model().SerializeToString()


# -- behaviour


@pytest.fixture(scope="module")
def runner() -> LipSyncRunner:
    return LipSyncRunner(session(make_model()))


def test_loud_mel_darkens_the_mouth_and_leaves_the_rest(runner: LipSyncRunner) -> None:
    faces = np.repeat(face_crops(1), 4, axis=0)
    out = runner.run(mel_at([MEL_SILENCE, -2.5, -1.0, 2.0]), faces)
    assert out.shape == (4, 3, S, S) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    face = faces.transpose(0, 3, 1, 2) / 255.0
    # Silence: a closed mouth, the unmasked face within one 8-bit step.
    assert np.abs(out[0] - face[0]).max() < 1.5 / 255
    mouth = out[:, :, int(0.66 * S):int(0.80 * S), int(0.38 * S):int(0.62 * S)].mean(axis=(1, 2, 3))
    assert mouth[1] < mouth[0] - 0.02  # louder is darker, monotonically
    assert mouth[2] < mouth[1] - 0.05
    assert mouth[3] <= mouth[2] + 1e-6
    # Outside the mouth (upper half, cheeks at the sides) nothing moves.
    for region in (np.s_[:, :, :S // 2], np.s_[:, :, :, :int(0.25 * S)], np.s_[:, :, :, int(0.75 * S):]):
        assert np.abs(out[region] - face[region]).max() < 1.5 / 255


def test_the_mouth_uses_the_unmasked_face_not_the_masked_half(runner: LipSyncRunner) -> None:
    b = runner.binding
    faces = face_crops(1)
    feeds = make_feeds(b, mel_at([MEL_SILENCE]), faces)
    (ref,) = runner.session.run(None, feeds)
    feeds[b.faces][:, :3] = 0.0  # whatever the masked copy holds, the face comes back
    (blank,) = runner.session.run(None, feeds)
    assert np.abs(blank - faces.transpose(0, 3, 1, 2) / 255).max() < 1.5 / 255
    assert np.abs(blank - ref).max() < 1.5 / 255


def test_a_mouth_darkness_lipsync_check_finds_the_model_in_sync(runner: LipSyncRunner) -> None:
    """Frame i takes the mel window from int(80 i / fps) (MODELS.md); the project's
    lip-sync check (energy vs mouth darkness) must find no offset, and find a delay."""
    rng = np.random.default_rng(3)
    n, delay = SYNC_WINDOW + 8, 3
    # Speech-like: bursts of syllables at random loudness with pauses of silence.
    level = np.where(rng.random(n) < 0.35, MEL_SILENCE, rng.uniform(-2.5, 1.0, n))
    starts = np.array([int(80 * i / FPS) for i in range(n)])
    cols = starts[-1] + 16
    frame_of_col = np.searchsorted(starts, np.arange(cols), side="right") - 1  # frame i: from starts[i]
    mel = np.clip(level[frame_of_col][None, :] + rng.normal(0, 0.2, (80, cols)), -4, 4).astype(np.float32)
    windows = np.stack([mel[None, :, s:s + 16] for s in starts])
    frames = runner.run(windows, np.repeat(face_crops(1), n, axis=0))
    audio = np.stack([mel[:, frame_of_col == i].mean(axis=1) for i in range(n)])  # per-frame mean log-mel
    crop = MouthCrop(16, 24, WAV2LIP_FACE)
    mouths = np.stack([crop(f[::-1]) for f in frames])  # RGB, as the check weighs luma
    sync = session(build_lipsync())

    def check(first_audio: int, first_video: int) -> SyncEstimate:
        t = slice(first_audio, first_audio + SYNC_WINDOW)
        v = slice(first_video, first_video + SYNC_WINDOW)
        (scores,) = sync.run(None, {"audio": audio[None, t], "mouth": mouths[None, v].astype(np.float32)})
        est = estimate(scores[0])
        assert est is not None, scores
        return est

    in_sync = check(delay, delay)
    assert in_sync.offset_frames == 0 and in_sync.peak > 0.8
    assert check(delay, 0).offset_frames == delay  # video shown `delay` frames late: the check sees it


# -- binding


@pytest.mark.parametrize("names", [FACEFUSION, COMMUNITY, IoNames("x", "y", "z")],
                         ids=["facefusion", "community", "arbitrary"])
@pytest.mark.parametrize("faces_first", [False, True], ids=["mel-first", "faces-first"])
def test_binding_finds_roles_by_shape(names: IoNames, faces_first: bool) -> None:
    b = bind_lipsync(session(make_model(names=names, faces_first=faces_first)))
    assert (b.mel, b.faces, b.output, b.side, b.batch) == (names.mel, names.faces, names.output, S, None)
    assert not b.fixed_at_one


@pytest.mark.parametrize("names", [FACEFUSION, COMMUNITY], ids=["facefusion", "community"])
@pytest.mark.parametrize("faces_first", [False, True], ids=["mel-first", "faces-first"])
def test_fixed_batch_runs_item_by_item_like_the_dynamic_model(
        names: IoNames, faces_first: bool, caplog: pytest.LogCaptureFixture) -> None:
    dynamic = LipSyncRunner(session(make_model(names=names, faces_first=faces_first)))
    fixed = LipSyncRunner(session(make_model(names=names, faces_first=faces_first, dynamic_batch=False)),
                          name="fixed")
    assert fixed.binding.fixed_at_one and fixed.binding.batch == 1
    mel, faces = mel_at([MEL_SILENCE, -2.0, -1.0, 1.0, 0.0]), face_crops(5)
    with caplog.at_level(logging.INFO, logger="workers.device.binding"):
        a = fixed.run(mel, faces)
        b = fixed.run(mel[:2], faces[:2])
    said = [r for r in caplog.records if "fixes its batch axis at 1" in r.getMessage()]
    assert len(said) == 1  # once per runner, not per call
    np.testing.assert_allclose(a, dynamic.run(mel, faces), atol=1e-5)
    np.testing.assert_allclose(b, a[:2], atol=1e-6)


def test_a_batch_fixed_above_one_runs_in_padded_calls_of_that_size() -> None:
    model = make_model()
    for vi in [*model.graph.input, *model.graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_value = 2
    fixed = LipSyncRunner(session(model))
    assert fixed.binding.batch == 2 and not fixed.binding.fixed_at_one
    mel, faces = mel_at([MEL_SILENCE, -2.0, -1.0, 1.0, 0.0]), face_crops(5)
    np.testing.assert_allclose(fixed.run(mel, faces), LipSyncRunner(session(make_model())).run(mel, faces),
                               atol=1e-5)


def _graph_model(inputs: list[tuple[str, list[int | str]]], out_shape: list[int | str]) -> onnx.ModelProto:
    """A small model with the given float inputs: the output is the last input's first
    ``out_shape[1]`` channels plus the mean of the others, so every input is used."""
    nodes = [helper.make_node("ReduceMean", [name], [f"{name}.m"], keepdims=0) for name, _ in inputs[:-1]]
    last = inputs[-1][0]
    inits = [numpy_helper.from_array(np.array(v, np.int64), n)
             for n, v in (("s0", [0]), ("s3", [out_shape[1]]), ("ax", [1]))]
    nodes.append(helper.make_node("Slice", [last, "s0", "s3", "ax"], ["sliced"]))
    x = "sliced"
    for name, _ in inputs[:-1]:
        nodes.append(helper.make_node("Add", [x, f"{name}.m"], [f"{x}+{name}"]))
        x = f"{x}+{name}"
    nodes.append(helper.make_node("Identity", [x], ["out"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(("inputs", "out_shape", "says"), [
    ([("source", ["B", 1, 80, 12]), ("target", ["B", 6, 96, 96])], ["B", 3, 96, 96],
     ["input source is [B, 1, 80, 12] where mel float32 [B, 1, 80, 16]", "target tensor(float) [B, 6, 96, 96]"]),
    ([("mel", ["B", 1, 80, 16]), ("faces", ["B", 3, 96, 96])], ["B", 3, 96, 96],
     ["0 inputs are face stacks [B, 6, S, S]", "faces tensor(float) [B, 3, 96, 96]"]),
    ([("mel", ["B", 1, 80, 16]), ("faces", ["B", 6, 96, 64])], ["B", 3, 96, 64],
     ["not square (96 x 64)"]),
    ([("mel", ["B", 1, 80, 16]), ("faces", ["B", 6, 96, 96])], ["B", 4, 96, 96],
     ["0 outputs shaped [B, 3, 96, 96]", "out tensor(float) [B, 4, 96, 96]"]),
    ([("mel", [1, 1, 80, 16]), ("faces", [2, 6, 96, 96])], [2, 3, 96, 96],
     ["batch axes disagree ([1, 2])"]),
    ([("a", ["B", 1, 80, 16]), ("mel", ["B", 1, 80, 16]), ("faces", ["B", 6, 96, 96])], ["B", 3, 96, 96],
     ["3 inputs"]),
], ids=["mel-80x12", "faces-3-channels", "not-square", "output-size", "batch-disagrees", "three-inputs"])
def test_a_model_that_does_not_fit_is_refused_naming_the_mismatch(
        inputs: list[tuple[str, list[int | str]]], out_shape: list[int | str], says: list[str]) -> None:
    sess = session(_graph_model(inputs, out_shape))
    with pytest.raises(ModelBindingError) as err:
        bind_lipsync(sess, name="bad")
    assert isinstance(err.value, ModelInterfaceError)
    msg = str(err.value)
    assert msg.startswith("model bad: ")
    assert "expected inputs mel float32 [B, 1, 80, 16] (80 bands x 16 steps of 12.5 ms) and faces " \
        "float32 [B, 6, S, S]" in msg
    for s in says:
        assert s in msg


def test_face_layout_override_changes_the_feeds_and_how_output_is_read() -> None:
    b = bind_lipsync(session(make_model()))
    faces = face_crops(2)
    mel = mel_at([0.0, 0.0])
    std = make_feeds(b, mel, faces)[b.faces]
    bgr = faces.transpose(0, 3, 1, 2) / 255.0
    np.testing.assert_allclose(std[:, 3:], bgr, atol=1e-6)
    np.testing.assert_allclose(std[:, :3, :S // 2], bgr[:, :, :S // 2], atol=1e-6)
    assert not std[:, :3, S // 2:].any()
    layout = FaceLayout.from_manifest({"channels": "unmasked_first", "colour": "rgb", "scale": "-1..1"})
    assert layout == FaceLayout(ChannelOrder.UNMASKED_FIRST, ColourOrder.RGB, InputScale.SIGNED)
    other = make_feeds(bind_lipsync(session(make_model()), layout), mel, faces)[b.faces]
    rgb_signed = faces[..., ::-1].transpose(0, 3, 1, 2) / 127.5 - 1.0
    np.testing.assert_allclose(other[:, :3], rgb_signed, atol=1e-5)
    np.testing.assert_allclose(other[:, 3:, :S // 2], rgb_signed[:, :, :S // 2], atol=1e-5)
    assert np.all(other[:, 3:, S // 2:] == -1.0)  # zeroed pixels are black: -1 on this scale
    # The output is read back in the same terms: RGB -1..1 -> BGR 0..1.
    signed_rgb = np.stack([np.full((S, S), v, np.float32) for v in (-1.0, 0.0, 1.0)])[None]
    back = read_output(bind_lipsync(session(make_model()), layout), signed_rgb)
    assert back[0, :, 0, 0].tolist() == [1.0, 0.5, 0.0]
    assert FaceLayout.from_manifest({}) == FaceLayout()
    with pytest.raises(ModelBindingError, match="channels is one of"):
        FaceLayout.from_manifest({"colour": "cmyk"})


def test_feeds_refuse_mismatched_arrays(runner: LipSyncRunner) -> None:
    b = runner.binding
    with pytest.raises(ValueError, match=r"uint8 \[B, 96, 96, 3\]"):
        make_feeds(b, mel_at([0.0]), face_crops(1, side=128))
    with pytest.raises(ValueError, match=r"\[B, 1, 80, 16\]"):
        make_feeds(b, np.zeros((1, 1, 80, 12), np.float32), face_crops(1))
    with pytest.raises(ValueError, match="2 mel windows for 1 face crops"):
        make_feeds(b, mel_at([0.0, 0.0]), face_crops(1))


# -- fixed batch axis -> dynamic


@pytest.mark.parametrize("names", [FACEFUSION, COMMUNITY], ids=["facefusion", "community"])
def test_make_batch_dynamic_runs_a_fixed_export_at_batch_3(names: IoNames) -> None:
    fixed = make_model(names=names, dynamic_batch=False)
    rewritten = make_batch_dynamic(fixed)
    for vi in [*rewritten.graph.input, *rewritten.graph.output]:
        assert vi.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # the original is untouched
    runner = LipSyncRunner(session(rewritten))
    assert runner.binding.batch is None
    one = LipSyncRunner(session(fixed))
    mel, faces = mel_at([MEL_SILENCE, -1.5, 0.5]), face_crops(3)
    np.testing.assert_allclose(runner.run(mel, faces), one.run(mel, faces), atol=1e-5)
    # Dynamic already: returned as is.
    dyn = make_model(names=names)
    assert make_batch_dynamic(dyn).SerializeToString() == dyn.SerializeToString()


def test_one_command_rewrites_a_fixed_export_or_says_why_not(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from farm.cli import main

    onnx.save(make_model(dynamic_batch=False), str(tmp_path / "fixed.onnx"))
    assert main(["make-batch-dynamic", "--model", str(tmp_path / "fixed.onnx"),
                 "--out", str(tmp_path / "dynamic.onnx")]) == 0
    assert LipSyncRunner(session(onnx.load(str(tmp_path / "dynamic.onnx")))).binding.batch is None
    onnx.save(_reshaping_model(shape_from_graph=False), str(tmp_path / "hard.onnx"))
    assert main(["make-batch-dynamic", "--model", str(tmp_path / "hard.onnx"),
                 "--out", str(tmp_path / "no.onnx")]) == 2
    assert "'flatten' (Reshape)" in capsys.readouterr().err and not (tmp_path / "no.onnx").exists()


def _reshaping_model(shape_from_graph: bool) -> onnx.ModelProto:
    """x [1, 6, 4, 4] -> flattened through a Reshape whose leading 1 is the batch:
    a constant (found by reading the graph) or built from Shape (found by running it)."""
    nodes, inits = [], []
    if shape_from_graph:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "from"))
        inits.append(numpy_helper.from_array(np.array([4], np.int64), "to"))
        nodes += [helper.make_node("Shape", ["x"], ["xs"]),
                  helper.make_node("Slice", ["xs", "from", "to"], ["rest"]),
                  helper.make_node("ReduceProd", ["rest"], ["n"], keepdims=1),
                  helper.make_node("Concat", ["one", "n"], ["flat"], axis=0)]
    else:
        inits.append(numpy_helper.from_array(np.array([1, 96], np.int64), "flat"))
    nodes.append(helper.make_node("Reshape", ["x", "flat"], ["y"], name="flatten"))
    graph = helper.make_graph(nodes, "hard_coded_batch",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 96])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    session(model).run(None, {"x": np.zeros((1, 6, 4, 4), np.float32)})  # a valid batch-1 model
    return model


def _batch_mixing_model() -> onnx.ModelProto:
    """x - mean over the batch axis: zero at batch 1, shapes fine at any batch, but
    items depend on each other (found only by comparing with items run one by one)."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
             helper.make_node("Sub", ["x", "m"], ["y"])]
    graph = helper.make_graph(nodes, "mixes_batch",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_make_batch_dynamic_refuses_a_graph_that_hard_codes_the_batch() -> None:
    with pytest.raises(BatchRewriteError, match=r"node 'flatten' \(Reshape\).*constant shape \[1, 96\]"):
        make_batch_dynamic(_reshaping_model(shape_from_graph=False))
    with pytest.raises(BatchRewriteError, match="output 'y' still infers a fixed batch of 1") as err:
        make_batch_dynamic(_reshaping_model(shape_from_graph=True))
    assert isinstance(err.value, ModelInterfaceError)
    with pytest.raises(BatchRewriteError, match=r"differs from the items run one by one.*mixes batch items"):
        make_batch_dynamic(_batch_mixing_model())


def test_make_batch_dynamic_refuses_a_leading_axis_fixed_above_one() -> None:
    model = _graph_model([("mel", [2, 1, 80, 16]), ("faces", [2, 6, 8, 8])], [2, 3, 8, 8])
    with pytest.raises(BatchRewriteError, match="fixed leading axis of 2"):
        make_batch_dynamic(model)


# -- cost


def test_cost_presets_are_near_wav2lip() -> None:
    g96 = conv_gmac_per_frame(build_wav2lip(96))  # the 96 preset is the default at 96
    g256 = conv_gmac_per_frame(build_wav2lip(256))
    assert abs(g96 - 4.0) / 4.0 < 0.2, g96
    assert abs(g256 - 28.0) / 28.0 < 0.2, g256
    assert conv_gmac_per_frame(make_model()) < 0.2  # tests stay cheap
    # Fixed or dynamic batch: the same per-frame figure.
    assert conv_gmac_per_frame(make_model(dynamic_batch=False)) == conv_gmac_per_frame(make_model())
