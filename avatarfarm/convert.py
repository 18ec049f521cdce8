"""Conversions between the protobuf contract and the domain values. The only
module where both meet; validation of tenant input happens here, at the edge."""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from avatarfarm.domain import (
    DriveMode,
    InvalidRequest,
    Output,
    OutputKind,
    Progress,
    Quality,
    ScriptSegment,
    SessionSpec,
    SessionState,
    Stage,
    Tier,
    validate_id,
    validate_spec,
)
from avatarfarm.live_driver import DriverPolicy, DriverState
from avatarfarm.v1 import sessions_pb2, types_pb2, workers_pb2

DRIVE_MODES = {
    types_pb2.DRIVE_MODE_TEXT: DriveMode.TEXT,
    types_pb2.DRIVE_MODE_VOICE: DriveMode.VOICE,
    types_pb2.DRIVE_MODE_MOCAP: DriveMode.MOCAP,
    types_pb2.DRIVE_MODE_CAMERA: DriveMode.CAMERA,
}
TIERS = {
    types_pb2.TIER_PREMIUM: Tier.PREMIUM,
    types_pb2.TIER_STANDARD: Tier.STANDARD,
    types_pb2.TIER_BEST_EFFORT: Tier.BEST_EFFORT,
}
STATES = {
    types_pb2.SESSION_STATE_PENDING: SessionState.PENDING,
    types_pb2.SESSION_STATE_PLACED: SessionState.PLACED,
    types_pb2.SESSION_STATE_RUNNING: SessionState.RUNNING,
    types_pb2.SESSION_STATE_ENDED: SessionState.ENDED,
    types_pb2.SESSION_STATE_FAILED: SessionState.FAILED,
}
STAGES = {
    workers_pb2.STAGE_TTS: Stage.TTS,
    workers_pb2.STAGE_AUDIO_TO_MOTION: Stage.AUDIO_TO_MOTION,
    workers_pb2.STAGE_RENDER: Stage.RENDER,
    workers_pb2.STAGE_ENCODE: Stage.ENCODE,
    workers_pb2.STAGE_ALIGNMENT: Stage.ALIGNMENT,
    workers_pb2.STAGE_FACE: Stage.FACE,
}
_DRIVE_PB = {v: k for k, v in DRIVE_MODES.items()}
_TIER_PB = {v: k for k, v in TIERS.items()}
_STATE_PB = {v: k for k, v in STATES.items()}
_STAGE_PB = {v: k for k, v in STAGES.items()}


def quality_from_pb(pb: types_pb2.Quality) -> Quality:
    """A Quality as the message says it, unchecked (validate_quality is the edge's)."""
    return Quality(pb.width, pb.height, pb.fps)


def quality_to_pb(q: Quality) -> types_pb2.Quality:
    return types_pb2.Quality(width=q.width, height=q.height, fps=q.fps)


def _spec(pb: types_pb2.SessionSpec) -> SessionSpec:
    """The domain spec of a message, refusing only what has no domain value at all
    (an unknown enum, a missing quality or output)."""
    drive = DRIVE_MODES.get(pb.drive_mode)
    if drive is None:
        raise InvalidRequest(f"drive_mode must be TEXT, VOICE, MOCAP or CAMERA, got {pb.drive_mode}")
    # An unset tier means the default tier; a value this server does not know is a mistake.
    tier = TIERS.get(pb.tier) if pb.tier else Tier.STANDARD
    if tier is None:
        raise InvalidRequest(f"unknown tier {pb.tier}")
    if not pb.HasField("quality"):
        raise InvalidRequest("quality (width, height, fps) is required")
    which = pb.output.WhichOneof("target") if pb.HasField("output") else None
    if which is None:
        raise InvalidRequest("output is required: file_path, hls_dir or rtmp_url")
    kind = {"file_path": OutputKind.FILE, "hls_dir": OutputKind.HLS, "rtmp_url": OutputKind.RTMP}[which]
    return SessionSpec(pb.tenant, pb.room_id, pb.avatar_id, drive, quality_from_pb(pb.quality), tier,
                       Output(kind, getattr(pb.output, which)), pb.max_duration_seconds,
                       tuple(segments_from_pb(pb.script)), pb.platform, pb.product_category,
                       pb.language, pb.voice_conversion)


def spec_from_pb(pb: types_pb2.SessionSpec) -> SessionSpec:
    """Validates and converts a tenant's SessionSpec (raises InvalidRequest)."""
    spec = _spec(pb)
    validate_spec(spec)
    return spec


def spec_from_trusted(pb: types_pb2.SessionSpec) -> SessionSpec:
    """Converts a spec the scheduler admitted earlier (a stored session, a worker's
    Assign) without the tenant edge's limits: they may have been tightened since, or
    differ between the scheduler's release and a worker's, and an admitted session must
    still load and run. Raises InvalidRequest only for what has no domain value."""
    return _spec(pb)


def create_from_pb(request: sessions_pb2.CreateSessionRequest) -> tuple[SessionSpec, str]:
    """A CreateSession request's validated spec and idempotency key."""
    spec = spec_from_pb(request.spec)
    validate_id("request_id", request.request_id, required=False)
    return spec, request.request_id


def session_id_from_pb(value: str) -> str:
    """A session id as a tenant sent it: refused before it is looked up, so an answer
    never echoes kilobytes of it back (status details travel in headers, which gRPC
    caps at 16 KB: a longer echo reaches the client as a transport error)."""
    validate_id("session_id", value)
    return value


def tenant_from_pb(value: str, *, required: bool = False) -> str:
    """A tenant name given as a filter (ListSessions, GetUsage; empty: all) or asked
    about (GetTenant, required)."""
    validate_id("tenant", value, required=required)
    return value


def reason_from_pb(value: str, limit: int = 512) -> str:
    """A tenant's free-text reason (EndSession): kept, shown and logged, so control
    characters go and the length is capped."""
    return "".join(ch for ch in value[:limit] if ch.isprintable())


# Timestamp's documented range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)


def time_from_pb(name: str, ts: Timestamp) -> float:
    """Seconds since the epoch of a tenant's Timestamp (GetUsage's window); one outside
    Timestamp's range or with nanos outside 0..999,999,999 is refused, not raised on."""
    if not (_TIMESTAMP_SECONDS[0] <= ts.seconds <= _TIMESTAMP_SECONDS[1] and 0 <= ts.nanos <= 999_999_999):
        raise InvalidRequest(f"{name} is not a valid timestamp (years 1..9999, nanos 0..999999999)")
    return ts.seconds + ts.nanos / 1e9


def optional_time_from_pb(msg: Any, name: str, label: str = "") -> float | None:
    """``msg.<name>`` as time_from_pb reads it (errors call it ``label``, default its
    name), None when the field is unset."""
    return time_from_pb(label or name, getattr(msg, name)) if msg.HasField(name) else None


def segments_from_pb(segments: object) -> list[ScriptSegment]:
    return [ScriptSegment(s.text, s.pause_after_seconds) for s in segments]  # type: ignore[attr-defined]


def segments_to_pb(segments: tuple[ScriptSegment, ...] | list[ScriptSegment]) -> list[types_pb2.ScriptSegment]:
    return [types_pb2.ScriptSegment(text=s.text, pause_after_seconds=s.pause_after_seconds)
            for s in segments]


def spec_to_pb(spec: SessionSpec) -> types_pb2.SessionSpec:
    out = types_pb2.Output()
    field = {OutputKind.FILE: "file_path", OutputKind.HLS: "hls_dir", OutputKind.RTMP: "rtmp_url"}
    setattr(out, field[spec.output.kind], spec.output.target)
    return types_pb2.SessionSpec(
        tenant=spec.tenant, room_id=spec.room_id, avatar_id=spec.avatar_id,
        drive_mode=_DRIVE_PB[spec.drive_mode],
        quality=quality_to_pb(spec.quality),
        tier=_TIER_PB[spec.tier], output=out, max_duration_seconds=spec.max_duration_seconds,
        script=segments_to_pb(spec.script), platform=spec.platform,
        product_category=spec.product_category, language=spec.language,
        voice_conversion=spec.voice_conversion)


def state_to_pb(state: SessionState) -> types_pb2.SessionState:
    return _STATE_PB[state]


def tier_to_pb(tier: Tier) -> types_pb2.Tier:
    return _TIER_PB[tier]


def stage_to_pb(stage: Stage) -> workers_pb2.Stage:
    return _STAGE_PB[stage]


DRIVER_STATES = {
    types_pb2.DRIVER_STATE_WAITING: DriverState.WAITING,
    types_pb2.DRIVER_STATE_LIVE: DriverState.LIVE,
    types_pb2.DRIVER_STATE_FROZEN: DriverState.FROZEN,
    types_pb2.DRIVER_STATE_LOOPED: DriverState.LOOPED,
    types_pb2.DRIVER_STATE_NO_FACE: DriverState.NO_FACE,
    types_pb2.DRIVER_STATE_ABSENT: DriverState.ABSENT,
}
DRIVER_STATES_PB = {v: k for k, v in DRIVER_STATES.items()}


def progress_to_pb(p: Progress) -> types_pb2.SessionProgress:
    return types_pb2.SessionProgress(frames_rendered=p.frames_rendered, late_frames=p.late_frames,
                                     stream_seconds=p.stream_seconds, device_seconds=p.device_seconds,
                                     stage_seconds=dict(p.stage_seconds),
                                     script_segments_done=p.script_segments_done,
                                     av_offset_seconds=p.av_offset_seconds,
                                     av_correction_seconds=p.av_correction_seconds,
                                     sync_checks=p.sync_checks,
                                     driver_state=DRIVER_STATES_PB[p.driver_state]
                                     if p.driver_state is not None
                                     else types_pb2.DRIVER_STATE_UNSPECIFIED,
                                     driven_seconds=p.driven_seconds, driver=p.driver,
                                     voice_unavailable=p.voice_unavailable)


def progress_from_pb(pb: types_pb2.SessionProgress) -> Progress:
    return Progress(pb.frames_rendered, pb.late_frames, pb.stream_seconds, pb.device_seconds,
                    tuple(sorted(pb.stage_seconds.items())), pb.script_segments_done,
                    pb.av_offset_seconds, pb.av_correction_seconds, pb.sync_checks,
                    DRIVER_STATES.get(pb.driver_state), pb.driven_seconds, pb.driver,
                    pb.voice_unavailable)


def driver_policy_to_pb(p: DriverPolicy) -> workers_pb2.DriverPolicy:
    return workers_pb2.DriverPolicy(require_live=p.require_live, end_when_lost=p.end_when_lost,
                                    grace_seconds=p.grace_seconds)


def driver_policy_from_pb(pb: workers_pb2.DriverPolicy) -> DriverPolicy:
    """A camera room's driver policy from its assignment (refused, ValueError, when its
    grace period is not a real one)."""
    return DriverPolicy(pb.require_live, pb.end_when_lost, pb.grace_seconds)


# Counters past 2**53 lose precision as floats (the ledger's arithmetic); no room renders that much.
_MAX_COUNT = 2**53


def checked_progress_from_pb(pb: types_pb2.SessionProgress) -> Progress:
    """A worker's progress report, refused (InvalidRequest) when a figure could not be
    true: NaN, infinite or negative seconds, counters past 2**53. Usage and cost are
    sums of these figures, so one NaN would make a tenant's bill NaN for good."""
    seconds = [("stream_seconds", pb.stream_seconds), ("device_seconds", pb.device_seconds),
               ("driven_seconds", pb.driven_seconds),
               *((f"stage_seconds[{k[:32]!r}]", v) for k, v in pb.stage_seconds.items())]
    for name, value in seconds:
        if not (math.isfinite(value) and value >= 0.0):
            raise InvalidRequest(f"progress {name} must be finite and not negative, got {value!r}")
    for name, value in (("av_offset_seconds", pb.av_offset_seconds),
                        ("av_correction_seconds", pb.av_correction_seconds)):
        if not (math.isfinite(value) and abs(value) <= 60.0):  # signed; a minute is no offset
            raise InvalidRequest(f"progress {name} must be finite and within a minute, got {value!r}")
    for name, count in (("frames_rendered", pb.frames_rendered), ("late_frames", pb.late_frames)):
        if count > _MAX_COUNT:
            raise InvalidRequest(f"progress {name} {count} is past any real count")
    if len(pb.stage_seconds) > 16:
        raise InvalidRequest("progress names more than 16 stages")
    if len(pb.driver) > 200:
        raise InvalidRequest("progress driver is longer than 200 characters")
    if len(pb.voice_unavailable) > 1000:
        raise InvalidRequest("progress voice_unavailable is longer than 1000 characters")
    return progress_from_pb(pb)


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
