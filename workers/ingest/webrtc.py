"""The worker's WebRTC endpoint for camera drivers: its WHIP ingest (WebRTC-HTTP
ingestion, RFC 9725), where a driver publishes from a browser, or from OBS's WHIP output,
straight to the worker; and the driver's preview of their avatar, a page a browser opens
that plays the room's frames as they are encoded (WHEP-style: the page POSTs an offer).

    POST /whip/<room key>     (or POST /whip with ``Authorization: Bearer <room key>``)
        Content-Type: application/sdp, the body an SDP offer with a video (and audio) track
        -> 201 Created, Location: /whip/session/<id>, the SDP answer
        401 no key; 403 a key that opens no camera room; 409 the room has its driver;
        415 not application/sdp; 400 an offer that cannot be answered (no video)
    DELETE /whip/session/<id>  -> 204: the driver stops publishing
    OPTIONS                    CORS preflight (a page on another origin may publish)
    GET /preview/<room key>   the preview page (``?report=1``: it measures how late the
                              frames reach it, from a clock in their top edge, and POSTs
                              that to /preview/<key>/report, which the worker logs)
    POST /whep/<room key>     an SDP offer to receive the preview (``?clock=1``: stamped)
        -> 201 Created, the answer; 403 a key that opens no camera room

The key is the room's driver key, the same the RTMP ingest takes (one publisher per room,
whichever ingest they use). aiortc receives and decodes the tracks; each video frame
goes to the room as the RTMP ingest's do (RGB, its liveness signature, computed on a
thread), the sound resampled to 16 kHz mono. WebRTC's audio and video run on RTP clocks
of their own, each starting anywhere: each track's media time is anchored on the
worker's clock at its first frame's arrival (`_Anchor`), which puts both on one clock
(within the difference of their first packets' delays) to pair a camera frame with its
sound, while frames that arrive in a burst keep the times they were captured at.

A publisher whose own face tracker gives blendshapes (MediaPipe's face landmarker in the
page, a face-tracking app) may open a data channel and send one JSON message per frame,
``{"blendshapes": {"jawOpen": 0.4, ...}, "head": {"yaw": 5, "pitch": 0, "roll": 0}}``
(`avatarfarm.face_motion.from_message`): the room is driven by those, its camera frames
still judged for liveness. A message that is not one is dropped (and logged once). A connection that fails, is closed or is deleted ends
the driver's stream; a room that ends closes its driver's connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import typing

import av
import numpy as np
from aiohttp import web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from avatarfarm.face_motion import FaceMotionError, from_message
from workers.camera.liveness import Signer
from workers.ingest.feed import DriverFrame
from workers.ingest.registry import Claim, DriverRooms
from workers.ingest.rtmp import IngestRefused, Publisher
from workers.media.audio import SAMPLE_RATE
from workers.output.preview import BLOCK, CLOCK_BITS, PreviewTrack

log = logging.getLogger(__name__)

MAX_OFFER = 64 * 1024  # bytes: an SDP offer is a few kilobytes
MAX_REPORT = 4096
CORS = {"Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, Content-Type",
        "Access-Control-Expose-Headers": "Location"}


class WebRtcEndpoint:
    """WHIP and previews on ``host:port`` (0: any free port) for the rooms ``rooms`` opens."""

    def __init__(self, rooms: DriverRooms, host: str = "0.0.0.0", port: int = 0) -> None:
        self.rooms = rooms
        self.host, self.port = host, port
        self._sessions: dict[str, _Session] = {}
        self._viewers: set[RTCPeerConnection] = set()
        self.reports: dict[str, dict[str, float]] = {}  # room key -> its preview's last report
        self.reported = asyncio.Event()  # set at each report
        app = web.Application(client_max_size=MAX_OFFER)
        app.router.add_post("/whip", self._publish)
        app.router.add_post("/whip/{key}", self._publish)
        app.router.add_delete("/whip/session/{id}", self._delete)
        app.router.add_route("OPTIONS", "/whip", self._options)
        app.router.add_route("OPTIONS", "/whip/{tail:.*}", self._options)
        app.router.add_get("/preview/{key}", self._page)
        app.router.add_post("/preview/{key}/report", self._report)
        app.router.add_post("/whep/{key}", self._watch)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = typing.cast(typing.Any, site._server)  # aiohttp keeps the bound socket there
        self.port = server.sockets[0].getsockname()[1]
        log.info("WHIP ingest for camera drivers on %s:%d", self.host, self.port)
        return self.port

    async def close(self) -> None:
        for s in list(self._sessions.values()):
            await s.end("the worker is stopping")
        for pc in list(self._viewers):
            await pc.close()
        await self._runner.cleanup()

    # -- HTTP

    async def _options(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=CORS)

    async def _publish(self, request: web.Request) -> web.Response:
        key = request.match_info.get("key", "")
        if not key:
            auth = request.headers.get("Authorization", "")
            key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not key:
            return _error(401, "no room key: POST /whip/<key>, or Authorization: Bearer <key>")
        if request.content_type != "application/sdp":
            return _error(415, "the body must be an SDP offer (Content-Type: application/sdp)")
        try:
            offer = await request.text()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"an SDP offer is at most {MAX_OFFER} bytes")
        peer = request.remote or "unknown"
        publisher = Publisher(f"{peer}", "WHIP " + "".join(
            c for c in request.headers.get("User-Agent", "")[:64] if c.isprintable()))
        try:
            self.rooms.check(key)  # refused before any WebRTC work
        except IngestRefused as e:
            return _refused(peer, e)
        session = _Session(secrets.token_urlsafe(16), self._sessions)
        try:
            answer = await session.answer(offer)
            # The room is claimed once the offer is answered (the media flows after): a
            # second publisher who raced this one is refused here.
            session.claimed(self.rooms.claim(key, publisher))
        except _BadOffer as e:
            await session.end(str(e))
            return _error(400, str(e))
        except IngestRefused as e:
            await session.end(str(e))
            return _refused(peer, e)
        log.info("WHIP ingest: publisher from %s started", publisher)
        return web.Response(status=201, body=answer.encode(), content_type="application/sdp",
                            headers={**CORS, "Location": f"/whip/session/{session.id}"})

    async def _delete(self, request: web.Request) -> web.Response:
        session = self._sessions.get(request.match_info["id"])
        if session is None:
            return _error(404, "no such WHIP session")
        await session.end("the publisher stopped")
        return web.Response(status=204, headers=CORS)


    # -- the driver's preview

    async def _page(self, request: web.Request) -> web.Response:
        if self.rooms.preview(request.match_info["key"]) is None:
            return _error(403, "no camera room takes this key")
        return web.Response(text=PREVIEW_PAGE, content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def _watch(self, request: web.Request) -> web.Response:
        tap = self.rooms.preview(request.match_info["key"])
        if tap is None:
            return _error(403, "no camera room takes this key")
        if request.content_type != "application/sdp":
            return _error(415, "the body must be an SDP offer (Content-Type: application/sdp)")
        pc = RTCPeerConnection()
        self._viewers.add(pc)
        track = PreviewTrack(tap, clock=request.query.get("clock") == "1")

        async def gone() -> None:
            if pc.connectionState in ("failed", "closed"):
                track.stop()
                self._viewers.discard(pc)
                await pc.close()

        pc.on("connectionstatechange", gone)
        try:
            pc.addTrack(track)
            await pc.setRemoteDescription(RTCSessionDescription(await request.text(), "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # aiortc raises ValueError and its own errors for bad SDP  # noqa: BLE001
            track.stop()
            self._viewers.discard(pc)
            await pc.close()
            return _error(400, f"the offer could not be answered: {e}")
        return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                            headers=CORS)

    async def _report(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if self.rooms.preview(key) is None:
            return _error(403, "no camera room takes this key")
        try:
            body = await request.content.read(MAX_REPORT + 1)
            if len(body) > MAX_REPORT:
                raise ValueError("too long")
            got = json.loads(body)
            report = {k: float(got[k]) for k in ("frames", "width", "height", "latency_ms")}
        except (ValueError, TypeError, KeyError):
            return _error(400, "a report is JSON: frames, width, height, latency_ms")
        self.reports[key] = report
        self.reported.set()
        log.info("driver preview: %d frames of %dx%d, %.0f ms from encoded to shown", report["frames"],
                 report["width"], report["height"], report["latency_ms"])
        return web.Response(status=204)


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=CORS)


def _refused(peer: str, e: IngestRefused) -> web.Response:
    log.info("WHIP ingest: refused a publisher from %s: %s", peer, e)
    return _error(409 if "already" in str(e) else 403, str(e))


class _BadOffer(Exception):
    pass


class _Anchor:
    """One track's media times on the worker's clock: its first frame's arrival plus the
    media time elapsed since that frame."""

    def __init__(self) -> None:
        self._first: tuple[float, float] | None = None  # (arrival, media time) of the first frame

    def time(self, media: float | None, arrival: float) -> float:
        if media is None:
            return arrival
        if self._first is None:
            self._first = (arrival, media)
        return self._first[0] + media - self._first[1]


class _Session:
    """One publisher's WebRTC connection, feeding the room it claimed."""

    def __init__(self, id_: str, sessions: dict[str, _Session]) -> None:
        self.id, self._sessions = id_, sessions
        self.claim: Claim | None = None  # the room, once the offer is answered
        self.pc = RTCPeerConnection()
        self._tasks: list[asyncio.Task[None]] = []
        self._t0 = time.monotonic()  # the stream's time 0: the worker's clock at the offer
        self._ended = False
        sessions[id_] = self
        self.pc.on("track", self._track)
        self.pc.on("datachannel", lambda channel: channel.on("message", self._message))
        self._bad_messages = 0
        self.pc.on("connectionstatechange", self._state)

    def claimed(self, claim: Claim) -> None:
        self.claim = claim
        claim.on_unwanted(lambda: self._spawn(self.end("the room has ended")))

    def _spawn(self, coro: typing.Coroutine[typing.Any, typing.Any, None]) -> None:
        self._tasks.append(asyncio.ensure_future(coro))

    async def answer(self, offer: str) -> str:
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        except Exception as e:  # aiortc raises ValueError and its own errors for bad SDP  # noqa: BLE001
            raise _BadOffer(f"the offer could not be read: {e}") from None
        kinds = {t.kind for t in self.pc.getTransceivers()}
        if "video" not in kinds:
            raise _BadOffer("the offer has no video track: a camera driver sends their camera")
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return str(self.pc.localDescription.sdp)

    def _message(self, data: str | bytes) -> None:
        """A face motion message from the driver's own tracker."""
        try:
            face = from_message(data)
        except FaceMotionError as e:
            self._bad_messages += 1
            if self._bad_messages == 1:
                log.info("WHIP ingest: session %s: dropping face motion messages: %s", self.id, e)
            return
        if self.claim is not None and not self._ended:
            self.claim.callbacks.motion(time.monotonic() - self._t0, face)

    def _track(self, track: MediaStreamTrack) -> None:
        self._spawn(self._video(track) if track.kind == "video" else self._audio(track))

    async def _state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.end(f"the driver's WebRTC connection {self.pc.connectionState}")

    async def _video(self, track: MediaStreamTrack) -> None:
        sign, anchor = Signer(), _Anchor()
        loop = asyncio.get_running_loop()

        def convert(frame: av.VideoFrame) -> tuple[np.ndarray, typing.Any]:
            rgb = frame.to_ndarray(format="rgb24")
            return rgb, sign(rgb)

        while True:
            try:
                frame = typing.cast(av.VideoFrame, await track.recv())
            except MediaStreamError:
                return
            received = time.monotonic()
            t = anchor.time(frame.time, received - self._t0)
            rgb, sig = await loop.run_in_executor(None, convert, frame)
            if self.claim is not None and not self._ended:
                self.claim.callbacks.frame(DriverFrame(t, received, rgb, sig))

    async def _audio(self, track: MediaStreamTrack) -> None:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        anchor = _Anchor()
        while True:
            try:
                frame = typing.cast(av.AudioFrame, await track.recv())
            except MediaStreamError:
                return
            t = anchor.time(frame.time, time.monotonic() - self._t0)
            for out in resampler.resample(frame):
                if self.claim is not None and not self._ended:
                    self.claim.callbacks.sound(t, out.to_ndarray().reshape(-1).astype(np.float32))

    async def end(self, reason: str) -> None:
        """Closes the connection and frees the room it claimed (telling it ``reason``)."""
        if self._ended:
            return
        self._ended = True
        self._sessions.pop(self.id, None)
        me = asyncio.current_task()
        for task in self._tasks:
            if task is not me:
                task.cancel()
        await self.pc.close()
        if self.claim is not None:
            self.claim.release()
            log.info("WHIP ingest: driver session %s ended: %s", self.id, reason)
            self.claim.callbacks.ended(reason)


PREVIEW_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>avatarfarm: your avatar, live</title>
<style>body{margin:0;background:#111;color:#ccc;font:14px sans-serif;text-align:center}
video{max-width:100vw;max-height:92vh;display:block;margin:auto;background:#000}</style></head>
<body><video id="video" autoplay muted playsinline></video><p id="status">connecting</p>
<script>
const BITS = {bits}, BLOCK = {block};  // the clock's blocks along the top edge
const key = location.pathname.split("/").pop();
const report = new URLSearchParams(location.search).has("report");
const status = document.getElementById("status");
const video = document.getElementById("video");

async function start() {
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", {direction: "recvonly"});
  pc.ontrack = (e) => { video.srcObject = new MediaStream([e.track]); };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === "complete") done(); };
  });
  const res = await fetch("/whep/" + key + (report ? "?clock=1" : ""), {
    method: "POST", headers: {"Content-Type": "application/sdp"}, body: pc.localDescription.sdp});
  if (res.status !== 201) { status.textContent = await res.text(); return; }
  await pc.setRemoteDescription({type: "answer", sdp: await res.text()});
  pc.onconnectionstatechange = () => { status.textContent = pc.connectionState; };
  if (report) measure();
}

// How late each frame is shown: the worker's clock when it was encoded (ms, 32 blocks
// along the top edge) against this one's. Both clocks must agree (one machine, or NTP).
function measure() {
  const canvas = document.createElement("canvas");
  const late = [];
  const step = () => {
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    const ctx = canvas.getContext("2d", {willReadFrequently: true});
    ctx.drawImage(video, 0, 0);
    const px = ctx.getImageData(0, 0, BITS * BLOCK, BLOCK).data;
    let ms = 0;
    for (let b = 0; b < BITS; b++) {
      let sum = 0, n = 0;
      for (let y = 2; y < BLOCK - 2; y++) for (let x = b * BLOCK + 2; x < (b + 1) * BLOCK - 2; x++) {
        const i = (y * BITS * BLOCK + x) * 4; sum += px[i] + px[i + 1] + px[i + 2]; n += 3;
      }
      ms = ms * 2 + (sum / n > 127 ? 1 : 0);
    }
    late.push(((Date.now() % 2 ** 32) - ms + 2 ** 32) % 2 ** 32);
    if (late.length < 50) { video.requestVideoFrameCallback(step); return; }
    late.sort((a, b) => a - b);
    fetch("/preview/" + key + "/report", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({frames: late.length, width: video.videoWidth, height: video.videoHeight,
                            latency_ms: late[late.length >> 1]})});
  };
  video.requestVideoFrameCallback(step);
}

start().catch((e) => { status.textContent = "failed: " + e; });
</script></body></html>
""".replace("{bits}", str(CLOCK_BITS)).replace("{block}", str(BLOCK))
