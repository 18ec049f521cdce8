"""Values both planes share: drive modes, tiers, quality, session states and the
limits a request is validated against. Plain Python, no gRPC."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import PurePosixPath


class DriveMode(enum.Enum):
    TEXT = "text"
    VOICE = "voice"
    MOCAP = "mocap"

    @property
    def uses_audio_to_motion(self) -> bool:
        return self is not DriveMode.MOCAP

    @property
    def uses_tts(self) -> bool:
        return self is DriveMode.TEXT


class Tier(enum.Enum):
    PREMIUM = "premium"
    STANDARD = "standard"
    BEST_EFFORT = "best_effort"

    @property
    def priority(self) -> int:
        """Placement order: lower goes first."""
        return _TIER_PRIORITY[self]


_TIER_PRIORITY = {Tier.PREMIUM: 0, Tier.STANDARD: 1, Tier.BEST_EFFORT: 2}


class SessionState(enum.Enum):
    PENDING = "pending"
    PLACED = "placed"
    RUNNING = "running"
    ENDED = "ended"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (SessionState.ENDED, SessionState.FAILED)


# Allowed transitions; anything else is a bug or a stale report and is refused.
TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.PENDING: frozenset({SessionState.PLACED, SessionState.ENDED, SessionState.FAILED}),
    SessionState.PLACED: frozenset({SessionState.RUNNING, SessionState.PENDING, SessionState.ENDED,
                                    SessionState.FAILED}),
    SessionState.RUNNING: frozenset({SessionState.PENDING, SessionState.ENDED, SessionState.FAILED}),
    SessionState.ENDED: frozenset(),
    SessionState.FAILED: frozenset(),
}


class OutputKind(enum.Enum):
    FILE = "file"
    HLS = "hls"
    RTMP = "rtmp"


@dataclass(frozen=True, slots=True)
class Quality:
    width: int
    height: int
    fps: int

    @property
    def render_side(self) -> int:
        """The square portrait the renderer draws; the frame is the portrait centred."""
        return min(self.width, self.height)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}@{self.fps}"


@dataclass(frozen=True, slots=True)
class Limits:
    min_side: int = 128
    max_width: int = 3840
    max_height: int = 3840
    min_fps: int = 1
    max_fps: int = 60
    max_duration_seconds: float = 24 * 3600.0
    max_script_chars: int = 20_000
    max_segments: int = 1_000
    max_id_length: int = 128


LIMITS = Limits()


class InvalidRequest(ValueError):
    """A request that can never succeed as sent (maps to INVALID_ARGUMENT)."""


def validate_quality(q: Quality, limits: Limits = LIMITS) -> None:
    if not (limits.min_side <= q.width <= limits.max_width and
            limits.min_side <= q.height <= limits.max_height):
        raise InvalidRequest(
            f"resolution {q.width}x{q.height} is out of range: width and height must be between "
            f"{limits.min_side} and {limits.max_width}")
    if q.width % 2 or q.height % 2:
        raise InvalidRequest(f"resolution {q.width}x{q.height} must have even width and height (H.264 4:2:0)")
    if not limits.min_fps <= q.fps <= limits.max_fps:
        raise InvalidRequest(f"fps {q.fps} is out of range {limits.min_fps}..{limits.max_fps}")


@dataclass(frozen=True, slots=True)
class ScriptSegment:
    text: str
    pause_after_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Output:
    kind: OutputKind
    target: str  # relative path (file, HLS folder) or RTMP URL


@dataclass(frozen=True, slots=True)
class SessionSpec:
    tenant: str
    room_id: str
    avatar_id: str
    drive_mode: DriveMode
    quality: Quality
    tier: Tier
    output: Output
    max_duration_seconds: float = 0.0
    script: tuple[ScriptSegment, ...] = ()


def validate_script(segments: tuple[ScriptSegment, ...] | list[ScriptSegment],
                    limits: Limits = LIMITS) -> None:
    if len(segments) > limits.max_segments:
        raise InvalidRequest(f"{len(segments)} script segments; at most {limits.max_segments} per call")
    total = 0
    for i, seg in enumerate(segments):
        if not seg.text.strip() and seg.pause_after_seconds <= 0:
            raise InvalidRequest(f"script segment {i} is empty")
        if not 0.0 <= seg.pause_after_seconds <= 60.0:
            raise InvalidRequest(f"script segment {i}: pause_after_seconds must be within 0..60")
        if any(ord(ch) < 32 and ch not in "\n\t" for ch in seg.text):
            raise InvalidRequest(f"script segment {i} contains control characters")
        total += len(seg.text)
    if total > limits.max_script_chars:
        raise InvalidRequest(f"script has {total} characters; at most {limits.max_script_chars}")


class Stage(enum.Enum):
    TTS = "tts"
    AUDIO_TO_MOTION = "audio_to_motion"
    RENDER = "render"
    ENCODE = "encode"
    ALIGNMENT = "alignment"  # the lip-sync check


@dataclass(frozen=True, slots=True)
class Progress:
    """Cumulative counters of one room as its worker last reported them."""

    frames_rendered: int = 0
    late_frames: int = 0
    stream_seconds: float = 0.0
    device_seconds: float = 0.0
    stage_seconds: tuple[tuple[str, float], ...] = ()


def validate_output_path(value: str) -> PurePosixPath:
    """A tenant's output path must be relative to the worker's output folder, without '..'."""
    if not value or "\x00" in value:
        raise InvalidRequest("output path is empty")
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or value.startswith("~"):
        raise InvalidRequest(f"output path {value!r} must be relative to the output folder, "
                             "without '..'")
    return p


def validate_output(output: Output) -> None:
    if output.kind is OutputKind.RTMP:
        if not output.target.startswith(("rtmp://", "rtmps://")) or len(output.target) > 2048:
            raise InvalidRequest(f"rtmp_url must be an rtmp:// or rtmps:// URL, got {output.target!r}")
        return
    path = validate_output_path(output.target)
    if output.kind is OutputKind.FILE and path.suffix not in (".mp4", ".flv"):
        raise InvalidRequest(f"file_path must end in .mp4 or .flv, got {output.target!r}")
