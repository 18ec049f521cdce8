"""Conversions between the protobuf contract and the domain values. The only
module where both meet; validation of tenant input happens here, at the edge."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from avatarfarm.domain import (
    LIMITS,
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
    validate_output,
    validate_quality,
    validate_script,
)
from avatarfarm.v1 import types_pb2, workers_pb2

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


def _check_id(name: str, value: str, *, required: bool = True) -> None:
    if required and not value:
        raise InvalidRequest(f"{name} is required")
    if len(value) > LIMITS.max_id_length:
        raise InvalidRequest(f"{name} is longer than {LIMITS.max_id_length} characters")
    if any(not (ch.isalnum() or ch in "-_.:") for ch in value):
        raise InvalidRequest(f"{name} {value!r} may contain only letters, digits and - _ . :")


def spec_from_pb(pb: types_pb2.SessionSpec) -> SessionSpec:
    """Validates and converts a tenant's SessionSpec (raises InvalidRequest)."""
    _check_id("tenant", pb.tenant)
    _check_id("room_id", pb.room_id)
    _check_id("avatar_id", pb.avatar_id)
    if pb.drive_mode not in DRIVE_MODES:
        raise InvalidRequest("drive_mode must be TEXT, VOICE or MOCAP")
    tier = TIERS.get(pb.tier, Tier.STANDARD) if pb.tier else Tier.STANDARD
    if pb.tier and pb.tier not in TIERS:
        raise InvalidRequest(f"unknown tier {pb.tier}")
    if not pb.HasField("quality"):
        raise InvalidRequest("quality (width, height, fps) is required")
    quality = Quality(pb.quality.width, pb.quality.height, pb.quality.fps)
    validate_quality(quality)
    which = pb.output.WhichOneof("target")
    if which is None:
        raise InvalidRequest("output is required: file_path, hls_dir or rtmp_url")
    kind = {"file_path": OutputKind.FILE, "hls_dir": OutputKind.HLS, "rtmp_url": OutputKind.RTMP}[which]
    output = Output(kind, getattr(pb.output, which))
    validate_output(output)
    if not 0.0 <= pb.max_duration_seconds <= LIMITS.max_duration_seconds:
        raise InvalidRequest(f"max_duration_seconds must be within 0..{LIMITS.max_duration_seconds:.0f}")
    script = tuple(segments_from_pb(pb.script))
    if script and DRIVE_MODES[pb.drive_mode] is not DriveMode.TEXT:
        raise InvalidRequest("script segments are only for text-driven rooms")
    validate_script(script)
    return SessionSpec(pb.tenant, pb.room_id, pb.avatar_id, DRIVE_MODES[pb.drive_mode], quality, tier,
                       output, pb.max_duration_seconds, script)


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
                                     stage_seconds=dict(p.stage_seconds))


def progress_from_pb(pb: types_pb2.SessionProgress) -> Progress:
    return Progress(pb.frames_rendered, pb.late_frames, pb.stream_seconds, pb.device_seconds,
                    tuple(sorted(pb.stage_seconds.items())))


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
