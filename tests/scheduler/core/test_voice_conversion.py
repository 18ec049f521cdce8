"""Converting a live speaker's voice into a person's: refused where the platform bans it
(the default), and unless the licence of the avatar's voice (or, with no voice registered,
the avatar's) grants live_voice_conversion, each refusal audited with its clause; a room
the rules allow is refused as a precondition, no voice-conversion model being served."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from avatarfarm.domain import DriveMode, InvalidRequest, SessionSpec, validate_spec
from scheduler.errors import FailedPrecondition, PermissionDenied
from scheduler.policy.licences import Licence
from scheduler.policy.platforms import PlatformPolicy
from scheduler.state.avatars import RegisteredAvatar, RegisteredVoice, VoiceSettings
from tests.builders import make_core, make_spec, png_image


def converting(room: str = "r1", platform: str = "own-site", avatar: str = "anna") -> SessionSpec:
    return dataclasses.replace(make_spec(room, drive=DriveMode.VOICE), avatar_id=avatar,
                               platform=platform, voice_conversion=True)


def test_voice_conversion_is_refused_by_the_platform_then_by_the_licence_that_owns_the_voice(
        tmp_path: Path) -> None:
    core, _ = make_core(tmp_path, platforms={"own-site": PlatformPolicy(ban_voice_conversion=False)})
    for local in ("anna", "presenter"):
        (core.config.avatar_dir / f"{local}.png").write_bytes(png_image(64))
    core.avatar_images_changed()
    core.register_avatar(RegisteredAvatar("anna", "vendor", Licence(), 0.0), operator=True)
    # Banned by default (most livestream platforms ban it), whatever the licence says.
    with pytest.raises(PermissionDenied, match="platform 'douyin' bans converting"):
        core.create(converting(platform="douyin"))
    # Allowed by the platform; the avatar's licence does not grant it.
    with pytest.raises(PermissionDenied, match="licence clause live_voice_conversion"):
        core.create(converting())
    # Granted: the rules allow it, and no worker converts voices.
    core.register_avatar(RegisteredAvatar("anna", "vendor", Licence(live_voice_conversion=True), 0.0),
                         operator=True)
    with pytest.raises(FailedPrecondition, match="no worker on this farm serves a voice-conversion"):
        core.create(converting())
    # With a registered voice, the voice's licence decides: the avatar's grant is not enough.
    core.register_voice(RegisteredVoice("anna-voice", "vendor", Licence(), 0.0))
    core.register_avatar(RegisteredAvatar("anna", "vendor", Licence(live_voice_conversion=True), 0.0,
                                          VoiceSettings("anna-voice")), operator=True)
    with pytest.raises(PermissionDenied, match="voice 'anna-voice' may not have a live speaker's voice"):
        core.create(converting())
    # An unregistered local avatar has no licence to grant it.
    with pytest.raises(PermissionDenied, match="only a licence can grant"):
        core.create(converting("r2", avatar="presenter"))
    core.store.commit()
    refused = [(e.avatar_id, e.clause) for a in ("anna", "anna-voice", "presenter")
               for e in core.avatars.entries(a, 0, 100) if e.action.value == "refused"]
    assert refused == [("anna", "live_voice_conversion"), ("anna-voice", "live_voice_conversion"),
                       ("presenter", "live_voice_conversion")]
    # Text and motion-capture rooms have no live speaker to convert.
    with pytest.raises(InvalidRequest, match="only voice- and camera-driven rooms"):
        validate_spec(dataclasses.replace(converting(), drive_mode=DriveMode.TEXT))
