"""Client helpers for the tenant API and the workers' live inputs (used by the
demo, the tests and the load tests; a tenant's own code does the same), and the
channel every client of ours opens: plain or TLS, with a token or API key sent on
each call when the server asks for one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from avatarfarm import tls
from avatarfarm.face_motion import ARKIT, FACE_MOTION_DIM, HEAD, INDEX
from avatarfarm.v1 import live_input_pb2, live_input_pb2_grpc, sessions_pb2, sessions_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

# Trailing metadata of a follower's refusal: where the leading scheduler is.
LEADER_METADATA = "avatarfarm-leader"


def addresses(text: str) -> list[str]:
    """The schedulers an address option names: one, or replicas as `host1:port,host2:port`."""
    return [a.strip() for a in text.split(",") if a.strip()] or [text]


def leader_hint(error: grpc.aio.AioRpcError) -> str:
    """Where a following scheduler that refused the call says the leader is ("": it did
    not say, or the call did not reach a follower). A follower refuses before doing
    anything, so the call may be made again at the leader."""
    for key, value in error.trailing_metadata() or ():
        if key == LEADER_METADATA and isinstance(value, str):
            return value
    return ""

TERMINAL = (types_pb2.SESSION_STATE_ENDED, types_pb2.SESSION_STATE_FAILED)

MetadataSource = Callable[[], Sequence[tuple[str, str]]]


class _AddMetadata:
    """Adds the credential to every call. Interceptors rather than call credentials:
    grpc sends call credentials only over TLS, and a loopback farm runs without it."""

    def __init__(self, source: MetadataSource) -> None:
        self._source = source

    def details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(tuple(details.metadata or ())))
        for key, value in self._source():
            metadata.add(key, value)
        return details._replace(metadata=metadata)


# A channel files each interceptor under the first kind it is an instance of, so
# every kind of call needs an interceptor of its own.
class _UnaryUnary(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.details(details), request)


class _UnaryStream(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.details(details), request)


class _StreamUnary(_AddMetadata, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self.details(details), requests)


class _StreamStream(_AddMetadata, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self.details(details), requests)


def channel(address: str, *, credentials: grpc.ChannelCredentials | None = None,
            metadata: MetadataSource | None = None,
            options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A channel to `address`: TLS with `credentials` (plain without), sending what
    `metadata` returns (asked again for each call) with every call."""
    interceptors = None if metadata is None else [
        kind(metadata) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=list(options),
                                   interceptors=interceptors)


def read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="ascii").strip()
    except OSError as e:
        raise ValueError(f"cannot read the token file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"the token file {path} is not ASCII text") from e
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


class TokenFile:
    """The token in a file as a bearer credential, read again when the file changes (a
    renewed token is used by the next call). An unreadable file sends no credential, so
    the server's refusal says what is missing; it is logged here once per change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: object = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    def __call__(self) -> Sequence[tuple[str, str]]:
        try:
            st = self.path.stat()
            stamp: object = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as e:
            stamp = e.strerror
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._metadata = (("authorization", f"Bearer {read_token(self.path)}"),)
            except ValueError as e:
                log.warning("%s; calls go without a token", e)
                self._metadata = ()
        return self._metadata


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """How a client reaches a server of ours and proves who it is: TLS checked against
    `ca_file` (the system's roots when only `tls` is set), a client certificate for
    mTLS, and a token (from a file, re-read when it changes) or an API key."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls: bool = False
    token: str = ""
    token_file: Path | None = None
    api_key: str = ""

    @property
    def secure(self) -> bool:
        return self.tls or self.ca_file is not None or self.cert_file is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        return tls.channel_credentials(self.ca_file, self.cert_file, self.key_file) if self.secure else None

    def metadata(self) -> MetadataSource | None:
        given = [bool(self.token), self.token_file is not None, bool(self.api_key)]
        if sum(given) > 1:
            raise ValueError("give one of a token, a token file or an API key")
        if self.token_file is not None:
            return TokenFile(self.token_file)
        fixed: tuple[tuple[str, str], ...] = ()
        if self.token:
            fixed = (("authorization", f"Bearer {self.token}"),)
        elif self.api_key:
            fixed = (("x-api-key", self.api_key),)
        return (lambda: fixed) if fixed else None

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        return channel(address, credentials=self.credentials(), metadata=self.metadata(),
                       options=options)


def open_channel(address: str, auth: ClientAuth | None = None) -> grpc.aio.Channel:
    return (auth or ClientAuth()).channel(address)


def load_script(path: Path) -> list[types_pb2.ScriptSegment]:
    """Reads a script file: one segment per line, ``text | pause seconds``, '#' comments."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        text, _, pause = line.partition("|")
        out.append(types_pb2.ScriptSegment(text=text.strip(),
                                           pause_after_seconds=float(pause or 0)))
    return out


def spec(tenant: str, room_id: str, *, drive: int = types_pb2.DRIVE_MODE_TEXT,
         tier: int = types_pb2.TIER_STANDARD, width: int = 512, height: int = 512, fps: int = 25,
         file_path: str = "", hls_dir: str = "", rtmp_url: str = "", seconds: float = 0.0,
         avatar: str = "presenter", script: Iterable[types_pb2.ScriptSegment] = ()) -> types_pb2.SessionSpec:
    out = types_pb2.Output()
    if file_path:
        out.file_path = file_path
    elif hls_dir:
        out.hls_dir = hls_dir
    elif rtmp_url:
        out.rtmp_url = rtmp_url
    return types_pb2.SessionSpec(tenant=tenant, room_id=room_id, avatar_id=avatar, drive_mode=drive,  # type: ignore[arg-type]
                                 quality=types_pb2.Quality(width=width, height=height, fps=fps),
                                 tier=tier, output=out, max_duration_seconds=seconds, script=script)  # type: ignore[arg-type]


async def wait_for(stub: sessions_pb2_grpc.SessionServiceStub, session_id: str,
                   done: Callable[[types_pb2.Session], bool], timeout: float) -> types_pb2.Session:
    """Follows WatchSession until ``done`` holds for the session (or the timeout passes)."""
    async def follow() -> types_pb2.Session:
        last = None
        call = stub.WatchSession(sessions_pb2.WatchSessionRequest(session_id=session_id))
        try:
            async for ev in call:
                last = ev.session
                if done(last):
                    return last
        finally:
            call.cancel()  # an abandoned stream would outlive this loop
        assert last is not None
        if not done(last):
            raise AssertionError(f"session {session_id} ended without the awaited state: {last}")
        return last

    return await asyncio.wait_for(follow(), timeout)


def input_auth(input_token: str, auth: ClientAuth | None = None) -> ClientAuth:
    """How to reach a room's live inputs: the connection of `auth` (TLS, a client
    certificate) with the room's input token (``Session.input_token``) as the bearer."""
    return replace(auth or ClientAuth(), token=input_token, token_file=None, api_key="")


async def push_audio(endpoint: str, session_id: str, samples: np.ndarray, sample_rate: int,
                     chunk_seconds: float = 0.1, realtime: bool = False,
                     auth: ClientAuth | None = None, *, input_token: str) -> live_input_pb2.PushSummary:
    """Streams float32 mono audio as 16-bit PCM chunks to the room's worker, with the
    room's input token (``Session.input_token``)."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    step = max(1, int(sample_rate * chunk_seconds))

    async def chunks() -> AsyncIterator[live_input_pb2.AudioChunk]:
        t0 = time.monotonic()
        for i, start in enumerate(range(0, pcm.size, step)):
            if realtime:
                await asyncio.sleep(max(0.0, t0 + i * chunk_seconds - time.monotonic()))
            yield live_input_pb2.AudioChunk(session_id=session_id, sample_rate=sample_rate,
                                            pcm_s16le=pcm[start:start + step].tobytes())

    async with open_channel(endpoint, input_auth(input_token, auth)) as ch:
        return await live_input_pb2_grpc.LiveInputServiceStub(ch).PushAudio(chunks())


def motion_frame(session_id: str, face: np.ndarray) -> live_input_pb2.MotionFrame:
    """One frame of face motion (`avatarfarm.face_motion`) as a motion-capture app sends
    it: the blendshapes it moves, by ARKit name, and the head's rotation."""
    yaw, pitch, roll = (float(x) for x in face[HEAD:HEAD + 3])
    return live_input_pb2.MotionFrame(
        session_id=session_id,
        blendshapes={name: float(v) for name, v in zip(ARKIT, face[:HEAD], strict=True) if v},
        head=live_input_pb2.HeadRotation(yaw_degrees=yaw, pitch_degrees=pitch, roll_degrees=roll))


async def push_motion(endpoint: str, session_id: str, frames: np.ndarray, fps: int,
                      realtime: bool = False, auth: ClientAuth | None = None, *,
                      input_token: str) -> live_input_pb2.PushSummary:
    """Streams face motion ([n, FACE_MOTION_DIM]: ARKit blendshapes and head rotation,
    `avatarfarm.face_motion`) to the room's worker, with the room's input token."""
    async def gen() -> AsyncIterator[live_input_pb2.MotionFrame]:
        t0 = time.monotonic()
        for i, f in enumerate(frames):
            if realtime:
                await asyncio.sleep(max(0.0, t0 + i / fps - time.monotonic()))
            yield motion_frame(session_id, f)

    async with open_channel(endpoint, input_auth(input_token, auth)) as ch:
        return await live_input_pb2_grpc.LiveInputServiceStub(ch).PushMotion(gen())


def performer_motion(seconds: float, fps: int, seed: int = 3) -> np.ndarray:
    """A synthetic motion-capture take, as a face tracker gives it: a talking jaw and
    mouth, blinks, head turns ([n, FACE_MOTION_DIM], `avatarfarm.face_motion`)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * fps)
    t = np.arange(n) / fps
    out = np.zeros((n, FACE_MOTION_DIM), np.float32)
    syllables = np.clip(np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 6)), 0, None)
    phrases = (np.sin(2 * np.pi * 0.2 * t) > -0.3).astype(np.float32)
    out[:, INDEX["jawOpen"]] = 0.8 * syllables * phrases
    wide = 0.3 * np.clip(np.sin(2 * np.pi * 1.1 * t), 0, None) * phrases
    out[:, INDEX["mouthStretchLeft"]] = out[:, INDEX["mouthStretchRight"]] = wide
    blink = np.zeros(n, np.float32)
    for b in np.cumsum(rng.uniform(2.0, 5.0, size=int(seconds / 2) + 2)):
        blink = np.maximum(blink, np.clip(1 - np.abs(t - b) / 0.08, 0, 1))
    out[:, INDEX["eyeBlinkLeft"]] = out[:, INDEX["eyeBlinkRight"]] = blink
    out[:, HEAD] = 15.0 * np.sin(2 * np.pi * 0.13 * t)  # yaw, degrees
    out[:, HEAD + 1] = 4.0 * np.sin(2 * np.pi * 0.31 * t)  # pitch
    out[:, HEAD + 2] = 4.0 * np.sin(2 * np.pi * 0.07 * t)  # roll
    return out
