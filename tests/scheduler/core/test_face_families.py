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
