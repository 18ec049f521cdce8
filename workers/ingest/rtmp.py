"""The worker's RTMP ingest for live drivers: OBS, ffmpeg and phone apps publish a
driver's camera and microphone to ``rtmp://<worker>:<port>/live/<room credential>``.

One asyncio server per worker serves every camera room: it speaks RTMP itself (the
plain handshake, chunk streams, the AMF0 commands a publisher sends: connect,
releaseStream, FCPublish, createStream, publish, deleteStream) so that it can read the
stream name a publisher asks for and refuse it before any media is taken: the name is
the room's credential, checked by `authorize` (with who publishes: their address and
the software they said they are), which gives the room's `DriverSink` or raises `IngestRefused` (a wrong credential, a room that already has its driver). The
publisher is told why (``onStatus NetStream.Publish.BadName``) and disconnected.

Once publishing, audio and video messages are FLV tag bodies: they go to the sink
with their timestamps (`workers.ingest.feed` decodes them). Everything a publisher
sends is bounded: message sizes, chunk sizes, chunk streams, command values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.ingest import amf0

log = logging.getLogger(__name__)

HANDSHAKE = 1536
MAX_MESSAGE = 4 * 2**20  # a video frame of a 1080p driver stream fits many times over
MAX_CHUNK = 2**20
MAX_CHUNK_STREAMS = 64
OUT_CHUNK = 4096
WINDOW = 2_500_000  # bytes between acknowledgements, both ways
HANDSHAKE_SECONDS = 10.0
IDLE_SECONDS = 30.0
AUDIO, VIDEO, DATA, COMMAND = 8, 9, 18, 20
SET_CHUNK_SIZE, ACK, WINDOW_ACK_SIZE, PEER_BANDWIDTH = 1, 3, 5, 6
STREAM_ID = 1  # the one message stream a publisher is given


@dataclass(frozen=True, slots=True)
class Publisher:
    """Who publishes, as far as the ingest can tell (for the room's audit record)."""

    address: str  # host:port they connect from
    software: str = ""  # what their connect command says they are (flashVer), e.g. OBS

    def __str__(self) -> str:
        return f"{self.address} ({self.software})" if self.software else self.address


class IngestRefused(Exception):
    """A publisher the ingest does not take (the message says why, to the publisher)."""


class ProtocolError(Exception):
    """Bytes that are not the RTMP a publisher sends; the connection is closed."""


class RoomEnded(Exception):
    """The publisher's room ended: the connection is closed."""


class DriverSink(typing.Protocol):
    """Where a room's published media goes."""

    def tag(self, kind: int, timestamp_ms: int, payload: bytes) -> None:
        """One FLV tag body: ``kind`` 8 (audio) or 9 (video), the stream's timestamp."""
        ...

    def closed(self, reason: str) -> None:
        """The publisher stopped or was disconnected."""
        ...

    @property
    def wanted(self) -> bool:
        """False once the room has ended: the ingest disconnects its publisher."""
        ...


# (stream name, publisher) -> the room's sink, or IngestRefused
Authorize = Callable[[str, Publisher], DriverSink]


@dataclass(slots=True)
class _ChunkStream:
    timestamp: int = 0
    delta: int = 0
    length: int = 0
    kind: int = 0
    stream_id: int = 0
    extended: bool = False
    body: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True, slots=True)
class Message:
    kind: int
    stream_id: int
    timestamp: int
    payload: bytes


class _Connection:
    """One publisher's connection, after the handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 authorize: Authorize) -> None:
        self.reader, self.writer = reader, writer
        self.authorize = authorize
        self.in_chunk = 128
        self.out_chunk = 128
        self.streams: dict[int, _ChunkStream] = {}
        self.received = 0
        self.acked = 0
        self.window = 0  # the publisher's window; 0: it asked for no acknowledgements
        self.sink: DriverSink | None = None
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.software = ""

    # -- reading

    async def _read(self, n: int) -> bytes:
        data = await self.reader.readexactly(n)
        self.received += n
        return data

    async def read_message(self) -> Message:
        while True:
            first = (await self._read(1))[0]
            fmt, csid = first >> 6, first & 0x3F
            if csid == 0:
                csid = 64 + (await self._read(1))[0]
            elif csid == 1:
                b = await self._read(2)
                csid = 64 + b[0] + 256 * b[1]
            st = self.streams.get(csid)
            if st is None:
                if len(self.streams) >= MAX_CHUNK_STREAMS:
                    raise ProtocolError("too many chunk streams")
                if fmt != 0:
                    raise ProtocolError(f"chunk stream {csid} starts without a full header")
                st = self.streams[csid] = _ChunkStream()
            fresh = not st.body
            if fmt <= 2:
                head = await self._read((11, 7, 3)[fmt])
                ts = int.from_bytes(head[0:3], "big")
                st.extended = ts == 0xFFFFFF
                if st.extended:
                    ts = int.from_bytes(await self._read(4), "big")
                if fmt <= 1:
                    st.length = int.from_bytes(head[3:6], "big")
                    st.kind = head[6]
                if fmt == 0:
                    st.stream_id = struct.unpack("<I", head[7:11])[0]
                    st.timestamp, st.delta = ts, 0
                else:
                    st.delta = ts
                    if fresh:
                        st.timestamp += ts
            else:
                if st.extended:
                    await self._read(4)
                if fresh:
                    st.timestamp += st.delta
            if st.length > MAX_MESSAGE:
                raise ProtocolError(f"a message of {st.length} bytes is larger than {MAX_MESSAGE}")
            take = min(self.in_chunk, st.length - len(st.body))
            st.body += await self._read(take)
            await self._acknowledge()
            if len(st.body) >= st.length:
                msg = Message(st.kind, st.stream_id, st.timestamp & 0xFFFFFFFF, bytes(st.body))
                st.body.clear()
                return msg

    async def _acknowledge(self) -> None:
        if self.window and self.received - self.acked >= self.window:
            self.acked = self.received
            await self.send(ACK, struct.pack(">I", self.received & 0xFFFFFFFF), csid=2)

    # -- writing

    async def send(self, kind: int, payload: bytes, *, csid: int = 3, stream_id: int = 0) -> None:
        out = bytearray()
        out.append(csid)  # fmt 0
        out += (0).to_bytes(3, "big") + len(payload).to_bytes(3, "big") + bytes((kind,))
        out += struct.pack("<I", stream_id)
        for i in range(0, max(len(payload), 1), self.out_chunk):
            if i:
                out.append(0xC0 | csid)  # fmt 3: the message continues
            out += payload[i:i + self.out_chunk]
        self.writer.write(bytes(out))
        await self.writer.drain()

    async def command(self, *values: amf0.Value, stream_id: int = 0) -> None:
        await self.send(COMMAND, amf0.encode(*values), csid=5 if stream_id else 3, stream_id=stream_id)

    # -- the session

    async def run(self) -> None:
        while True:
            async with asyncio.timeout(IDLE_SECONDS):  # a publisher that goes quiet is gone
                msg = await self.read_message()
            if msg.kind == SET_CHUNK_SIZE:
                size = struct.unpack(">I", msg.payload[:4])[0] & 0x7FFFFFFF if len(msg.payload) >= 4 else 0
                if not 1 <= size <= MAX_CHUNK:
                    raise ProtocolError(f"chunk size {size} is outside 1..{MAX_CHUNK}")
                self.in_chunk = size
            elif msg.kind == WINDOW_ACK_SIZE and len(msg.payload) >= 4:
                self.window = struct.unpack(">I", msg.payload[:4])[0]
            elif msg.kind in (AUDIO, VIDEO):
                if self.sink is None:
                    raise ProtocolError("media before publish")
                if not self.sink.wanted:
                    raise RoomEnded("the room has ended")
                self.sink.tag(msg.kind, msg.timestamp, msg.payload)
            elif msg.kind == COMMAND:
                if not await self._command(msg):
                    return
            # Acknowledgements, user control, peer bandwidth, metadata: nothing to do.

    async def _command(self, msg: Message) -> bool:
        """Answers one command; False: the publisher is done (or refused)."""
        try:
            values = amf0.decode_all(msg.payload)
        except amf0.AmfError as e:
            raise ProtocolError(str(e)) from None
        if len(values) < 2 or not isinstance(values[0], str):
            raise ProtocolError("a command without a name and a transaction")
        name, txn = values[0], values[1] if isinstance(values[1], float) else 0.0
        args = values[3:]
        if name == "connect":
            params = values[2] if len(values) > 2 and isinstance(values[2], dict) else {}
            flash = params.get("flashVer")
            if isinstance(flash, str):
                self.software = "".join(c for c in flash[:64] if c.isprintable())
            await self.send(WINDOW_ACK_SIZE, struct.pack(">I", WINDOW), csid=2)
            await self.send(PEER_BANDWIDTH, struct.pack(">IB", WINDOW, 2), csid=2)
            await self.send(SET_CHUNK_SIZE, struct.pack(">I", OUT_CHUNK), csid=2)
            self.out_chunk = OUT_CHUNK
            await self.command("_result", txn, {"fmsVer": "FMS/3,0,1,123", "capabilities": 31.0},
                               {"level": "status", "code": "NetConnection.Connect.Success",
                                "description": "Connection succeeded.", "objectEncoding": 0.0})
        elif name == "createStream":
            await self.command("_result", txn, None, float(STREAM_ID))
        elif name in ("releaseStream", "FCPublish"):
            await self.command("_result", txn, None)
        elif name == "publish":
            key = args[0] if args and isinstance(args[0], str) else ""
            key = key.partition("?")[0]  # some clients append query parameters
            if self.sink is not None:
                raise ProtocolError("publish twice on one connection")
            try:
                self.sink = self.authorize(key, Publisher(self.peer, self.software))
            except IngestRefused as e:
                log.info("driver ingest: refused a publisher from %s: %s", self.peer, e)
                await self.command("onStatus", 0.0, None,
                                   {"level": "error", "code": "NetStream.Publish.BadName",
                                    "description": str(e)}, stream_id=STREAM_ID)
                return False
            log.info("driver ingest: publisher from %s started", self.peer)
            await self.command("onStatus", 0.0, None,
                               {"level": "status", "code": "NetStream.Publish.Start",
                                "description": "Publishing."}, stream_id=STREAM_ID)
        elif name in ("deleteStream", "FCUnpublish", "closeStream"):
            return False
        return True


class RtmpIngest:
    """The worker's driver ingest: an RTMP server on ``host:port`` (0: any free port),
    handing each accepted publisher's media to the sink `authorize` gives for its
    stream name."""

    def __init__(self, authorize: Authorize, host: str = "0.0.0.0", port: int = 0) -> None:
        self.authorize = authorize
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(typing.cast(asyncio.Task[None], task))
        conn: _Connection | None = None
        reason = "the publisher disconnected"
        try:
            await asyncio.wait_for(_handshake(reader, writer), HANDSHAKE_SECONDS)
            conn = _Connection(reader, writer, self.authorize)
            await conn.run()
            reason = "the publisher stopped"
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except RoomEnded as e:
            reason = str(e)
        except (ProtocolError, TimeoutError) as e:
            reason = f"protocol error: {e}"
            log.info("driver ingest: closing %s: %s", writer.get_extra_info("peername"), reason)
        finally:
            if conn is not None and conn.sink is not None:
                conn.sink.closed(reason)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(typing.cast(asyncio.Task[None], task))


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """RTMP's plain handshake: C0 C1 -> S0 S1 S2 -> C2. S1 says version 0, so clients
    skip the digest scheme (FFmpeg and librtmp do for a version-0 server)."""
    c0c1 = await reader.readexactly(1 + HANDSHAKE)
    if c0c1[0] != 3:
        raise ProtocolError(f"RTMP version {c0c1[0]}, not 3")
    c1 = c0c1[1:]
    s1 = struct.pack(">II", 0, 0) + os.urandom(HANDSHAKE - 8)
    s2 = c1[:4] + struct.pack(">I", 0) + c1[8:]
    writer.write(b"\x03" + s1 + s2)
    await writer.drain()
    await reader.readexactly(HANDSHAKE)  # C2: our S1 echoed
