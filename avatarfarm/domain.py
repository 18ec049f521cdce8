"""Values both planes share: drive modes, tiers, quality, session states and the
limits a request is validated against. Plain Python, no gRPC.

Every tenant-supplied value is checked here before anything acts on it; the
checks are pure (no file system, no DNS), so the scheduler and the worker apply
the same ones. Where a host may be pushed to is policy, not syntax: see
``avatarfarm.egress``."""

from __future__ import annotations

import enum
import ipaddress
import math
import re
import socket
import unicodedata
from dataclasses import dataclass
from pathlib import PurePosixPath

from avatarfarm.live_driver import DriverState


class DriveMode(enum.Enum):
    TEXT = "text"
    VOICE = "voice"
    MOCAP = "mocap"
    CAMERA = "camera"

    @property
    def uses_audio_to_motion(self) -> bool:
        return self not in (DriveMode.MOCAP, DriveMode.CAMERA)

    @property
    def motion_driven(self) -> bool:
        """Its face moves as a live driver's does (pushed face motion, or a camera)."""
        return self in (DriveMode.MOCAP, DriveMode.CAMERA)

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
    # 4K UHD in either orientation: a 3840x3840 frame is within the side limits but
    # is twice the pixels any ingest takes.
    max_pixels: int = 3840 * 2160
    max_pause_seconds: float = 60.0
    # File systems refuse names over 255 bytes; refusing here gives a reason instead of
    # a room that fails when its encoder opens.
    max_path_length: int = 1024
    max_path_segment: int = 255
    max_path_depth: int = 16
    max_url_length: int = 2048


LIMITS = Limits()


class InvalidRequest(ValueError):
    """A request that can never succeed as sent (maps to INVALID_ARGUMENT)."""


class Unavailable(RuntimeError):
    """This process cannot serve the call now, and another may (maps to UNAVAILABLE:
    the caller retries, where a client library follows the leader)."""


_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


_VOICE_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


def validate_voice(name: str, value: str, *, required: bool = False) -> None:
    """A voice's name (an espeak-ng voice such as ``en-us+f3``, or a neural voice's such as
    ``en_US-joe-medium``): up to 64 letters, digits or - _ . +; "" for the default unless
    ``required``."""
    if (value or required) and not _VOICE_NAME.fullmatch(value):
        raise InvalidRequest(f"{name} must be a voice name of up to 64 letters, digits or - _ . +")


def validate_id(name: str, value: str, *, required: bool = True, limits: Limits = LIMITS) -> None:
    """Tenant, room, avatar and request ids: short ASCII names. ASCII only, because ids
    name files (avatars), metric labels and log lines, and look-alike letters from other
    scripts would let two tenants' ids read the same."""
    if not value:
        if required:
            raise InvalidRequest(f"{name} is required")
        return
    if len(value) > limits.max_id_length:
        raise InvalidRequest(f"{name} is longer than {limits.max_id_length} characters")
    if not _ID_CHARS.issuperset(value):
        raise InvalidRequest(f"{name} {value!r} may contain only ASCII letters, digits and - _ . :")
    if not value.strip("."):
        raise InvalidRequest(f"{name} {value!r} must not be only dots")


def validate_quality(q: Quality, limits: Limits = LIMITS) -> None:
    if not (limits.min_side <= q.width <= limits.max_width and
            limits.min_side <= q.height <= limits.max_height):
        raise InvalidRequest(
            f"resolution {q.width}x{q.height} is out of range: width must be within "
            f"{limits.min_side}..{limits.max_width} and height within "
            f"{limits.min_side}..{limits.max_height}")
    if q.width * q.height > limits.max_pixels:
        raise InvalidRequest(f"resolution {q.width}x{q.height} has more than {limits.max_pixels} "
                             "pixels (3840x2160)")
    if q.width % 2 or q.height % 2:
        raise InvalidRequest(f"resolution {q.width}x{q.height} must have even width and height (H.264 4:2:0)")
    if not limits.min_fps <= q.fps <= limits.max_fps:
        raise InvalidRequest(f"fps {q.fps} is out of range {limits.min_fps}..{limits.max_fps}")


def validate_duration(name: str, seconds: float, maximum: float) -> None:
    """A duration in 0..maximum; NaN and infinities fail the range test too."""
    if not (math.isfinite(seconds) and 0.0 <= seconds <= maximum):
        raise InvalidRequest(f"{name} must be within 0..{maximum:g} seconds, got {seconds!r}")


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
    # Where it is shown, what it sells, in what language (the avatar's licence and the
    # platform's policy are checked against them); empty: not stated.
    platform: str = ""
    product_category: str = ""
    language: str = ""
    # A live speaker's voice converted into the avatar's (voice- and camera-driven rooms).
    voice_conversion: bool = False


def _has_control(text: str) -> bool:
    # Control characters (C0, DEL, C1) and lone surrogates: TTS would read them as
    # garbage or stop at a NUL, and logs would carry them. Newlines and tabs are text.
    return any(unicodedata.category(ch) in ("Cc", "Cs") and ch not in "\n\t" for ch in text)


def validate_script(segments: tuple[ScriptSegment, ...] | list[ScriptSegment],
                    limits: Limits = LIMITS) -> None:
    if len(segments) > limits.max_segments:
        raise InvalidRequest(f"{len(segments)} script segments; at most {limits.max_segments} per call")
    total = 0
    for i, seg in enumerate(segments):
        if not (math.isfinite(seg.pause_after_seconds) and
                0.0 <= seg.pause_after_seconds <= limits.max_pause_seconds):
            raise InvalidRequest(f"script segment {i}: pause_after_seconds must be within "
                                 f"0..{limits.max_pause_seconds:g}")
        if not seg.text.strip() and seg.pause_after_seconds <= 0:
            raise InvalidRequest(f"script segment {i} is empty")
        if _has_control(seg.text):
            raise InvalidRequest(f"script segment {i} contains control characters")
        total += len(seg.text)
        if total > limits.max_script_chars:
            raise InvalidRequest(f"script has more than {limits.max_script_chars} characters")


class Stage(enum.Enum):
    TTS = "tts"
    AUDIO_TO_MOTION = "audio_to_motion"
    RENDER = "render"
    ENCODE = "encode"
    ALIGNMENT = "alignment"  # the lip-sync check
    FACE = "face"  # a lip-sync family redrawing the face of a prepared avatar (Wav2Lip)


# The model name of espeak-ng's TTS profile (host seconds per second of speech); a
# neural voice's TTS profile is named by the voice (device seconds).
HOST_TTS = "espeak-ng"


@dataclass(frozen=True, slots=True)
class Progress:
    """Cumulative counters of one room as its worker last reported them."""

    frames_rendered: int = 0
    late_frames: int = 0
    stream_seconds: float = 0.0
    device_seconds: float = 0.0
    stage_seconds: tuple[tuple[str, float], ...] = ()
    script_segments_done: int = 0  # text rooms: segments spoken to the end
    # Lip sync, latest values: the last conclusive check's offset (> 0: the video lags),
    # the correction in force (audio held back minus video held back), and checks run.
    av_offset_seconds: float = 0.0
    av_correction_seconds: float = 0.0
    sync_checks: int = 0
    # Camera rooms: their driver now (None: not a camera room), the stream seconds they
    # drove live, and who publishes (avatarfarm.live_driver).
    driver_state: DriverState | None = None
    driven_seconds: float = 0.0
    driver: str = ""
    # Text rooms: why their voice cannot speak now (its TTS service failing); "": it can.
    voice_unavailable: str = ""


_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def validate_output_path(value: str, limits: Limits = LIMITS) -> PurePosixPath:
    """A tenant's output path: relative to the worker's output folder and unable to leave
    it by its text alone. Segments are ASCII letters, digits, '-', '_' and '.', so there is
    no '..', no absolute path, no '~', no backslash (a separator elsewhere), no NUL, no
    control character and no '%' (FFmpeg's HLS muxer expands '%' patterns in the segment
    file names it derives from the folder). Symbolic links are the worker's concern
    (``workers.output.targets.OutputTarget.resolve``)."""
    if not value:
        raise InvalidRequest("output path is empty")
    if len(value) > limits.max_path_length:
        raise InvalidRequest(f"output path is longer than {limits.max_path_length} characters")
    parts = value.removesuffix("/").split("/")
    if len(parts) > limits.max_path_depth:
        raise InvalidRequest(f"output path {value!r} is more than {limits.max_path_depth} folders deep")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidRequest(f"output path {value!r} must be relative to the output folder, "
                                 "without empty, '.' or '..' segments")
        if len(part) > limits.max_path_segment:
            raise InvalidRequest(f"output path segment {part[:32]!r}... is longer than "
                                 f"{limits.max_path_segment} characters")
        if not _PATH_SEGMENT.fullmatch(part):
            raise InvalidRequest(f"output path {value!r} may contain only ASCII letters, digits, "
                                 "'-', '_', '.' and '/' between segments")
    return PurePosixPath(*parts)


RTMP_DEFAULT_PORTS = {"rtmp": 1935, "rtmps": 443}
# One strict grammar for RTMP URLs, so the host this code checks is the host FFmpeg
# connects to: no user info ('@' before the host is where URL parsers disagree), no
# whitespace (librtmp reads options after a space), no fragment, ASCII only.
_RTMP_URL = re.compile(
    r"(?P<scheme>rtmps?)://"
    r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.?|\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9_.-]+)?\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
    r"(?P<path>/[A-Za-z0-9._~!$&'()*+,;=:@/%?-]*)")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class RtmpUrl:
    """An RTMP URL taken apart: the host in lower case without a trailing dot or
    brackets, and its address when the host is an IP address in any form the system
    resolver reads as one (``2852039166`` and ``0xa9.0xfe.0xa9.0xfe`` are 169.254.169.254)."""

    scheme: str
    host: str
    port: int
    path: str
    address: IPAddress | None


def ip_literal(host: str) -> IPAddress | None:
    """The address a host names when it is an IP address in any form the system resolver
    reads as one (None: a host name)."""
    try:
        return ipaddress.ip_address(host.replace("%25", "%"))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host):
        try:
            # inet_aton is the parser getaddrinfo uses for numeric hosts: decimal, octal,
            # hex and short forms. It is pure (no lookup).
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def parse_rtmp_url(url: str, limits: Limits = LIMITS) -> RtmpUrl:
    if len(url) > limits.max_url_length:
        raise InvalidRequest(f"rtmp_url is longer than {limits.max_url_length} characters")
    m = _RTMP_URL.fullmatch(url)
    if m is None:
        raise InvalidRequest(
            f"rtmp_url must be rtmp://host[:port]/app/stream_key or rtmps://... (ASCII, no user "
            f"info, spaces or fragment), got {url[:200]!r}")
    scheme = m["scheme"]
    host = m["host"].lower()
    host = host[1:-1] if host.startswith("[") else host.rstrip(".")
    port = int(m["port"]) if m["port"] else RTMP_DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"rtmp_url port {port} is outside 1..65535")
    path = m["path"]
    if not path.strip("/"):
        raise InvalidRequest(f"rtmp_url {url[:200]!r} names no application (rtmp://host/app/key)")
    address = ip_literal(host)
    if m["host"].startswith("[") and not isinstance(address, ipaddress.IPv6Address):
        raise InvalidRequest(f"rtmp_url host {m['host']!r} is not an IPv6 address")
    return RtmpUrl(scheme, host, port, path, address)


def output_scope(tenant: str, output: Output) -> tuple[str, Output]:
    """What two live rooms may not share: a file or HLS folder lies in its tenant's own
    output folder (another tenant's same name is another place); an RTMP URL is one
    ingest whoever names it."""
    return ("" if output.kind is OutputKind.RTMP else tenant, output)


def validate_output(output: Output) -> None:
    if output.kind is OutputKind.RTMP:
        parse_rtmp_url(output.target)
        return
    path = validate_output_path(output.target)
    if output.kind is OutputKind.FILE and path.suffix not in (".mp4", ".flv"):
        raise InvalidRequest(f"file_path must end in .mp4 or .flv, got {output.target!r}")


# BCP 47 as far as licences need it: language, optional script, region and variants.
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z]{4})?(-([A-Za-z]{2}|[0-9]{3}))?(-[A-Za-z0-9]{5,8})*")


def validate_spec(spec: SessionSpec, limits: Limits = LIMITS) -> None:
    """Everything about a tenant's spec that can be checked without the scheduler's state."""
    validate_id("tenant", spec.tenant, limits=limits)
    validate_id("room_id", spec.room_id, limits=limits)
    validate_id("avatar_id", spec.avatar_id, limits=limits)
    validate_quality(spec.quality, limits)
    validate_output(spec.output)
    validate_duration("max_duration_seconds", spec.max_duration_seconds, limits.max_duration_seconds)
    if spec.voice_conversion and spec.drive_mode not in (DriveMode.VOICE, DriveMode.CAMERA):
        raise InvalidRequest("voice_conversion converts a live speaker's voice: only voice- and "
                             f"camera-driven rooms have one; this room is {spec.drive_mode.value}-driven")
    if spec.script and spec.drive_mode is not DriveMode.TEXT:
        raise InvalidRequest(f"script segments are only for text-driven rooms; this room is "
                             f"{spec.drive_mode.value}-driven (push its live input to the worker)")
    validate_script(spec.script, limits)
    validate_id("platform", spec.platform, required=False, limits=limits)
    validate_id("product_category", spec.product_category, required=False, limits=limits)
    if spec.language and not _LANGUAGE.fullmatch(spec.language):
        raise InvalidRequest(f"language must be a BCP 47 tag such as 'en' or 'zh-CN', got "
                             f"{spec.language[:32]!r}")


def validate_language(name: str, value: str) -> None:
    """A BCP 47 tag (language, optional script, region and variants), e.g. 'en', 'zh-CN'."""
    if not _LANGUAGE.fullmatch(value):
        raise InvalidRequest(f"{name} must be a BCP 47 tag such as 'en' or 'zh-CN', got {value[:32]!r}")
