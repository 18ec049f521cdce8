"""The worker's RTMP ingest with a real publisher (FFmpeg's RTMP client, as OBS and
ffmpeg publish): the room's stream key is taken and its camera and microphone come out
decoded, in order, with the mouth and the tone where the driver put them; a wrong key
and a second publisher are refused before any media is taken; bytes that are not RTMP
close only their own connection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from collections.abc import AsyncIterator

import numpy as np
import pytest

from tests.driver_publisher import MOUTH, mouth_open
from tests.workers.ingest.received import KEY, Received
from workers.ingest.feed import DriverCallbacks
from workers.ingest.registry import DriverRooms
from workers.ingest.rtmp import Publisher, RtmpIngest


async def publish(port: int, key: str, seconds: float = 2.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.driver_publisher", f"rtmp://127.0.0.1:{port}/live/{key}",
        "--seconds", str(seconds), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@contextlib.asynccontextmanager
async def serving(got: Received) -> AsyncIterator[tuple[DriverRooms, int]]:
    """An ingest on a free loopback port whose one room (KEY) feeds ``got``."""
    rooms = DriverRooms()
    rooms.open(KEY, got.feed)
    ingest = RtmpIngest(rooms.authorize, "127.0.0.1")
    port = await ingest.start()
    try:
        yield rooms, port
    finally:
        await ingest.close()


def test_the_rooms_driver_is_taken_and_decoded_in_order() -> None:
    async def body() -> Received:
        got = Received()
        async with serving(got) as (rooms, port):
            code, out = await publish(port, KEY)
            assert code == 0, out
            await asyncio.wait_for(got.ended.wait(), 20)
            assert not rooms.driven(KEY)  # the driver left: the room takes one again
        return got

    got = asyncio.run(body())
    assert got.reasons == ["the publisher stopped"]
    # Who published, for the room's audit record: FFmpeg's RTMP client says what it is.
    (who,) = got.publishers
    assert who.address.startswith("127.0.0.1:") and "Lavf" in who.software
    frames = got.frames
    assert len(frames) == 50 and all(f.rgb.shape == (256, 256, 3) for f in frames)
    assert all(b.t > a.t for a, b in itertools.pairwise(frames))
    assert all(b.received >= a.received for a, b in itertools.pairwise(frames))
    # The driver's mouth, open where they opened it.
    x, y = MOUTH
    dark = np.array([255 - f.rgb[y - 5:y + 5, x - 10:x + 10].mean() for f in frames])
    opened = np.array([mouth_open(i) for i in range(len(frames))])
    assert dark[opened].mean() > dark[~opened].mean() + 40
    # And their sound: 2 s at 16 kHz, the tone while the mouth is open.
    audio = np.concatenate(got.audio)
    assert abs(audio.size - 32_000) < 2_000
    per = 640
    rms = np.array([np.sqrt(np.mean(audio[i * per:(i + 1) * per] ** 2)) for i in range(40)])
    # (AAC's priming delay moves the sound by a fraction of a frame: an edge frame each side.)
    assert rms[opened[:40]].mean() > 0.1 and np.median(rms[~opened[:40]]) < 0.02


def test_a_wrong_key_and_a_second_publisher_are_refused_before_any_media() -> None:
    async def body() -> None:
        first = Received()
        made: list[int] = []
        rooms = DriverRooms()

        def sink(publisher: Publisher) -> DriverCallbacks:
            made.append(1)
            return first.feed(publisher)

        rooms.open(KEY, sink)
        ingest = RtmpIngest(rooms.authorize, "127.0.0.1")
        port = await ingest.start()
        try:
            code, out = await publish(port, "not-the-key-at-all-0000")
            assert code == 3 and "refused" in out and made == []
            driving = await asyncio.create_subprocess_exec(  # publishes until stopped
                sys.executable, "-m", "tests.driver_publisher", f"rtmp://127.0.0.1:{port}/live/{KEY}",
                "--seconds", "120", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            try:
                await asyncio.wait_for(first.driving.wait(), 30)  # the first driver is on
                code, out = await publish(port, KEY, seconds=0.5)
                assert code == 3 and "refused" in out and made == [1]
                assert not first.ended.is_set()  # and the first drives on
            finally:
                driving.kill()
                await driving.wait()
        finally:
            await ingest.close()

    asyncio.run(body())


def test_a_room_that_ends_disconnects_its_driver() -> None:
    async def body() -> None:
        got = Received()
        async with serving(got) as (rooms, port):
            driver = await asyncio.create_subprocess_exec(  # would publish for two minutes
                sys.executable, "-m", "tests.driver_publisher", f"rtmp://127.0.0.1:{port}/live/{KEY}",
                "--seconds", "120", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            try:
                await asyncio.wait_for(got.driving.wait(), 30)
                rooms.close(KEY)  # the room ended
                out, _ = await asyncio.wait_for(driver.communicate(), 30)
                assert driver.returncode == 3, out  # the publisher was cut off
                await asyncio.wait_for(got.ended.wait(), 20)
                assert got.reasons == ["the room has ended"] and not rooms.driven(KEY)
            finally:
                if driver.returncode is None:
                    driver.kill()
                    await driver.wait()

    asyncio.run(body())


@pytest.mark.parametrize("garbage", [
    b"\x06" + bytes(1536),  # not RTMP 3
    b"\x03" + bytes(1536) + bytes(1536) + b"\x02" + bytes(3) + b"\xff" * 3 + b"\x09" + bytes(4),  # 16 MB
    b"\x03" + bytes(1536) + bytes(1536) + b"\x43" + bytes(7),  # a chunk stream without a header
])
def test_bytes_that_are_not_a_publisher_close_only_their_connection(garbage: bytes) -> None:
    async def body() -> None:
        async with serving(Received()) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(garbage)
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(), 10)  # the server closes it
            assert len(rest) <= 1 + 2 * 1536
            writer.close()
            code, out = await publish(port, KEY, seconds=0.5)  # and serves the next
            assert code == 0, out

    asyncio.run(body())


def test_a_publisher_that_goes_quiet_is_disconnected(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.ingest import rtmp

    monkeypatch.setattr(rtmp, "IDLE_SECONDS", 0.5)

    async def body() -> None:
        ingest = RtmpIngest(DriverRooms().authorize, "127.0.0.1")
        port = await ingest.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x03" + bytes(1536) + bytes(1536))  # a handshake, then nothing
            assert len(await asyncio.wait_for(reader.read(), 10)) == 1 + 2 * 1536
            writer.close()
        finally:
            await ingest.close()

    asyncio.run(body())


def test_a_credential_is_a_secret() -> None:
    with pytest.raises(ValueError, match="16 characters"):
        DriverRooms().open("room-1", lambda: None)  # type: ignore[arg-type,return-value]
