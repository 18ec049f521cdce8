"""The worker's WHIP ingest, with aiortc's real WebRTC stack publishing on the other side
(as a browser or OBS's WHIP output would): the room's key opens it, the driver's camera
and microphone arrive decoded, a wrong key, a second publisher, a body that is not an
offer and an offer with no camera are refused with the status WHIP clients expect, and a
room that ends closes its driver's connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import numpy as np

from tests.driver_publisher import MOUTH, mouth_open
from tests.whip_publisher import publish
from tests.workers.ingest.received import KEY, Received
from workers.ingest.registry import DriverRooms
from workers.ingest.webrtc import WebRtcEndpoint


@contextlib.asynccontextmanager
async def serving(got: Received) -> AsyncIterator[tuple[DriverRooms, str]]:
    """A WHIP ingest on a free loopback port whose one room (KEY) feeds ``got``; its base URL."""
    rooms = DriverRooms()
    rooms.open(KEY, got.feed)
    ingest = WebRtcEndpoint(rooms, "127.0.0.1")
    port = await ingest.start()
    try:
        yield rooms, f"http://127.0.0.1:{port}/whip"
    finally:
        await ingest.close()


def test_a_driver_publishes_their_camera_and_microphone_over_webrtc() -> None:
    async def body() -> Received:
        got = Received()
        async with serving(got) as (rooms, base):
            code, _ = await publish(f"{base}/{KEY}", 3.0)
            assert code == 201
            await asyncio.wait_for(got.ended.wait(), 10)
            assert not rooms.driven(KEY)  # the driver left: the room takes one again
        return got

    got = asyncio.run(body())
    assert got.reasons == ["the publisher stopped"]
    (who,) = got.publishers
    assert who.address == "127.0.0.1" and who.software.startswith("WHIP ")
    frames = got.frames
    assert 60 <= len(frames) <= 76 and all(f.rgb.shape == (256, 256, 3) for f in frames)
    # Their times: media times (the publisher's clock), one frame apart.
    gaps = np.diff([f.t for f in frames])
    assert np.all(gaps > 0) and abs(np.median(gaps) - 0.04) < 0.002
    # Their mouth, open where they opened it (frame i of the 3 s is the driver's frame i,
    # give or take a frame or two lost).
    x, y = MOUTH
    dark = np.array([255 - f.rgb[y - 5:y + 5, x - 10:x + 10].mean() for f in frames])
    opened = dark > (dark.max() + dark.min()) / 2
    said = np.array([mouth_open(i, "live") for i in range(len(frames) + 10)])
    best = max(np.mean(opened == said[lag:lag + len(frames)]) for lag in range(0, 8))
    assert best > 0.8
    # And their sound: about 3 s at 16 kHz, the tone while their mouth is open.
    audio = np.concatenate(got.audio)
    assert 2.4 * 16_000 < audio.size < 3.2 * 16_000
    rms = np.sqrt(np.mean(audio[:(audio.size // 640) * 640].reshape(-1, 640) ** 2, axis=1))
    assert 0.2 < np.mean(rms > 0.05) < 0.8


def test_refusals_carry_the_statuses_whip_clients_expect() -> None:
    async def body() -> None:
        got = Received()
        async with serving(got) as (_, base):
            assert (await publish(base, 0.0))[0] == 401  # no key at all
            code, why = await publish(f"{base}/not-the-key-at-all-0000", 0.0)
            assert code == 403 and "no camera room" in why
            assert (await publish(base, 0.0, token="not-the-key-at-all-0000"))[0] == 403
            code, why = await publish(f"{base}/{KEY}", 0.0, video=False)
            assert code == 400 and "no video" in why
            assert (await publish(f"{base}/{KEY}", 0.0, content_type="text/plain"))[0] == 415
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{base}/{KEY}", data=b"v=0 nonsense",
                                     headers={"Content-Type": "application/sdp"}) as r:
                    assert r.status == 400
                async with http.delete(f"{base}/session/nobody") as r:
                    assert r.status == 404
            assert got.publishers == []  # nothing above took the room
            # The room's driver, by bearer token; a second publisher meanwhile is refused.
            first = asyncio.create_task(publish(base, 4.0, token=KEY))
            await asyncio.wait_for(got.driving.wait(), 20)
            code, why = await publish(f"{base}/{KEY}", 0.0)
            assert code == 409 and "already has its driver" in why
            assert not got.ended.is_set()  # and the first drives on
            assert (await first)[0] == 201

    asyncio.run(body())


def test_a_room_that_ends_closes_its_drivers_connection() -> None:
    async def body() -> None:
        got = Received()
        async with serving(got) as (rooms, base):
            driving = asyncio.create_task(publish(f"{base}/{KEY}", 30.0))
            await asyncio.wait_for(got.driving.wait(), 20)
            rooms.close(KEY)  # the room ended
            await asyncio.wait_for(got.ended.wait(), 10)
            assert got.reasons == ["the room has ended"]
            driving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await driving
            assert (await publish(f"{base}/{KEY}", 0.0))[0] == 403  # its key opens nothing now

    asyncio.run(body())
