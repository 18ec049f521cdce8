"""Hostile tenant input, refused at the edge: absurd numbers, ids and paths in a
SessionSpec (pure conversion and validation), output paths that try to leave the
worker's output folder (resolved on a real folder with real symbolic links), and
the same refusals through a real scheduler's gRPC API, with precise statuses and
no change of state."""

from __future__ import annotations

import math
import posixpath
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avatarfarm import client, convert
from avatarfarm.domain import (
    LIMITS,
    InvalidRequest,
    OutputKind,
    parse_rtmp_url,
    validate_output_path,
)
from avatarfarm.egress import EgressPolicy
from avatarfarm.v1 import sessions_pb2, types_pb2, workers_pb2
from tests.scheduler.api.test_service import ProtocolWorker, create_req, expect_status, run, scheduler
from workers.output.encode import OutputError, OutputTarget

U32 = 2**32 - 1


def spec_pb(**kw: Any) -> types_pb2.SessionSpec:
    kw.setdefault("file_path", "room.mp4")
    return client.spec(kw.pop("tenant", "vendor"), kw.pop("room_id", "room-1"), **kw)


def refused(pb: types_pb2.SessionSpec) -> str:
    with pytest.raises(InvalidRequest) as err:
        convert.spec_from_pb(pb)
    assert str(err.value)  # every refusal says why
    return str(err.value)


# -- the spec --------------------------------------------------------------------------

@pytest.mark.parametrize("width,height", [
    (0, 512), (512, 0), (0, 0), (U32, 512), (512, U32), (2**31, 2**31),  # -1 and INT_MIN, wrapped
    (126, 512), (513, 512), (512, 511), (3842, 512), (100_000, 100_000),
    (3840, 3840),  # within each side's limit, but twice 4K's pixels
])
def test_absurd_resolutions_are_refused(width: int, height: int) -> None:
    assert "resolution" in refused(spec_pb(width=width, height=height))


@pytest.mark.parametrize("fps", [0, 61, 240, U32, 2**31])
def test_absurd_frame_rates_are_refused(fps: int) -> None:
    assert "fps" in refused(spec_pb(fps=fps))


def test_the_largest_allowed_quality_passes() -> None:
    for w, h in ((3840, 2160), (2160, 3840), (128, 128)):
        convert.spec_from_pb(spec_pb(width=w, height=h, fps=60))


@pytest.mark.parametrize("seconds", [-1.0, -1e-9, math.nan, math.inf, -math.inf, 1e308,
                                     LIMITS.max_duration_seconds + 1])
def test_bad_durations_are_refused(seconds: float) -> None:
    assert "max_duration_seconds" in refused(spec_pb(seconds=seconds))


@pytest.mark.parametrize("pause", [-1.0, math.nan, math.inf, -math.inf, 61.0, 1e300])
def test_bad_pauses_are_refused(pause: float) -> None:
    seg = types_pb2.ScriptSegment(text="hi", pause_after_seconds=pause)
    assert "pause_after_seconds" in refused(spec_pb(script=[seg]))


@pytest.mark.parametrize("text", ["a\x00b", "bell\x07", "esc\x1b[31m", "del\x7f", "c1\x85", "\x9b2J"])
def test_scripts_with_control_characters_are_refused(text: str) -> None:
    assert "control" in refused(spec_pb(script=[types_pb2.ScriptSegment(text=text)]))


def test_scripts_in_any_language_with_newlines_and_emoji_pass() -> None:
    convert.spec_from_pb(spec_pb(script=[types_pb2.ScriptSegment(
        text="Grüß Gott!\n\tこんにちは — مرحبا 👋🏽", pause_after_seconds=0.5)]))


def test_scripts_longer_than_the_limit_are_refused() -> None:
    segs = [types_pb2.ScriptSegment(text="x" * 1000)] * (LIMITS.max_script_chars // 1000 + 1)
    refused(spec_pb(script=segs))
    many = [types_pb2.ScriptSegment(text="x")] * (LIMITS.max_segments + 1)
    refused(spec_pb(script=many))


@pytest.mark.parametrize("field", ["tenant", "room_id", "avatar"])
@pytest.mark.parametrize("value", [
    "", "x" * (LIMITS.max_id_length + 1), "a\x00b", "a\nb", "tab\there", "a b", "a/b", "..", ".",
    "a\\b", "ven\u200bdor", "v\u0435ndor",  # zero-width space; Cyrillic ie
    "\u202eevil", "名前", "a;drop", "a%2fb", "a\x7f",
])
def test_hostile_ids_are_refused(field: str, value: str) -> None:
    msg = refused(spec_pb(**{field: value}))
    assert ("avatar_id" if field == "avatar" else field) in msg


def test_ids_at_the_limit_pass() -> None:
    name = "A-z_0.9:" + "x" * (LIMITS.max_id_length - 8)
    convert.spec_from_pb(spec_pb(tenant=name, room_id=name, avatar=name))


@pytest.mark.parametrize("request_id", ["x" * 129, "a\x00b", "a b", "ключ", "."])
def test_hostile_request_ids_are_refused(request_id: str) -> None:
    with pytest.raises(InvalidRequest, match="request_id"):
        convert.create_from_pb(sessions_pb2.CreateSessionRequest(spec=spec_pb(), request_id=request_id))
    spec, rid = convert.create_from_pb(sessions_pb2.CreateSessionRequest(spec=spec_pb(), request_id=""))
    assert rid == "" and spec.room_id == "room-1"


@pytest.mark.parametrize("drive", [types_pb2.DRIVE_MODE_VOICE, types_pb2.DRIVE_MODE_MOCAP,
                                   types_pb2.DRIVE_MODE_CAMERA])
def test_a_script_on_a_live_driven_room_is_refused(drive: int) -> None:
    msg = refused(spec_pb(drive=drive, script=[types_pb2.ScriptSegment(text="hi")]))
    assert "text-driven" in msg


@pytest.mark.parametrize("drive", [types_pb2.DRIVE_MODE_UNSPECIFIED, 5, 99, -1, 2**31 - 1])
def test_unspecified_or_unknown_drive_modes_are_refused(drive: int) -> None:
    assert "drive_mode" in refused(spec_pb(drive=drive))


def test_an_unset_tier_is_standard_and_an_unknown_one_refused() -> None:
    assert convert.spec_from_pb(spec_pb(tier=types_pb2.TIER_UNSPECIFIED)).tier.value == "standard"
    for tier in (4, 99, -5):
        assert "tier" in refused(spec_pb(tier=tier))


def test_a_missing_output_or_quality_is_refused() -> None:
    pb = spec_pb()
    pb.ClearField("output")
    assert "output" in refused(pb)
    pb = spec_pb()
    pb.output.Clear()
    assert "output" in refused(pb)
    pb = spec_pb()
    pb.ClearField("quality")
    assert "quality" in refused(pb)
    pb = spec_pb(file_path="")
    pb.output.file_path = ""  # the oneof is set, to nothing
    assert "empty" in refused(pb)


@given(st.builds(
    types_pb2.SessionSpec,
    tenant=st.text(max_size=200), room_id=st.text(max_size=200), avatar_id=st.text(max_size=200),
    drive_mode=st.integers(-2**31, 2**31 - 1), tier=st.integers(-2**31, 2**31 - 1),
    quality=st.builds(types_pb2.Quality, width=st.integers(0, U32), height=st.integers(0, U32),
                      fps=st.integers(0, U32)),
    output=st.one_of(
        st.builds(types_pb2.Output),
        st.builds(types_pb2.Output, file_path=st.text(max_size=300)),
        st.builds(types_pb2.Output, hls_dir=st.text(max_size=300)),
        st.builds(types_pb2.Output, rtmp_url=st.text(max_size=300))),
    max_duration_seconds=st.floats(allow_nan=True, allow_infinity=True),
    script=st.lists(st.builds(types_pb2.ScriptSegment, text=st.text(max_size=50),
                              pause_after_seconds=st.floats()), max_size=5)))
@settings(max_examples=300, deadline=None)
def test_any_spec_is_converted_or_refused_with_invalid_request(pb: types_pb2.SessionSpec) -> None:
    try:
        spec = convert.spec_from_pb(pb)
    except InvalidRequest:
        return
    # What passes is sane: its numbers in range and its ids plain.
    assert LIMITS.min_side <= spec.quality.width <= LIMITS.max_width
    assert math.isfinite(spec.max_duration_seconds) and spec.max_duration_seconds >= 0
    assert all(ch.isascii() and ch.isprintable() for ch in spec.tenant + spec.room_id + spec.avatar_id)
    assert convert.spec_from_pb(convert.spec_to_pb(spec)) == spec


def test_the_helpers_for_other_fields_refuse_what_cannot_be_true() -> None:
    from google.protobuf.timestamp_pb2 import Timestamp

    assert convert.time_from_pb("start", Timestamp(seconds=10, nanos=500_000_000)) == 10.5
    for ts in (Timestamp(seconds=0, nanos=-1), Timestamp(seconds=0, nanos=10**9),
               Timestamp(seconds=2**62), Timestamp(seconds=-(2**62))):
        with pytest.raises(InvalidRequest, match="start"):
            convert.time_from_pb("start", ts)
    assert convert.session_id_from_pb("0" * 32) == "0" * 32
    for sid in ("", "x" * 129, "a\nb", "../x"):
        with pytest.raises(InvalidRequest, match="session_id"):
            convert.session_id_from_pb(sid)
    assert convert.tenant_from_pb("") == ""
    with pytest.raises(InvalidRequest, match="tenant"):
        convert.tenant_from_pb("", required=True)
    assert convert.reason_from_pb("done\x1b[2J\nnow" + "x" * 1000) == "done[2Jnow" + "x" * 500
    ok = types_pb2.SessionProgress(frames_rendered=50, stream_seconds=2.0, device_seconds=0.5,
                                   stage_seconds={"render": 0.4})
    assert convert.checked_progress_from_pb(ok).frames_rendered == 50
    for bad in (dict(stream_seconds=math.inf), dict(device_seconds=math.nan), dict(stream_seconds=-1.0),
                dict(stage_seconds={"render": math.inf}), dict(frames_rendered=2**63),
                dict(av_offset_seconds=math.nan), dict(av_correction_seconds=1e9)):
        with pytest.raises(InvalidRequest, match="progress"):
            convert.checked_progress_from_pb(types_pb2.SessionProgress(**bad))  # type: ignore[arg-type]


# -- output paths ----------------------------------------------------------------------

HOSTILE_PATHS = [
    "..", "../x.mp4", "a/../../x.mp4", "a/..", "./../x.mp4", "a/./b.mp4", "a//b.mp4",
    "/etc/x.mp4", "//x.mp4", "~/x.mp4", "~root/x.mp4", "~",
    "..\\x.mp4", "a\\..\\..\\x.mp4", "C:\\x.mp4", "C:x.mp4",
    "x\x00.mp4", "x.mp4\x00.txt", "a\nb.mp4", "a\rb.mp4", "a\tb.mp4",
    "%2e%2e/x.mp4", "%2E%2E%2Fx.mp4", "..%2fx.mp4", "show%05d", "%s.mp4",
    "\u2025/x.mp4", "\uff0e\uff0e/x.mp4", "a\u202e4pm.mp4", " x.mp4", "x.mp4 ", "名前.mp4",
    "x" * 252 + ".mp4", "a/" * LIMITS.max_path_depth + "x.mp4", ("abcdefgh/" * 120) + "x.mp4",
    "file:x.mp4", "x.mp4?query", "x.mp4#frag",
]


@pytest.mark.parametrize("value", HOSTILE_PATHS)
def test_hostile_output_paths_are_refused(value: str) -> None:
    with pytest.raises(InvalidRequest):
        validate_output_path(value)
    for field in ("file_path", "hls_dir"):
        refused(spec_pb(**{"file_path": "", field: value}))


@pytest.mark.parametrize("value", ["room.mp4", "rooms/room-1.mp4", "a.b/c_d-e.flv", "show",
                                   "tenant/2025-01-01/show/", "x" * 251 + ".mp4"])
def test_plain_output_paths_pass(value: str) -> None:
    validate_output_path(value)


@given(st.text(max_size=80) | st.text(alphabet="./\\~%x\x00", max_size=20))
@settings(max_examples=300, deadline=None)
def test_an_accepted_path_never_leaves_its_folder_by_its_text(value: str) -> None:
    try:
        p = validate_output_path(value)
    except InvalidRequest:
        return
    joined = posixpath.normpath(posixpath.join("/out", str(p)))
    assert joined.startswith("/out/") and joined != "/out"


def test_targets_are_resolved_inside_the_output_folder(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    f = OutputTarget.resolve(OutputKind.FILE, "a/b/room.mp4", root)
    assert f.location == str(root.resolve() / "a" / "b" / "room.mp4")
    h = OutputTarget.resolve(OutputKind.HLS, "show/", root)
    assert h.location == str(root.resolve() / "show" / "index.m3u8")


@pytest.mark.parametrize("value", HOSTILE_PATHS)
def test_the_worker_refuses_hostile_paths_too(tmp_path: Path, value: str) -> None:
    with pytest.raises(OutputError):
        OutputTarget.resolve(OutputKind.FILE, value, tmp_path)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.mp4").write_bytes(b"not yours")
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_a_folder_link_out_of_the_output_folder_is_refused(root: Path, outside: Path) -> None:
    (root / "link").symlink_to(outside)
    for kind, value in ((OutputKind.FILE, "link/secret.mp4"), (OutputKind.FILE, "link/new.mp4"),
                        (OutputKind.HLS, "link"), (OutputKind.HLS, "link/show")):
        with pytest.raises(OutputError, match="leaves"):
            OutputTarget.resolve(kind, value, root)
    assert (outside / "secret.mp4").read_bytes() == b"not yours"


def test_a_file_link_out_of_the_output_folder_is_refused(root: Path, outside: Path) -> None:
    (root / "room.mp4").symlink_to(outside / "secret.mp4")
    (root / "dangling.mp4").symlink_to(outside / "does-not-exist.mp4")
    (root / "abs.flv").symlink_to("/dev/null")
    for value in ("room.mp4", "dangling.mp4", "abs.flv"):
        with pytest.raises(OutputError, match="leaves"):
            OutputTarget.resolve(OutputKind.FILE, value, root)


def test_links_inside_an_hls_folder_are_followed_too(root: Path, outside: Path) -> None:
    show = root / "show"
    show.mkdir()
    (show / "index.m3u8").symlink_to(outside / "playlist.m3u8")
    with pytest.raises(OutputError, match="leaves"):
        OutputTarget.resolve(OutputKind.HLS, "show", root)
    other = root / "other"
    other.mkdir()
    (other / "segment_00003.ts").symlink_to(outside / "secret.mp4")
    with pytest.raises(OutputError, match="leaves"):
        OutputTarget.resolve(OutputKind.HLS, "other", root)


def test_a_link_to_the_output_folder_itself_is_refused(root: Path) -> None:
    (root / "self.mp4").symlink_to(root)
    with pytest.raises(OutputError, match="leaves"):
        OutputTarget.resolve(OutputKind.FILE, "self.mp4", root)


def test_links_that_stay_inside_and_a_linked_root_are_allowed(tmp_path: Path, root: Path) -> None:
    (root / "real").mkdir()
    (root / "alias").symlink_to(root / "real")
    t = OutputTarget.resolve(OutputKind.FILE, "alias/room.mp4", root)
    assert t.location == str(root.resolve() / "real" / "room.mp4")
    linked_root = tmp_path / "root-link"
    linked_root.symlink_to(root)
    t = OutputTarget.resolve(OutputKind.HLS, "show", linked_root)
    assert t.location == str(root.resolve() / "show" / "index.m3u8")


def test_a_folder_named_like_traversal_is_just_a_name(root: Path) -> None:
    # Three dots are no parent folder: the name stays inside.
    t = OutputTarget.resolve(OutputKind.HLS, ".../...", root)
    assert t.location == str(root.resolve() / "..." / "..." / "index.m3u8")


@pytest.mark.parametrize("url", [
    "rtmp://169.254.169.254/live/x", "rtmp://[fe80::1]/live/x", "rtmp://0.0.0.0/live/x",
    "rtmp://2852039166/live/x", "rtmp://metadata.google.internal/live/x",
])
def test_the_worker_refuses_forbidden_rtmp_hosts(tmp_path: Path, url: str) -> None:
    with pytest.raises(OutputError, match="forbidden"):
        OutputTarget.resolve(OutputKind.RTMP, url, tmp_path)


def test_the_worker_applies_the_configured_rtmp_policy(tmp_path: Path) -> None:
    policy = EgressPolicy.from_config(forbidden_hosts=["loopback"])
    assert OutputTarget.resolve(OutputKind.RTMP, "rtmp://127.0.0.1:1935/live/x", tmp_path).location
    with pytest.raises(OutputError, match="forbidden"):
        OutputTarget.resolve(OutputKind.RTMP, "rtmp://127.0.0.1:1935/live/x", tmp_path, policy)


@pytest.mark.parametrize("url", [
    "http://x/live/k", "rtmpt://x/live/k", "RTMP://x/live/k", "rtmp:/x/live", "rtmp://x",
    "rtmp://x/", "rtmp://user:pw@x/live/k", "rtmp://x@169.254.169.254/live/k",
    "rtmp://x/live/k y", "rtmp://x/live/k\n", "rtmp://x/live/k#frag", "rtmp://x:0/live/k",
    "rtmp://x:65536/live/k", "rtmp://x:-1/live/k", "rtmp://[::1/live/k", "rtmp://[x]/live/k",
    "rtmp://exämple.com/live/k", "rtmp://x\\@y/live/k", "rtmp://x/" + "k" * 2048, "rtmp://-x/a/b",
])
def test_malformed_rtmp_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidRequest, match="rtmp_url"):
        parse_rtmp_url(url)
    refused(spec_pb(file_path="", rtmp_url=url))


# -- through the scheduler's API ---------------------------------------------------------

def test_the_api_answers_hostile_specs_with_invalid_argument_and_stores_nothing(
        tmp_path: Path, model_dir: Path) -> None:
    hostile = [
        create_req(width=0), create_req(width=U32, height=U32), create_req(fps=0),
        create_req(fps=U32), create_req(seconds=math.nan), create_req(seconds=-math.inf),
        create_req(room_id="r\x00"), create_req(room_id="x" * 200),
        create_req(drive=types_pb2.DRIVE_MODE_UNSPECIFIED), create_req(drive=42),
        create_req(drive=types_pb2.DRIVE_MODE_VOICE, script=[types_pb2.ScriptSegment(text="hi")]),
        create_req(file_path="../../x.mp4"), create_req(file_path="a\\..\\x.mp4"),
        create_req(file_path="", hls_dir="show%d"), create_req(file_path="", rtmp_url="rtmp://u@h/a/b"),
        create_req(script=[types_pb2.ScriptSegment(text="x", pause_after_seconds=math.nan)]),
    ]
    missing = create_req()
    missing.spec.ClearField("output")
    hostile.append(missing)

    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_, stub, _ch):
            for req in hostile:
                await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.CreateSession(req))
            assert list((await stub.ListSessions(sessions_pb2.ListSessionsRequest())).sessions) == []

    run(body)


def test_the_api_refuses_scripts_for_live_rooms_and_hostile_segments(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_, stub, ch):
            worker = ProtocolWorker(ch, "w1")
            voice = await stub.CreateSession(create_req("v", drive=types_pb2.DRIVE_MODE_VOICE))
            text = await stub.CreateSession(create_req("t"))
            await expect_status(grpc.StatusCode.FAILED_PRECONDITION, stub.AppendScript(
                sessions_pb2.AppendScriptRequest(session_id=voice.session_id,
                                                 segments=[types_pb2.ScriptSegment(text="hi")])))
            for seg in (types_pb2.ScriptSegment(text="a\x00b"),
                        types_pb2.ScriptSegment(text="x", pause_after_seconds=math.inf),
                        types_pb2.ScriptSegment(text="x", pause_after_seconds=-1),
                        types_pb2.ScriptSegment(text=" ")):
                await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.AppendScript(
                    sessions_pb2.AppendScriptRequest(session_id=text.session_id, segments=[seg])))
            await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.AppendScript(
                sessions_pb2.AppendScriptRequest(session_id=text.session_id, segments=[])))
            got = await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=text.session_id))
            assert list(got.spec.script) == []
            await worker.close()

    run(body)


# Findings of the fuzz test, each pinned by a test of its own.


def test_usage_windows_outside_the_timestamp_range_are_invalid_argument(
        tmp_path: Path, model_dir: Path) -> None:
    from google.protobuf.timestamp_pb2 import Timestamp

    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_, stub, _ch):
            for start, end in ((Timestamp(seconds=0), Timestamp(seconds=10, nanos=-1)),
                               (Timestamp(seconds=2**62), Timestamp(seconds=2**62 + 1)),
                               (Timestamp(seconds=-(2**62)), Timestamp(seconds=0, nanos=2**31 - 1))):
                await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.GetUsage(
                    sessions_pb2.GetUsageRequest(start=start, end=end)))

    run(body)


def test_huge_and_odd_ids_are_refused_not_echoed(tmp_path: Path, model_dir: Path) -> None:
    huge = "x" * 20_000

    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_, stub, _ch):
            async def watch(session_id: str) -> Any:
                return await stub.WatchSession(sessions_pb2.WatchSessionRequest(session_id=session_id)).read()

            calls = [
                lambda: stub.GetSession(sessions_pb2.GetSessionRequest(session_id=huge)),
                lambda: stub.EndSession(sessions_pb2.EndSessionRequest(session_id=huge)),
                lambda: stub.AppendScript(sessions_pb2.AppendScriptRequest(
                    session_id=huge, segments=[types_pb2.ScriptSegment(text="hi")])),
                lambda: watch(huge),
                lambda: stub.GetSession(sessions_pb2.GetSessionRequest(session_id="a\nb")),
                lambda: stub.GetTenant(sessions_pb2.GetTenantRequest(tenant=huge)),
                lambda: stub.ListSessions(sessions_pb2.ListSessionsRequest(tenant=huge)),
                lambda: stub.GetUsage(sessions_pb2.GetUsageRequest(tenant=huge)),
                lambda: stub.CreateSession(create_req("r", request_id="a\nb")),
                lambda: stub.CreateSession(create_req("r", request_id=huge[:200])),
            ]
            for call in calls:
                details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, call())
                assert len(details) < 300

    run(body)


def test_forbidden_rtmp_hosts_are_permission_denied_at_admission(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir, rtmp_forbidden_hosts=["private"]) as (_, stub, _ch):
            for i, url in enumerate(("rtmp://169.254.169.254/live/k", "rtmp://[fe80::1]/live/k",
                                     "rtmp://0.0.0.0:1935/live/k", "rtmp://2852039166/live/k",
                                     "rtmp://metadata.google.internal/live/k", "rtmp://10.0.0.8/live/k")):
                await expect_status(grpc.StatusCode.PERMISSION_DENIED, stub.CreateSession(
                    create_req(f"r{i}", file_path="", rtmp_url=url)))
            assert list((await stub.ListSessions(sessions_pb2.ListSessionsRequest())).sessions) == []
            ok = await stub.CreateSession(create_req("ok", file_path="", rtmp_url="rtmp://127.0.0.1/live/k"))
            assert ok.session_id

    run(body)


def test_a_worker_cannot_poison_usage_with_impossible_progress(tmp_path: Path, model_dir: Path) -> None:
    async def body() -> None:
        async with scheduler(tmp_path, model_dir) as (_, stub, ch):
            worker = ProtocolWorker(ch, "w1")
            s = await stub.CreateSession(create_req("r"))
            await worker.next("assign")
            worker.outbox.put_nowait(workers_pb2.WorkerMessage(session_update=workers_pb2.SessionUpdate(
                session_id=s.session_id, state=types_pb2.SESSION_STATE_RUNNING,
                epoch=worker.epochs.get(s.session_id, 1),
                progress=types_pb2.SessionProgress(frames_rendered=10, stream_seconds=math.inf,
                                                   device_seconds=math.nan))))
            worker.report(s.session_id, types_pb2.SESSION_STATE_ENDED, frames=50, device=0.5)
            await client.wait_for(stub, s.session_id, lambda x: x.state in client.TERMINAL, 10)
            usage = await stub.GetUsage(sessions_pb2.GetUsageRequest())
            for row in usage.rows:
                assert all(math.isfinite(v) for v in (row.stream_seconds, row.device_seconds, row.cost,
                                                      row.cost_per_stream_hour)), row
            await worker.close()

    run(body)


def test_a_room_whose_ingest_name_resolves_to_a_forbidden_address_fails_before_connecting(
        pipeline: Any, tmp_path: Path) -> None:
    import asyncio

    from tests.builders import make_spec
    from workers.rooms.room import Pacing, Room, RoomState

    policy = EgressPolicy.from_config(forbidden_hosts=["loopback"])
    url = "rtmp://localhost:1935/live/k"  # a name: its text passes, its addresses do not
    target = OutputTarget.resolve(OutputKind.RTMP, url, tmp_path, policy)
    room = Room("s1", make_spec("r", seconds=1.0), target, pipeline, pacing=Pacing.FAST,
                egress=policy)  # type: ignore[call-arg]
    asyncio.run(asyncio.wait_for(room.run(), 60))
    assert room.state is RoomState.FAILED
    assert "forbidden" in room.reason and room.stats.frames_rendered == 0
