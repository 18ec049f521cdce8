"""Conversions between the protobuf contract and the domain values. The only
module where both meet; validation of tenant input happens here, at the edge."""

from __future__ import annotations

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
from avatarfarm.v1 import sessions_pb2, types_pb2, workers_pb2

DRIVE_MODES = {
    types_pb2.DRIVE_MODE_TEXT: DriveMode.TEXT,
    types_pb2.DRIVE_MODE_VOICE: DriveMode.VOICE,
    types_pb2.DRIVE_MODE_MOCAP: DriveMode.MOCAP,
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
}
_DRIVE_PB = {v: k for k, v in DRIVE_MODES.items()}
_TIER_PB = {v: k for k, v in TIERS.items()}
_STATE_PB = {v: k for k, v in STATES.items()}
_STAGE_PB = {v: k for k, v in STAGES.items()}


def _spec(pb: types_pb2.SessionSpec) -> SessionSpec:
    """The domain spec of a message, refusing only what has no domain value at all
    (an unknown enum, a missing quality or output)."""
    drive = DRIVE_MODES.get(pb.drive_mode)
    if drive is None:
        raise InvalidRequest(f"drive_mode must be TEXT, VOICE or MOCAP, got {pb.drive_mode}")
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
    return SessionSpec(pb.tenant, pb.room_id, pb.avatar_id, drive,
                       Quality(pb.quality.width, pb.quality.height, pb.quality.fps), tier,
                       Output(kind, getattr(pb.output, which)), pb.max_duration_seconds,
                       tuple(segments_from_pb(pb.script)))


def spec_from_pb(pb: types_pb2.SessionSpec) -> SessionSpec:
    """Validates and converts a tenant's SessionSpec (raises InvalidRequest)."""
    spec = _spec(pb)
    validate_spec(spec)
    return spec


def spec_from_stored(pb: types_pb2.SessionSpec) -> SessionSpec:
    """Converts a spec this scheduler admitted earlier, without validating it again: limits
    may have been tightened since, and a stored session must still load."""
    return _spec(pb)


def create_from_pb(request: sessions_pb2.CreateSessionRequest) -> tuple[SessionSpec, str]:
    """A CreateSession request's validated spec and idempotency key."""
    spec = spec_from_pb(request.spec)
    validate_id("request_id", request.request_id, required=False)
    return spec, request.request_id


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
        quality=types_pb2.Quality(width=spec.quality.width, height=spec.quality.height,
                                  fps=spec.quality.fps),
        tier=_TIER_PB[spec.tier], output=out, max_duration_seconds=spec.max_duration_seconds,
        script=segments_to_pb(spec.script))


def state_to_pb(state: SessionState) -> types_pb2.SessionState:
    return _STATE_PB[state]


def tier_to_pb(tier: Tier) -> types_pb2.Tier:
    return _TIER_PB[tier]


def stage_to_pb(stage: Stage) -> workers_pb2.Stage:
    return _STAGE_PB[stage]


def progress_to_pb(p: Progress) -> types_pb2.SessionProgress:
    return types_pb2.SessionProgress(frames_rendered=p.frames_rendered, late_frames=p.late_frames,
                                     stream_seconds=p.stream_seconds, device_seconds=p.device_seconds,
                                     stage_seconds=dict(p.stage_seconds),
                                     script_segments_done=p.script_segments_done)


def progress_from_pb(pb: types_pb2.SessionProgress) -> Progress:
    return Progress(pb.frames_rendered, pb.late_frames, pb.stream_seconds, pb.device_seconds,
                    tuple(sorted(pb.stage_seconds.items())), pb.script_segments_done)


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
