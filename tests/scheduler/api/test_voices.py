"""Voices as registered likenesses, on a real scheduler and port: a Piper export or a
TTS service's voice registered with its licence (its files checked and written beside
the avatars, nothing left of a refused one), an avatar speaking with it, rooms refused
by the voice's own licence and audited under the voice's id, revocation, usage per
voice, and tenants kept to their own voices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import onnx
from onnx import TensorProto, helper

from avatarfarm.v1 import avatars_pb2, sessions_pb2, types_pb2
from tests.scheduler.api.test_avatars import audit, farm, licence, registration, room
from tests.scheduler.api.test_service import ProtocolWorker, expect_status, run
from workers.models.piper import write_voice

RUNNING = types_pb2.SESSION_STATE_RUNNING


async def refused(call: Any, code: grpc.StatusCode, says: str) -> None:
    assert says in await expect_status(code, call)


def piper_files(tmp_path: Path) -> avatars_pb2.PiperVoiceFiles:
    model = write_voice(tmp_path / "built", "anna-voice", "tiny")
    return avatars_pb2.PiperVoiceFiles(model=model.read_bytes(),
                                       config=model.with_name(model.name + ".json").read_bytes())


def voice_registration(voice_id: str = "anna-voice", tenant: str = "brand",
                       files: avatars_pb2.PiperVoiceFiles | None = None, service: str = "",
                       **lic: object) -> avatars_pb2.RegisterVoiceRequest:
    r = avatars_pb2.RegisterVoiceRequest(voice_id=voice_id, tenant=tenant, licence=licence(**lic))
    if files is not None:
        r.piper.CopyFrom(files)
    else:
        r.service_config = service or json.dumps({"url": "http://tts.internal:9880/tts"})
    return r


def speaking(avatar_id: str = "anna", voice: str = "anna-voice", **kw: object) -> avatars_pb2.RegisterAvatarRequest:
    r = registration(avatar_id, **kw)  # type: ignore[arg-type]
    r.voice.voice = voice
    return r


def test_a_registered_voice_is_written_beside_the_avatars_and_licensed_apart(
        tmp_path: Path, model_dir: Path) -> None:
    files = piper_files(tmp_path)

    async def body() -> None:
        async with farm(tmp_path, model_dir) as f:
            v = await f.avatars.RegisterVoice(voice_registration(
                files=files, allowed_platforms=["douyin"]))
            assert (v.voice_id, v.tenant, v.kind) == ("anna-voice", "brand", "piper")
            voices = f.avatar_dir / "voices"
            assert sorted(p.name for p in voices.iterdir()) == ["anna-voice.onnx", "anna-voice.onnx.json"]
            assert (voices / "anna-voice.onnx").read_bytes() == files.model
            # A service voice: its config is checked and written as a worker reads it.
            s = await f.avatars.RegisterVoice(voice_registration("shop-voice"))
            assert s.kind == "service" and (voices / "shop-voice.service.json").is_file()
            listed = await f.avatars.ListVoices(avatars_pb2.ListVoicesRequest(tenant="brand"))
            assert [x.voice_id for x in listed.voices] == ["anna-voice", "shop-voice"]
            # The avatar speaks with it; its rooms must satisfy both licences.
            await f.avatars.RegisterAvatar(speaking(allowed_platforms=["douyin", "tiktok"]))
            worker = ProtocolWorker(f.channel, "w1")
            await refused(f.sessions.CreateSession(room("r-tiktok", platform="tiktok")),
                                grpc.StatusCode.PERMISSION_DENIED,
                                "voice 'anna-voice' may not be used on platform 'tiktok'")
            s1 = await f.sessions.CreateSession(room("r-douyin", platform="douyin"))
            assign = (await worker.next("assign")).assign
            assert assign.voice == "anna-voice"
            worker.report(s1.session_id, RUNNING)
            worker.usage(1, [(s1.session_id, 50, 0.5)])
            logged = [(e.action, e.clause) for e in await audit(f, "anna-voice")]
            assert logged == [("registered", ""), ("refused", "allowed_platforms"),
                              ("room_started", "allowed_platforms")]
            # Usage per voice beside usage per avatar.
            usage = await f.avatars.GetAvatarUsage(avatars_pb2.GetAvatarUsageRequest(
                avatar_id="anna-voice"))
            assert [(r.avatar_id, r.voice, r.platform, r.sessions) for r in usage.rows] == [
                ("anna", "anna-voice", "douyin", 1)]
            by_voice = await f.sessions.GetUsage(sessions_pb2.GetUsageRequest(
                group_by=[sessions_pb2.USAGE_DIMENSION_VOICE]))
            assert {r.voice for r in by_voice.rows} == {"anna-voice"}
            # Revoked: the running room ends at its script boundary, new ones are refused.
            await f.avatars.RevokeVoiceLicence(avatars_pb2.RevokeVoiceLicenceRequest(
                voice_id="anna-voice", reason="contract ended"))
            release = (await worker.next("release")).release
            assert release.at_script_boundary and "voice 'anna-voice'" in release.reason
            await refused(f.sessions.CreateSession(room("r-again")),
                                grpc.StatusCode.PERMISSION_DENIED, "voice 'anna-voice'")
            await worker.close()

    run(body)


def test_voices_that_are_not_voices_are_refused_and_nothing_is_stored(
        tmp_path: Path, model_dir: Path) -> None:
    files = piper_files(tmp_path)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    not_piper = helper.make_model(graph).SerializeToString()
    bad = [
        (avatars_pb2.PiperVoiceFiles(model=not_piper, config=files.config), "expected Piper's export"),
        (avatars_pb2.PiperVoiceFiles(model=b"\x00garbage", config=files.config), "not an ONNX model"),
        (avatars_pb2.PiperVoiceFiles(model=files.model, config=b"{}"), "voice config"),
        (avatars_pb2.PiperVoiceFiles(model=files.model), "both its model and its JSON config"),
    ]
    assert onnx.load_from_string(not_piper).graph.input[0].name == "x"

    async def body() -> None:
        async with farm(tmp_path, model_dir) as f:
            for piper, why in bad:
                await refused(f.avatars.RegisterVoice(voice_registration(files=piper)),
                                    grpc.StatusCode.INVALID_ARGUMENT, why)
            for service, why in ((json.dumps({"url": "ftp://x"}), "http"), ("not json", "JSON")):
                await refused(f.avatars.RegisterVoice(voice_registration(service=service)),
                                    grpc.StatusCode.INVALID_ARGUMENT, why)
            # Workers will POST to a service voice's url: never to the metadata service.
            for url in ("http://169.254.169.254/latest/meta-data", "http://metadata.google.internal/x",
                        "http://[fe80::1]:80/tts", "http://2852039166/tts"):
                await refused(f.avatars.RegisterVoice(voice_registration(service=json.dumps({"url": url}))),
                              grpc.StatusCode.PERMISSION_DENIED, "forbidden")
            voices = f.avatar_dir / "voices"
            assert not voices.exists() or list(voices.iterdir()) == []
            assert (await f.avatars.ListVoices(avatars_pb2.ListVoicesRequest())).voices == []
            # Voice and avatar ids share one namespace.
            await f.avatars.RegisterAvatar(registration("anna"))
            await refused(f.avatars.RegisterVoice(voice_registration("anna", files=files)),
                                grpc.StatusCode.ALREADY_EXISTS, "taken")
            await f.avatars.RegisterVoice(voice_registration("anna-voice", files=files))
            await refused(f.avatars.RegisterAvatar(registration("anna-voice")),
                                grpc.StatusCode.ALREADY_EXISTS, "taken")

    run(body)


def test_tenants_speak_only_with_their_own_voices(tmp_path: Path, model_dir: Path) -> None:
    from scheduler.api.auth import SubjectKind

    async def body() -> None:
        async with farm(tmp_path, model_dir, secured=True) as f:
            brand, rival = f.token(SubjectKind.TENANT, "brand"), f.token(SubjectKind.TENANT, "rival")
            await f.avatars.RegisterVoice(voice_registration(tenant=""), metadata=brand)
            await refused(f.avatars.GetVoice(avatars_pb2.GetVoiceRequest(voice_id="anna-voice"),
                                                   metadata=rival),
                                grpc.StatusCode.NOT_FOUND, "not registered")
            await refused(f.avatars.RegisterAvatar(speaking("bob", tenant=""), metadata=rival),
                                grpc.StatusCode.PERMISSION_DENIED, "another tenant's registered voice")
            await refused(f.avatars.RevokeVoiceLicence(avatars_pb2.RevokeVoiceLicenceRequest(
                voice_id="anna-voice"), metadata=rival), grpc.StatusCode.NOT_FOUND, "not registered")
            await refused(f.avatars.RegisterVoice(voice_registration(tenant=""), metadata=rival),
                                grpc.StatusCode.ALREADY_EXISTS, "taken")
            assert (await f.avatars.ListVoices(avatars_pb2.ListVoicesRequest(), metadata=rival)).voices == []
            mine = await f.avatars.ListVoices(avatars_pb2.ListVoicesRequest(), metadata=brand)
            assert [v.voice_id for v in mine.voices] == ["anna-voice"]

    run(body)
