"""LiveInputService: live audio and motion-capture inputs, pushed straight to
the worker that renders the room (the data plane never goes through the
scheduler).

Client streams are back-pressured by the room's bounded buffers
(``workers.drivers``): a handler awaits room in the buffer before it reads the
next message, so a client faster than real time is held by gRPC flow control,
and the worker never holds more than the buffer's capacity plus what the
transport has in flight. When the room ends its buffers close, and a stream
still pushing is answered with what was accepted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np

from avatarfarm.domain import DriveMode, InvalidRequest, validate_id
from avatarfarm.v1 import live_input_pb2, live_input_pb2_grpc
from workers.audio import SAMPLE_RATE, pcm16_to_float, resample
from workers.drivers import InputClosed
from workers.motion import MOTION_DIM
from workers.room import Room

MAX_CHUNK_SECONDS = 1.0
# Options for the server that serves live inputs. HTTP/2 flow control is what holds a
# client back while its room's buffer is full, and with BDP probing gRPC grows a
# stream's window to megabytes on a fast link, all of it held by the worker. The fixed
# 64 KB window still carries 16 kHz audio twenty times faster than real time over a
# 100 ms round trip.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.http2.bdp_probe", 0),)
# Voice rooms are driven by audio; mocap rooms may carry the performer's audio too.
_AUDIO_MODES = frozenset({DriveMode.VOICE, DriveMode.MOCAP})
_MOTION_MODES = frozenset({DriveMode.MOCAP})


def _close_inputs(room: Room) -> None:
    room.audio_in.close()
    room.motion_in.close()


class LiveInputService(live_input_pb2_grpc.LiveInputServiceServicer):
    def __init__(self, rooms: Callable[[str], Room | None]) -> None:
        self._rooms = rooms

    async def _room(self, session_id: str, context: grpc.aio.ServicerContext,
                    accepts: frozenset[DriveMode], why_not: str) -> Room:
        """The room this stream feeds, if it renders here and takes this input."""
        try:
            validate_id("session_id", session_id)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{e} (the first message of a stream names the session)")
        room = self._rooms(session_id)
        if room is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"session {session_id!r} is not rendering on this worker")
        assert room is not None
        if room.spec.drive_mode not in accepts:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"session {session_id} is {room.spec.drive_mode.value}-driven; {why_not}")
        if room.task is not None:
            # A producer waiting for room in a buffer the room no longer reads would wait
            # until its client gives up: the room's end releases it.
            room.task.add_done_callback(lambda _: _close_inputs(room))
        return room

    async def PushAudio(self, request_iterator: AsyncIterator[live_input_pb2.AudioChunk],
                        context: grpc.aio.ServicerContext) -> live_input_pb2.PushSummary:
        room: Room | None = None
        accepted = 0
        try:
            async for chunk in request_iterator:
                if room is None:
                    room = await self._room(chunk.session_id, context, _AUDIO_MODES,
                                            "send script segments instead of audio")
                    room.audio_in.attach()
                elif chunk.session_id and chunk.session_id != room.session_id:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "one PushAudio stream carries one session")
                rate = chunk.sample_rate or SAMPLE_RATE
                if not 8000 <= rate <= 48000:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"sample_rate {rate} is outside 8000..48000")
                if len(chunk.pcm_s16le) % 2 or len(chunk.pcm_s16le) > 2 * rate * MAX_CHUNK_SECONDS:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "pcm_s16le must be whole 16-bit samples, at most 1 s a chunk")
                samples = resample(pcm16_to_float(chunk.pcm_s16le), rate, SAMPLE_RATE)
                await room.audio_in.push(samples)
                accepted += 1
        except InputClosed:
            pass  # the room ended: the answer says how much of the stream it took
        finally:
            if room is not None:
                room.audio_in.producer_closed()
        return live_input_pb2.PushSummary(accepted=accepted)

    async def PushMotion(self, request_iterator: AsyncIterator[live_input_pb2.MotionFrame],
                         context: grpc.aio.ServicerContext) -> live_input_pb2.PushSummary:
        room: Room | None = None
        accepted = 0
        try:
            async for frame in request_iterator:
                if room is None:
                    room = await self._room(frame.session_id, context, _MOTION_MODES,
                                            "motion frames are only for mocap rooms")
                    room.motion_in.attach()
                elif frame.session_id and frame.session_id != room.session_id:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "one PushMotion stream carries one session")
                coefs = np.asarray(frame.coefficients, np.float32)
                if coefs.shape != (MOTION_DIM,) or not np.all(np.isfinite(coefs)):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"a motion frame has {MOTION_DIM} finite coefficients")
                await room.motion_in.push(coefs)
                accepted += 1
        except InputClosed:
            pass  # the room ended: the answer says how much of the stream it took
        finally:
            if room is not None:
                room.motion_in.producer_closed()
        return live_input_pb2.PushSummary(accepted=accepted)
