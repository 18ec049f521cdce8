"""Live inputs are bounded: a client pushing faster than real time is held back
(its stream waits) and the room never buffers more than its capacity, in the
buffers themselves (with an injected consumer) and through LiveInputService on a
real gRPC server feeding a real room. Wrong and hostile inputs get precise
statuses."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avatarfarm.domain import DriveMode, OutputKind, Quality
from avatarfarm.face_motion import FACE_MOTION_DIM
from avatarfarm.input_tokens import mint, room_key
from avatarfarm.v1 import live_input_pb2, live_input_pb2_grpc
from tests.builders import make_spec
from workers.device.pipeline import Pipeline
from workers.media.audio import SAMPLE_RATE
from workers.media.motion import MOTION_DIM
from workers.output.targets import OutputTarget
from workers.rooms.drivers import InputClosed, LiveAudio, LiveMotion
from workers.rooms.live_input import SERVER_OPTIONS, LiveInputService
from workers.rooms.room import Pacing, Room, RoomState

# -- the buffers, with an injected consumer -------------------------------------------------


async def produce(buf: LiveAudio, chunks: list[int], seen: list[tuple[int, int, int]]) -> None:
    """Pushes chunks as fast as the buffer lets it, noting after each what was accepted,
    what the consumer had taken and what was buffered. The caller attaches it."""
    accepted = 0
    try:
        for n in chunks:
            await buf.push(np.ones(n, np.float32))
            accepted += n
            seen.append((accepted, buf.taken_samples, buf.buffered))
    finally:
        buf.producer_closed()


async def consume(buf: LiveAudio, k: int) -> None:
    """Takes one frame's audio whenever that much is buffered, or all there is while the
    buffer is full (event-driven, as a room rendering as fast as it can)."""
    while True:
        await buf.wait_for(k)
        if buf.buffered == 0 and buf.producers == 0:
            return
        buf.take(k)


@given(capacity=st.integers(1, 4000),
       chunks=st.lists(st.integers(0, 4000), min_size=1, max_size=60),
       frame=st.integers(1, 1500))
@settings(max_examples=200, deadline=None)
def test_live_audio_never_holds_more_than_its_capacity(capacity: int, chunks: list[int], frame: int) -> None:
    chunks = [min(n, capacity) for n in chunks]  # the service caps a chunk at 1 s; the buffer at 10 s

    async def body() -> list[tuple[int, int, int]]:
        buf = LiveAudio(max_seconds=capacity / SAMPLE_RATE)
        assert buf.capacity == capacity
        seen: list[tuple[int, int, int]] = []
        buf.attach()  # before the consumer starts, which stops once no producer is left
        consumer = asyncio.create_task(consume(buf, frame))
        await asyncio.wait_for(produce(buf, chunks, seen), 30)
        await asyncio.wait_for(consumer, 30)
        return seen

    seen = asyncio.run(body())
    for accepted, taken, buffered in seen:
        assert buffered <= capacity
        # What a client got accepted is what the room consumed plus at most the capacity:
        # a faster client is held back, not buffered.
        assert accepted == taken + buffered
        assert accepted <= taken + capacity


def test_a_chunk_larger_than_the_capacity_waits_for_an_empty_buffer() -> None:
    async def body() -> None:
        buf = LiveAudio(max_seconds=0.1)  # 1600 samples
        await buf.push(np.ones(100, np.float32))
        big = asyncio.create_task(buf.push(np.ones(5000, np.float32)))
        await asyncio.sleep(0)  # one turn of the loop: the push had its chance to run
        assert not big.done() and buf.buffered == 100
        buf.take(100)
        await asyncio.wait_for(big, 5)
        assert buf.buffered == 5000

    asyncio.run(body())


def test_closing_releases_waiting_producers_and_consumers() -> None:
    async def body() -> None:
        audio = LiveAudio(max_seconds=0.01)
        await audio.push(np.ones(160, np.float32))
        blocked = asyncio.create_task(audio.push(np.ones(160, np.float32)))
        await asyncio.sleep(0)  # one turn of the loop: the push ran up to its wait
        assert not blocked.done()
        # A consumer wanting more than fits is not kept waiting by the waiting producer.
        audio.attach()
        await asyncio.wait_for(audio.wait_for(10_000), 5)
        audio.close()
        with pytest.raises(InputClosed):
            await asyncio.wait_for(blocked, 5)
        with pytest.raises(InputClosed):
            await audio.push(np.ones(1, np.float32))
        idle = LiveAudio()
        idle.attach()
        waiting = asyncio.create_task(idle.wait_for(640))
        await asyncio.sleep(0)
        assert not waiting.done()
        idle.close()
        await asyncio.wait_for(waiting, 5)

        motion = LiveMotion(max_frames=2)
        pose = np.zeros(FACE_MOTION_DIM, np.float32)
        await motion.push(pose)
        await motion.push(pose)
        assert motion.buffered == motion.capacity == 2
        held = asyncio.create_task(motion.push(pose))
        await asyncio.sleep(0)
        assert not held.done()
        motion.take()
        await asyncio.wait_for(held, 5)
        assert motion.buffered == 2
        blocked_motion = asyncio.create_task(motion.push(pose))
        await asyncio.sleep(0)
        motion.close()
        with pytest.raises(InputClosed):
            await asyncio.wait_for(blocked_motion, 5)

    asyncio.run(body())


# -- through the service, into real rooms -------------------------------------------------

def make_room(pipeline: Pipeline, tmp_path: Path, sid: str, drive: DriveMode, *, seconds: float = 2.0,
              pacing: Pacing = Pacing.REALTIME) -> Room:
    spec = replace(make_spec(sid, quality=Quality(256, 256, 25), seconds=seconds), drive_mode=drive)
    target = OutputTarget.resolve(OutputKind.FILE, f"{sid}.mp4", tmp_path)
    return Room(sid, spec, target, pipeline, pacing=pacing, input_key=room_key(SECRET, sid))


SECRET = b"the scheduler's live-input secret"


def token_of(sid: str, *, ttl: float = 600, now: float | None = None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying room `sid`'s input token, as its tenant gets it."""
    t = mint(room_key(SECRET, sid), sid, "vendor", ttl=ttl, now=time.time() if now is None else now)
    return (("authorization", f"Bearer {t.token}"),)


class Fed:
    """The stub, each call with the input token of the room its first message names."""

    def __init__(self, stub: live_input_pb2_grpc.LiveInputServiceStub) -> None:
        self.stub = stub

    def PushAudio(self, msgs: Any) -> Any:
        msgs = list(msgs)
        return self.stub.PushAudio(iter(msgs), metadata=self._token(msgs))

    def PushMotion(self, msgs: Any) -> Any:
        msgs = list(msgs)
        return self.stub.PushMotion(iter(msgs), metadata=self._token(msgs))

    @staticmethod
    def _token(msgs: list[Any]) -> Any:
        # No room has an id past 128 characters, so no token names one.
        return token_of(msgs[0].session_id) if msgs and len(msgs[0].session_id) <= 128 else ()


@contextlib.asynccontextmanager
async def live_input(rooms: dict[str, Room]) -> AsyncIterator[live_input_pb2_grpc.LiveInputServiceStub]:
    server = grpc.aio.server(options=list(SERVER_OPTIONS))  # as the worker serves it
    live_input_pb2_grpc.add_LiveInputServiceServicer_to_server(LiveInputService(rooms.get), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield live_input_pb2_grpc.LiveInputServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(0.1)


def test_a_client_faster_than_real_time_is_held_back(pipeline: Pipeline, tmp_path: Path) -> None:
    room = make_room(pipeline, tmp_path, "voice", DriveMode.VOICE, seconds=2.0)
    room.audio_in = LiveAudio(max_seconds=1.0)  # a small bound, so the test needs little time
    chunk = SAMPLE_RATE // 10  # 0.1 s
    samples: list[int] = []  # buffered audio each time the client sends another chunk
    sent = 0

    async def flood() -> AsyncIterator[live_input_pb2.AudioChunk]:
        nonlocal sent
        pcm = np.full(chunk, 1000, "<i2").tobytes()
        while True:  # as fast as the stream takes them, for ever
            samples.append(room.audio_in.buffered)
            sent += 1
            yield live_input_pb2.AudioChunk(session_id="voice", sample_rate=SAMPLE_RATE, pcm_s16le=pcm)

    async def body() -> live_input_pb2.PushSummary:
        async with live_input({"voice": room}) as stub:
            task = room.start()
            # The room ends after 2 s of stream; its end answers the stream still pushing.
            summary = await asyncio.wait_for(stub.PushAudio(flood(), metadata=token_of("voice")), 60)
            await asyncio.wait_for(task, 30)
            return summary

    summary = asyncio.run(body())
    assert room.state is RoomState.ENDED, room.reason
    assert room.stats.stream_seconds == pytest.approx(2.0)
    cap = room.audio_in.capacity
    assert max(samples) <= cap
    accepted = summary.accepted * chunk
    # Everything accepted was consumed or is still buffered, within the bound ...
    assert accepted == room.audio_in.taken_samples + room.audio_in.buffered
    # ... so by the time 2 s were rendered, at most 2 s + the 1 s bound were accepted,
    # and the room was fed all the way (the client was faster than real time).
    assert room.audio_in.taken_samples <= 2.0 * SAMPLE_RATE
    assert accepted <= 2.0 * SAMPLE_RATE + cap
    assert accepted >= 1.5 * SAMPLE_RATE + cap
    # The stream itself was slowed: what the client got to send beyond what was accepted
    # is what one HTTP/2 window holds (64 KB: 20 chunks), not seconds of audio per second.
    assert sent <= summary.accepted + 40, (sent, summary.accepted)


def _one(msg: Any) -> Iterator[Any]:
    yield msg


def test_wrong_and_hostile_live_inputs_get_precise_statuses(pipeline: Pipeline, tmp_path: Path) -> None:
    rooms = {sid: make_room(pipeline, tmp_path, sid, drive)
             for sid, drive in (("text", DriveMode.TEXT), ("voice", DriveMode.VOICE),
                                ("mocap", DriveMode.MOCAP))}
    ok_pcm = b"\0\0" * 160
    pose = [0.0] * MOTION_DIM

    def audio(sid: str, rate: int = SAMPLE_RATE, pcm: bytes = ok_pcm) -> live_input_pb2.AudioChunk:
        return live_input_pb2.AudioChunk(session_id=sid, sample_rate=rate, pcm_s16le=pcm)

    def motion(sid: str, coefs: list[float] = pose) -> live_input_pb2.MotionFrame:
        return live_input_pb2.MotionFrame(session_id=sid, coefficients=coefs)

    def face(sid: str, shapes: dict[str, float] | None = None, yaw: float = 0.0) -> live_input_pb2.MotionFrame:
        return live_input_pb2.MotionFrame(session_id=sid, blendshapes=shapes or {"jawOpen": 0.5},
                                          head=live_input_pb2.HeadRotation(yaw_degrees=yaw))

    async def body() -> None:
        async with live_input(rooms) as raw:
            stub = Fed(raw)
            cases: list[tuple[grpc.StatusCode, Any]] = [
                # Live audio into a text room, motion into a voice room.
                (grpc.StatusCode.FAILED_PRECONDITION, lambda: stub.PushAudio(_one(audio("text")))),
                (grpc.StatusCode.FAILED_PRECONDITION, lambda: stub.PushMotion(_one(motion("text")))),
                (grpc.StatusCode.FAILED_PRECONDITION, lambda: stub.PushMotion(_one(motion("voice")))),
                (grpc.StatusCode.NOT_FOUND, lambda: stub.PushAudio(_one(audio("nope")))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushAudio(_one(audio("")))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushAudio(_one(audio("x" * 10_000)))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushAudio(_one(audio("voice\x00")))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushMotion(_one(motion("mo\ncap")))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushAudio(_one(audio("voice", rate=2**32 - 1)))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushAudio(_one(audio("voice", rate=7999)))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushAudio(_one(audio("voice", pcm=b"\0")))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushAudio(_one(
                    audio("voice", pcm=b"\0\0" * (SAMPLE_RATE + 1))))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushAudio(iter(
                    [audio("voice"), audio("mocap")]))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushMotion(iter(
                    [motion("mocap"), motion("other")]))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushMotion(_one(motion("mocap", [0.0] * 7)))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushMotion(_one(
                    motion("mocap", [float("inf"), *pose[1:]])))),
                # Face motion: names trackers never send, values that are no numbers, both
                # kinds of frame at once, a head no tracker follows, a flood of names.
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushMotion(_one(face("mocap", {"jaw": 1.0})))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushMotion(_one(
                    face("mocap", {"jawOpen": float("nan")})))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushMotion(_one(
                    live_input_pb2.MotionFrame(session_id="mocap", coefficients=pose,
                                               blendshapes={"jawOpen": 1.0})))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushMotion(_one(face("mocap", yaw=1e9)))),
                (grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.PushMotion(_one(
                    face("mocap", {f"x{i}": 0.0 for i in range(5000)})))),
            ]
            for code, call in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call()
                assert err.value.code() == code, (code, err.value.details())
                assert len(err.value.details() or "") < 400  # never echoes a huge input back
            # A well-formed push is accepted: sample_rate 0 means the pipeline's rate, and
            # later chunks need not repeat the session.
            ok = await stub.PushAudio(iter([audio("voice", rate=0), audio("")]))
            assert ok.accepted == 2
            assert (await stub.PushMotion(_one(motion("mocap")))).accepted == 1
            assert (await stub.PushMotion(iter([face("mocap"), face("", {"eyeBlinkLeft": 1.0}, 20.0)]))
                    ).accepted == 2
            assert (await stub.PushAudio(iter([]))).accepted == 0

    asyncio.run(body())


def test_only_the_rooms_own_unexpired_token_opens_its_inputs(pipeline: Pipeline, tmp_path: Path) -> None:
    rooms = {sid: make_room(pipeline, tmp_path, sid, DriveMode.VOICE) for sid in ("voice", "other")}
    chunk = live_input_pb2.AudioChunk(session_id="voice", sample_rate=SAMPLE_RATE, pcm_s16le=b"\0\0" * 160)
    forged = mint(room_key(b"not the scheduler's secret, 32+ bytes", "voice"), "voice", "vendor",
                  now=time.time())

    async def refusal(stub: Any, metadata: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.PushAudio(_one(chunk), metadata=metadata)
        return err.value

    async def body() -> None:
        async with live_input(rooms) as stub, live_input({}) as elsewhere:
            unknown = await refusal(elsewhere, token_of("voice"))
            assert unknown.code() == grpc.StatusCode.NOT_FOUND
            for metadata in ((), token_of("other"), (("authorization", f"Bearer {forged.token}"),),
                             (("authorization", "Bearer " + token_of("voice")[0][1][7:-1]),),
                             (("authorization", "Basic " + token_of("voice")[0][1][7:]),)):
                err = await refusal(stub, metadata)
                # Another room's token, a forged or cut one, none: the answer of a room not here.
                assert (err.code(), err.details()) == (unknown.code(), unknown.details())
            late = await refusal(stub, token_of("voice", ttl=60, now=time.time() - 120))
            assert late.code() == grpc.StatusCode.UNAUTHENTICATED and "GetSession" in (late.details() or "")
            ok = await stub.PushAudio(_one(chunk), metadata=token_of("voice"))
            assert ok.accepted == 1

    asyncio.run(body())
