"""A video avatar's rooms go to workers that render its family: the scheduler reads what
the avatar needs from its bundle (an Ultralight model reading wenet features needs a
worker fed by wenet) and each worker says what it renders when it registers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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
