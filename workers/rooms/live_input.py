"""LiveInputService: live audio and motion-capture inputs, pushed straight to
the worker that renders the room (the data plane never goes through the
scheduler).

Client streams are back-pressured by the room's bounded buffers
(``workers.rooms.drivers``): a handler awaits room in the buffer before it reads the
next message, so a client faster than real time is held by gRPC flow control,
and the worker never holds more than the buffer's capacity plus what the
transport has in flight. When the room ends its buffers close, and a stream
still pushing is answered with what was accepted.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import grpc
import numpy as np

from avatarfarm import input_tokens
from avatarfarm.domain import DriveMode, InvalidRequest, validate_id
from avatarfarm.face_motion import ARKIT, FaceMotionError, face_motion
from avatarfarm.input_tokens import InputRefused, InputTokenExpired
from avatarfarm.v1 import live_input_pb2, live_input_pb2_grpc
from workers.media.audio import SAMPLE_RATE, pcm16_to_float, resample
from workers.media.motion import MOTION_DIM, face_from_reference
from workers.rooms.drivers import InputClosed, LiveAudio, LiveMotion
from workers.rooms.room import Room

MAX_CHUNK_SECONDS = 1.0
MAX_BLENDSHAPES = len(ARKIT) + 8  # ARKit's, MediaPipe's extra, room for a few unknowns to refuse
# Options for the server that serves live inputs. HTTP/2 flow control is what holds a
# client back while its room's buffer is full, and with BDP probing gRPC grows a
# stream's window to megabytes on a fast link, all of it held by the worker. The fixed
# 64 KB window still carries 16 kHz audio twenty times faster than real time over a
# 100 ms round trip.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.http2.bdp_probe", 0),)


def _audio_samples(chunk: live_input_pb2.AudioChunk) -> np.ndarray:
    rate = chunk.sample_rate or SAMPLE_RATE
    if not 8000 <= rate <= 48000:
        raise InvalidRequest(f"sample_rate {rate} is outside 8000..48000")
    if len(chunk.pcm_s16le) % 2 or len(chunk.pcm_s16le) > 2 * rate * MAX_CHUNK_SECONDS:
        raise InvalidRequest("pcm_s16le must be whole 16-bit samples, at most 1 s a chunk")
    return resample(pcm16_to_float(chunk.pcm_s16le), rate, SAMPLE_RATE)


def _face_motion(frame: live_input_pb2.MotionFrame) -> np.ndarray:
    """A motion frame's face motion vector: its blendshapes and head rotation, or an
    older client's eight coefficients (`face_from_reference`)."""
    if frame.coefficients:
        if frame.blendshapes or frame.HasField("head"):
            raise InvalidRequest("a motion frame has blendshapes and a head rotation, or the "
                                 "older coefficients, not both")
        coefs = np.asarray(frame.coefficients, np.float32)
        if coefs.shape != (MOTION_DIM,) or not np.all(np.isfinite(coefs)):
            raise InvalidRequest(f"a motion frame's coefficients are {MOTION_DIM} finite numbers")
        return face_from_reference(coefs)
    if len(frame.blendshapes) > MAX_BLENDSHAPES:
        raise InvalidRequest(f"a motion frame names at most {MAX_BLENDSHAPES} blendshapes")
    head = frame.head
    try:
        return face_motion(frame.blendshapes, head.yaw_degrees, head.pitch_degrees, head.roll_degrees)
    except FaceMotionError as e:
        raise InvalidRequest(str(e)) from None


class _Message(Protocol):
    """What every live input message has: the session it feeds (the first names it)."""

    @property
    def session_id(self) -> str: ...


Message = TypeVar("Message", bound=_Message)


@dataclass(frozen=True, slots=True)
class _LiveInput(Generic[Message]):
    """One kind of live input: the rooms that take it, its buffer in a room, and how a
    message becomes what the buffer holds (raising InvalidRequest)."""

    method: str  # the RPC, named in errors
    modes: frozenset[DriveMode]
    refused: str  # what a room of another drive mode takes instead
    buffer: Callable[[Room], LiveAudio | LiveMotion]
    decode: Callable[[Message], np.ndarray]


# Voice rooms are driven by audio; mocap rooms may carry the performer's audio too.
_AUDIO: _LiveInput[live_input_pb2.AudioChunk] = _LiveInput(
    "PushAudio", frozenset({DriveMode.VOICE, DriveMode.MOCAP}),
    "send script segments instead of audio", lambda room: room.audio_in, _audio_samples)
_MOTION: _LiveInput[live_input_pb2.MotionFrame] = _LiveInput(
    "PushMotion", frozenset({DriveMode.MOCAP}),
    "motion frames are only for mocap rooms", lambda room: room.motion_in, _face_motion)


def _close_inputs(room: Room) -> None:
    room.audio_in.close()
    room.motion_in.close()


def bearer(context: grpc.aio.ServicerContext) -> str:
    """The bearer token a call carries ('' without one)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


class LiveInputService(live_input_pb2_grpc.LiveInputServiceServicer):
    """Feeds live audio and motion into rooms rendering here, to callers holding the
    room's input token (avatarfarm.input_tokens), checked with the room's own key: no
    call to the scheduler. An unknown room and a token that is not this room's get the
    same answer, so a caller learns nothing of rooms it may not feed."""

    def __init__(self, rooms: Callable[[str], Room | None],
                 clock: Callable[[], float] = time.time) -> None:
        self._rooms = rooms
        self.clock = clock

    async def _room(self, session_id: str, context: grpc.aio.ServicerContext,
                    accepts: frozenset[DriveMode], why_not: str) -> Room:
        """The room this stream feeds, if it renders here and takes this input."""
        try:
            validate_id("session_id", session_id)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{e} (the first message of a stream names the session)")
        room = self._rooms(session_id)
        try:
            if room is None:
                raise InputRefused("unknown room")
            input_tokens.verify(room.input_key, bearer(context), session_id, now=self.clock())
        except InputTokenExpired as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except InputRefused:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"session {session_id!r} is not rendering on this worker for "
                                "this input token")
        assert room is not None
        if room.spec.drive_mode not in accepts:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"session {session_id} is {room.spec.drive_mode.value}-driven; {why_not}")
        if room.task is not None:
            # A producer waiting for room in a buffer the room no longer reads would wait
            # until its client gives up: the room's end releases it.
            room.task.add_done_callback(lambda _: _close_inputs(room))
        return room

    async def _push(self, kind: _LiveInput[Message], messages: AsyncIterator[Message],
                    context: grpc.aio.ServicerContext) -> live_input_pb2.PushSummary:
        """Feeds one client stream into its room's buffer; the answer says how many
        messages the room accepted."""
        room: Room | None = None
        accepted = 0
        try:
            async for msg in messages:
                if room is None:
                    room = await self._room(msg.session_id, context, kind.modes, kind.refused)
                    kind.buffer(room).attach()
                elif msg.session_id and msg.session_id != room.session_id:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"one {kind.method} stream carries one session")
                try:
                    item = kind.decode(msg)
                except InvalidRequest as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                await kind.buffer(room).push(item)
                accepted += 1
        except InputClosed:
            pass  # the room ended: the answer says how much of the stream it took
        finally:
            if room is not None:
                kind.buffer(room).producer_closed()
        return live_input_pb2.PushSummary(accepted=accepted)

    async def PushAudio(self, request_iterator: AsyncIterator[live_input_pb2.AudioChunk],
                        context: grpc.aio.ServicerContext) -> live_input_pb2.PushSummary:
        return await self._push(_AUDIO, request_iterator, context)

    async def PushMotion(self, request_iterator: AsyncIterator[live_input_pb2.MotionFrame],
                         context: grpc.aio.ServicerContext) -> live_input_pb2.PushSummary:
        return await self._push(_MOTION, request_iterator, context)
