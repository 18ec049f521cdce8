"""The scheduler's status page: rendering escapes what users named and caps its tables,
the snapshot reads a real core, the metrics port serves the pages read-only next to
/metrics, a real scheduler publishes them, and headless chromium draws them (a
screenshot decoded and checked for the state colours)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import av
import grpc
import numpy as np
import pytest

from avatarfarm.domain import DriveMode, Output, OutputKind, Progress, Quality, SessionState, Tier
from avatarfarm.serving import MetricsEndpoint
from avatarfarm.v1 import sessions_pb2_grpc, types_pb2
from scheduler.api.status_page import (
    ROOM_ROWS,
    PoolRow,
    RoomRow,
    StatusBoard,
    StatusSnapshot,
    Totals,
    WorkerRow,
    render_html,
    snapshot,
    to_json,
)
from scheduler.config import SchedulerConfig
from scheduler.core import Scheduler
from scheduler.metrics import SchedulerMetrics
from scheduler.server import RunningScheduler, start
from tests import builders
from tests.browser import chromium_binary, start_chromium
from tests.builders import T0, Clock, connect, make_spec, png_image
from tests.scheduler.api.test_service import ProtocolWorker, create_req

HOSTILE = '<script>alert("room")</script>'
# The badge colours the page uses (its CSS), as a screenshot shows them.
RUNNING_GREEN = (0x16, 0xA3, 0x4A)
PENDING_AMBER = (0xD9, 0x77, 0x06)


def make_core(tmp: Path, **kw: Any) -> tuple[Scheduler, Clock]:
    return builders.make_core(tmp, device_prices={"cpu": 3.6}, degradation_ladder=[], **kw)


def room_row(i: int, **kw: Any) -> RoomRow:
    fields: dict[str, Any] = dict(
        session_id=f"s{i:05d}", tenant="shop", room_id=f"room-{i}", tier="standard",
        state="running", worker_id="w1", quality="512x512@25", rendering="", step=0,
        output="file", frames=25 * i, late_frames=0, stream_seconds=float(i), reason="")
    return RoomRow(**(fields | kw))


def hand_snapshot(rooms: tuple[RoomRow, ...], listed: int) -> StatusSnapshot:
    totals = Totals(rooms_running=listed, rooms_placed=0, rooms_pending=0, rooms_failed_recently=0,
                    rooms_ended_recently=0, workers=2, workers_accepting=1, workers_draining=1,
                    capacity=2.0, load=0.5, queue_length=0, stream_hours=1.0, cost=2.0,
                    cost_per_stream_hour=2.0)
    workers = (WorkerRow("w1", "h200", "CUDAExecutionProvider", 0.5, 0.5, 1.0, 2, True, 0.4),
               WorkerRow("w2", "h200", "CUDAExecutionProvider", 0.0, 0.0, 1.0, 0, False, 0.2,
                         draining=True, drain_reason="scale down <pool h200>",
                         drain_seconds_left=42.0))
    return StatusSnapshot(T0, totals, rooms, listed, workers, (), (),
                          (PoolRow("h200-pool", "h200", 3, 1, 2, 0, "demand 20.0 units"),))


class Tags(HTMLParser):
    """The start tags and text of a page, as a parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Tags:
    t = Tags()
    t.feed(page)
    return t


# -- rendering ------------------------------------------------------------------------

def test_the_page_escapes_what_users_named_and_caps_its_tables() -> None:
    hostile = room_row(0, tenant='"><img src=x onerror=alert(1)>', room_id=HOSTILE,
                       reason="<marquee>moving</marquee> & 'quoted'", worker_id="w1<iframe>")
    rooms = (hostile, *(room_row(i) for i in range(1, ROOM_ROWS + 50)))
    page = render_html(hand_snapshot(rooms, 10_000))
    tags = parse(page)
    # What users named is text, never markup: no script, image or frame element at all.
    assert not {"script", "img", "iframe", "marquee"} & set(tags.tags)
    assert HOSTILE in "".join(tags.text)
    assert "&lt;script&gt;" in page and "&quot;&gt;&lt;img" in page
    assert '<meta http-equiv="refresh" content="5">' in page
    # A farm of 10,000 rooms lists the first ROOM_ROWS and says how many it leaves out.
    assert page.count('<tr class="room">') == ROOM_ROWS
    assert f"{10_000 - ROOM_ROWS:,} more rooms not shown" in page
    assert "h200-pool" in page and "demand 20.0 units" in page  # pools, from the autoscaler
    assert "scale down &lt;pool h200&gt;; stopped in 42 s" in page  # a draining worker
    fast = time.perf_counter()
    render_html(hand_snapshot(rooms, 10_000))
    assert time.perf_counter() - fast < 0.5


def test_an_old_snapshot_says_so() -> None:
    snap = hand_snapshot((room_row(1),), 1)
    assert "s old" not in render_html(snap, age_seconds=1.0, stale_after=10.0)
    assert "This status is 42 s old" in render_html(snap, age_seconds=42.0, stale_after=10.0)


# -- the snapshot of a real core ---------------------------------------------------------

def test_a_snapshot_shows_rooms_workers_queue_and_cost(tmp_path: Path) -> None:
    core, clock = make_core(tmp_path)
    conn = connect(core, "w1")
    secret = "rtmp://ingest.example.com/live/sk-SECRET-KEY"
    a = core.create(make_spec("room-a", tier=Tier.PREMIUM, drive=DriveMode.VOICE,
                              output=Output(OutputKind.RTMP, secret)))
    b = core.create(make_spec("room-b", tenant="ka-brand", drive=DriveMode.VOICE))
    big = core.create(make_spec("too-big", tier=Tier.PREMIUM, drive=DriveMode.VOICE,
                                quality=Quality(3840, 2160, 60)))
    assert a.state is b.state is SessionState.PLACED and big.state is SessionState.PENDING
    a, b = core.sessions[a.session_id], core.sessions[b.session_id]
    clock.now += 10
    core.worker_update(conn, a.session_id, a.epoch, SessionState.RUNNING, "",
                       Progress(frames_rendered=250, late_frames=3, stream_seconds=10.0,
                                device_seconds=2.5))
    core.worker_update(conn, b.session_id, b.epoch, SessionState.FAILED,
                       f"encoder lost {secret} (broken pipe); also rtmp://u:p@other.example/x/KEY2",
                       Progress(frames_rendered=25, stream_seconds=1.0, device_seconds=0.5))
    old = core.create(make_spec("long-gone", drive=DriveMode.VOICE))
    core.end(old.session_id)
    clock.now += 700  # room-b failed and long-gone ended 700 s ago
    core.worker_update(conn, a.session_id, a.epoch, SessionState.RUNNING, "",
                       Progress(frames_rendered=500, late_frames=3, stream_seconds=20.0,
                                device_seconds=5.0))
    snap = snapshot(core.snapshot(), recent_seconds=600.0)
    by_room = {r.room_id: r for r in snap.rooms}
    assert set(by_room) == {"room-a", "too-big"}
    # Over a longer window they are listed too, rooms that need a look first.
    snap_recent = snapshot(core.snapshot(), recent_seconds=3600.0)
    assert [(r.state, r.room_id) for r in snap_recent.rooms] == [
        ("failed", "room-b"), ("pending", "too-big"), ("running", "room-a"), ("ended", "long-gone")]
    ra = by_room["room-a"]
    assert (ra.state, ra.worker_id, ra.tier, ra.output) == ("running", "w1", "premium", "rtmp")
    assert (ra.frames, ra.late_frames, ra.stream_seconds) == (500, 3, 20.0)
    pending = by_room["too-big"]
    assert pending.state == "pending" and pending.reason
    assert [q.room_id for q in snap.queue] == ["too-big"] and snap.queue[0].position == 1
    assert snap.totals.rooms_running == 1 and snap.totals.rooms_pending == 1
    assert snap.totals.queue_length == 1 and snap.rooms_listed == 2
    (w,) = snap.workers
    assert (w.worker_id, w.device_type, w.rooms, w.accepting) == ("w1", "cpu", 1, True)
    assert 0 < w.utilisation < 1 and w.load > 0
    # 5.5 device-seconds over 21 stream-seconds at 3.6 per device-hour.
    assert snap.totals.cost_per_stream_hour == pytest.approx(5.5 * 3.6 / 21)
    assert {(c.tier, c.device_type) for c in snap.costs} == {("premium", "cpu"), ("standard", "cpu")}
    premium = next(c for c in snap.costs if c.tier == "premium")
    assert premium.cost_per_stream_hour == pytest.approx(5.0 * 3.6 / 20)

    # Neither the page nor the JSON carries a stream key or an input endpoint.
    failed = next(r for r in snap_recent.rooms if r.room_id == "room-b")
    assert "broken pipe" in failed.reason and "other.example" in failed.reason
    for text in (render_html(snap_recent), to_json(snap_recent)):
        assert "SECRET" not in text and "KEY2" not in text and "u:p@" not in text
        assert ".internal:7001" not in text
    data = json.loads(to_json(snap_recent))
    assert data["totals"]["rooms_failed_recently"] == 1
    assert {r["room_id"] for r in data["rooms"]} == {"room-a", "room-b", "too-big", "long-gone"}

    assert core.drain_worker("w1", clock.now + 60, "scale down")
    (w,) = snapshot(core.snapshot()).workers
    assert (w.draining, w.accepting, w.drain_reason, w.drain_seconds_left) == (
        True, False, "scale down", 60.0)
    assert snapshot(core.snapshot()).totals.workers_draining == 1
    core.store.close()


def test_the_page_lists_rooms_in_admission_order_whatever_order_they_started_in(
        tmp_path: Path) -> None:
    # The cluster snapshot keeps each state's rooms in the order they entered it (a tick
    # copies them and sorts nothing); the page orders what it shows.
    core, _ = make_core(tmp_path)
    conn = connect(core)
    rooms = [core.create(make_spec(f"r{i}", drive=DriveMode.MOCAP, quality=Quality(256, 256, 25)))
             for i in range(4)]
    assert all(s.state is SessionState.PLACED for s in rooms)
    for s in reversed(rooms):  # the last admitted starts first
        s = core.sessions[s.session_id]
        core.worker_update(conn, s.session_id, s.epoch, SessionState.RUNNING, "",
                           Progress(frames_rendered=25, stream_seconds=1.0))
    cluster = core.snapshot()
    assert [s.spec.room_id for s in cluster.sessions(SessionState.RUNNING)] == ["r3", "r2", "r1", "r0"]
    assert [r.room_id for r in snapshot(cluster).rooms] == ["r0", "r1", "r2", "r3"]
    assert [r.room_id for r in snapshot(cluster, room_limit=2).rooms] == ["r0", "r1"]
    core.store.close()


def test_a_snapshot_of_many_rooms_is_cheap_and_capped(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path, sync_to_disk=False)
    for i in range(20):
        connect(core, f"w{i:02d}")
    for i in range(2000):
        core.create(make_spec(f"r{i}", drive=DriveMode.MOCAP, quality=Quality(256, 256, 25)))
    took = time.perf_counter()
    snap = snapshot(core.snapshot(), room_limit=100, worker_limit=5, queue_limit=7)
    took = time.perf_counter() - took
    assert len(snap.rooms) == 100 and snap.rooms_listed == 2000
    assert len(snap.workers) == 5 and snap.totals.workers == 20
    order = ["failed", "pending", "placed", "running", "ended"]
    states = [r.state for r in snap.rooms]
    assert "pending" in states and states == sorted(states, key=order.index)
    assert len(snap.queue) == min(7, snap.totals.queue_length)
    assert took < 0.5, took
    core.store.close()


# -- the HTTP endpoint --------------------------------------------------------------------

def request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@contextlib.contextmanager
def endpoint(pages: Any = None) -> Any:
    metrics = SchedulerMetrics()
    metrics.pending.set(7)
    e = MetricsEndpoint.start(-1, "127.0.0.1", metrics.registry, pages=pages)
    try:
        yield e.port
    finally:
        e.stop()


def test_the_metrics_port_serves_the_pages_read_only() -> None:
    board = StatusBoard()
    with endpoint(board.pages()) as port:
        status, headers, _ = request(port, "GET", "/status")
        assert status == 503 and headers["retry-after"] == "1"  # before the first snapshot
        board.put(hand_snapshot((room_row(1, room_id=HOSTILE),), 1))

        status, headers, body = request(port, "GET", "/status")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src" not in headers["content-security-policy"]  # default-src 'none'
        assert "default-src 'none'" in headers["content-security-policy"]
        assert headers["cache-control"] == "no-store"
        assert "&lt;script&gt;" in body.decode() and "<script>" not in body.decode()

        status, headers, body = request(port, "GET", "/status.json")
        assert status == 200 and headers["content-type"] == "application/json"
        assert json.loads(body)["rooms"][0]["room_id"] == HOSTILE

        status, _, body = request(port, "GET", "/metrics")
        assert status == 200 and b"avatarfarm_pending_sessions 7.0" in body

        status, headers, _ = request(port, "GET", "/")
        assert status == 302 and headers["location"] == "status"

        status, headers, body = request(port, "HEAD", "/status")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 1000

        for method in ("POST", "PUT", "DELETE", "PATCH"):
            for path in ("/", "/status", "/status.json"):
                status, headers, _ = request(port, method, path)
                assert status == 405 and headers["allow"] == "GET, HEAD", (method, path)
        assert request(port, "POST", "/metrics")[0] == 405  # as Prometheus's own server answers
        assert request(port, "GET", "/elsewhere")[0] == 404


def test_without_pages_every_path_serves_the_metrics() -> None:
    # The worker's endpoint: as before, any path answers with the metrics.
    with endpoint() as port:
        for path in ("/metrics", "/", "/status"):
            status, _, body = request(port, "GET", path)
            assert status == 200 and b"avatarfarm_pending_sessions 7.0" in body


# -- a real scheduler ---------------------------------------------------------------------

def run(body: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(body(), timeout)
    asyncio.run(bounded())


@contextlib.asynccontextmanager
async def farm(tmp_path: Path) -> AsyncIterator[
        tuple[RunningScheduler, sessions_pb2_grpc.SessionServiceStub, ProtocolWorker]]:
    avatars = tmp_path / "avatars"
    avatars.mkdir()
    (avatars / "presenter.png").write_bytes(png_image())
    # The protocol worker sends no heartbeats: a long timeout keeps it connected while
    # the browser runs.
    conf = SchedulerConfig(listen="127.0.0.1:0", metrics_port=-1, database=tmp_path / "state.db",
                           avatar_dir=avatars, worker_timeout=600.0, degradation_ladder=[],
                           device_prices={"cpu": 3.6})
    running = await start(conf)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    worker = ProtocolWorker(channel, "gpu-node-7")
    try:
        yield running, sessions_pb2_grpc.SessionServiceStub(channel), worker
    finally:
        await worker.close()
        await channel.close()
        await running.stop(grace=0.1)


async def status_json(port: int) -> dict[str, Any]:
    status, _, body = await asyncio.to_thread(request, port, "GET", "/status.json")
    return json.loads(body) if status == 200 else {}


async def until_status(port: int, done: Callable[[dict[str, Any]], bool],
                       timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data = await status_json(port)
        if data and done(data):
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"the status page did not get there: {data}")
        await asyncio.sleep(0.05)


async def running_rooms(stub: sessions_pb2_grpc.SessionServiceStub, worker: ProtocolWorker,
                        names: list[str]) -> None:
    for name in names:
        await stub.CreateSession(create_req(name, drive=types_pb2.DRIVE_MODE_VOICE, seconds=600.0))
        assign = await worker.next("assign")
        worker.report(assign.assign.session_id, types_pb2.SESSION_STATE_RUNNING, frames=250,
                      device=1.0)


def test_a_running_scheduler_publishes_its_status_and_stops_publishing(tmp_path: Path) -> None:
    async def body() -> None:
        async with farm(tmp_path) as (running, stub, worker):
            await running_rooms(stub, worker, ["launch-a"])
            data = await until_status(running.metrics_port,
                                      lambda d: d["totals"]["rooms_running"] == 1)
            assert data["workers"][0]["worker_id"] == "gpu-node-7"
            assert data["rooms"][0]["room_id"] == "launch-a"
            # 1 device-second over 10 stream-seconds at 3.6 per device-hour.
            assert data["totals"]["cost_per_stream_hour"] == pytest.approx(0.36)
            page = (await asyncio.to_thread(request, running.metrics_port, "GET", "/status"))[2]
            assert b"launch-a" in page and b"gpu-node-7" in page and b"127.0.0.1:1" not in page
            task = running.status_task
        assert task is not None and task.done()

    run(body)


# -- in a real browser --------------------------------------------------------------------

async def browse(binary: str, url: str, workdir: Path, *args: str, timeout: float = 60.0) -> bytes:
    """Runs headless chromium on `url` in a profile of its own; its standard output."""
    proc = await start_chromium(binary, url, workdir, *args)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"chromium did not finish within {timeout:.0f} s") from None
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return out


def pixels(png: Path) -> np.ndarray:
    with av.open(str(png)) as container:
        frame = next(container.decode(video=0))
        return frame.to_ndarray(format="rgb24")


def colour_count(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 3) -> int:
    return int((np.abs(image.astype(np.int16) - np.array(rgb)).max(axis=2) <= tolerance).sum())


@pytest.mark.slow
def test_chromium_draws_the_status_page(tmp_path: Path) -> None:
    binary = chromium_binary()

    async def screenshot(url: str, name: str) -> np.ndarray:
        png = tmp_path / name
        await browse(binary, url, tmp_path, f"--screenshot={png}")
        image = pixels(png)
        assert image.shape == (900, 1280, 3)
        assert image.std() > 20  # not a blank page
        return image

    async def body() -> None:
        async with farm(tmp_path) as (running, stub, worker):
            url = f"http://127.0.0.1:{running.metrics_port}/status"
            rooms = ["launch-a", "launch-b", "launch-c"]
            await running_rooms(stub, worker, rooms)
            await until_status(running.metrics_port, lambda d: d["totals"]["rooms_running"] == 3)

            before = await screenshot(url, "running.png")
            assert colour_count(before, RUNNING_GREEN) > 1500  # three badges
            assert colour_count(before, PENDING_AMBER) == 0

            # A room no worker can carry (4K at 60 fps, premium: no stepping down) waits.
            big = await stub.CreateSession(create_req(
                "too-big", drive=types_pb2.DRIVE_MODE_VOICE, tier=types_pb2.TIER_PREMIUM,
                width=3840, height=2160, fps=60))
            assert big.state == types_pb2.SESSION_STATE_PENDING
            await until_status(running.metrics_port, lambda d: d["totals"]["rooms_pending"] == 1)

            dom = (await browse(binary, url, tmp_path, "--dump-dom")).decode()
            for name in [*rooms, "too-big", "gpu-node-7"]:
                assert name in dom, name
            assert "<tbody>" in dom and "0.36" in dom  # parsed tables; cost per stream-hour
            assert "127.0.0.1:1" not in dom  # the worker's input endpoint stays off the page

            after = await screenshot(url, "pending.png")
            assert colour_count(after, PENDING_AMBER) > 400  # one badge
            assert colour_count(after, RUNNING_GREEN) > 1500

    run(body, timeout=180)


@pytest.mark.slow
def test_chromium_gets_no_status_page_without_an_operators_login(tmp_path: Path) -> None:
    binary = chromium_binary()
    from scheduler.api import auth

    key = "operator-key-for-this-test"
    avatars = tmp_path / "avatars"
    avatars.mkdir()
    (avatars / "presenter.png").write_bytes(png_image())
    conf = SchedulerConfig(listen="127.0.0.1:0", metrics_port=-1, database=tmp_path / "state.db",
                           avatar_dir=avatars, admin_api_keys_sha256=[auth.hash_api_key(key)])

    async def body() -> None:
        running = await start(conf)
        try:
            port = running.metrics_port
            # Headless, the browser cannot ask for a login: it shows nothing of the page.
            refused = await browse(binary, f"http://127.0.0.1:{port}/status", tmp_path, "--dump-dom")
            assert b"avatarfarm scheduler status" not in refused and b"status.json" not in refused
            wrong = await browse(binary, f"http://ops:wrong@127.0.0.1:{port}/status", tmp_path,
                                 "--dump-dom")
            assert b"avatarfarm scheduler status" not in wrong and b"status.json" not in wrong
            deadline = time.monotonic() + 10
            while True:  # the first snapshot: before it the page says it is starting
                page = await browse(binary, f"http://ops:{key}@127.0.0.1:{port}/status", tmp_path,
                                    "--dump-dom")
                if b"avatarfarm scheduler status" in page or time.monotonic() > deadline:
                    break
            assert b"avatarfarm scheduler status" in page and b"operators only" not in page
        finally:
            await running.stop(grace=0.1)

    run(body, timeout=180)
