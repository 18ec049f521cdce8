"""A video avatar's rooms go to workers that render its family: the scheduler reads what
the avatar needs from its bundle (an Ultralight model reading wenet features needs a
worker fed by wenet) and each worker says what it renders when it registers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from avatarfarm.avatars import write_bundle_pointer
from avatarfarm.domain import SessionState, Stage
from scheduler.policy.placement import StageCost, WorkerProfile
from scheduler.state.worker_conn import AssignCmd, WorkerResources
from tests.builders import connect, make_core, make_profile, make_spec, sent

BUNDLE = "b" * 64


def _ultralight_avatar(avatars: Path, avatar_id: str, features: str) -> None:
    root = avatars / "bundles" / BUNDLE
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"bundle_id": BUNDLE, "family": "ultralight",
                                                    "features": features}))
    (root / "model.onnx").write_bytes(b"\0" * 1000)
    write_bundle_pointer(avatars, avatar_id, BUNDLE)


def test_an_avatar_whose_model_reads_wenet_features_is_placed_on_the_wenet_worker(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path)
    _ultralight_avatar(tmp_path / "avatars", "anna", "wenet")
    face = StageCost.measured(Stage.FACE, 160, 160, [(1, 0.004)], model="wav2lip/wav2lip-96")
    profile = WorkerProfile((*make_profile().costs, face))
    workers = {}
    for wid, features in (("hubert-0", "hubert"), ("wenet-0", "wenet")):
        workers[wid] = connect(core, wid, profile=profile, avatars=frozenset({"presenter", "anna"}),
                               resources=WorkerResources(
                                   face_families=frozenset({"wav2lip", f"ultralight/{features}"})))
    for i in range(3):
        s = core.create(dataclasses.replace(make_spec(f"r{i}"), avatar_id="anna"))
        assert s.state is SessionState.PLACED and s.worker_id == "wenet-0"
    assert [type(c) for c in sent(workers["wenet-0"])] == [AssignCmd] * 3
    assert sent(workers["hubert-0"]) == []


def test_motion_capture_is_taken_for_avatars_whose_family_has_a_motion_input(tmp_path: Path) -> None:
    from avatarfarm.domain import DriveMode, InvalidRequest

    core, _ = make_core(tmp_path)
    avatars = tmp_path / "avatars"
    for avatar_id, family, bid in (("lp", "liveportrait", "c" * 64), ("w2l", "wav2lip", "d" * 64)):
        (avatars / "bundles" / bid).mkdir(parents=True)
        (avatars / "bundles" / bid / "manifest.json").write_text(
            json.dumps({"bundle_id": bid, "family": family}))
        write_bundle_pointer(avatars, avatar_id, bid)
    face = StageCost.measured(Stage.FACE, 512, 512, [(1, 0.004)], model="liveportrait/lp")
    connect(core, "w1", profile=WorkerProfile((*make_profile().costs, face)),
            avatars=frozenset({"presenter", "lp", "w2l"}))
    mocap = dataclasses.replace(make_spec("m1", drive=DriveMode.MOCAP), avatar_id="lp")
    assert core.create(mocap).state is SessionState.PLACED
    with pytest.raises(InvalidRequest, match="wav2lip family, a lip-sync model that takes speech and "
                                             "has no motion input"):
        core.create(dataclasses.replace(mocap, room_id="m2", avatar_id="w2l"))


def test_a_text_room_whose_avatars_voice_some_workers_speak_is_placed_on_one_of_them(tmp_path: Path) -> None:
    from scheduler.policy.licences import Licence
    from scheduler.state.avatars import RegisteredAvatar, VoiceSettings

    core, _ = make_core(tmp_path)
    core.register_avatar(RegisteredAvatar("presenter", "vendor", Licence(), 0.0,
                                          VoiceSettings("en_US-joe-medium")), operator=True)
    joe = StageCost.measured(Stage.TTS, 0, 0, [(1, 0.02)], model="en_US-joe-medium")
    espeak_only = connect(core, "espeak-0")
    s = core.create(make_spec("r0"))
    # No worker has named the voice yet: it is taken as espeak-ng's (the worker checks).
    assert s.state is SessionState.PLACED and s.worker_id == "espeak-0"
    neural = connect(core, "neural-0", profile=WorkerProfile((*make_profile().costs, joe)),
                     resources=WorkerResources(voices=frozenset({"en_US-joe-medium"})))
    for i in range(1, 3):
        s = core.create(make_spec(f"r{i}"))
        assert s.state is SessionState.PLACED and s.worker_id == "neural-0"
    assert len(sent(neural)) == 2 and len(sent(espeak_only)) == 1
    assert all(c.voice == "en_US-joe-medium" for c in sent(neural) if isinstance(c, AssignCmd))
    # Once a worker has named it, a room waits for one that speaks it rather than go to
    # a worker that would refuse it.
    core.worker_disconnected(neural, "gone")
    s = core.create(make_spec("r3"))
    assert s.state is SessionState.PENDING
    assert "no connected worker speaks voice 'en_US-joe-medium'" in s.reason
