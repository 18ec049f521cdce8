"""The scheduler's read-only status page: rooms, workers, the admission queue, worker
pools and cost per stream-hour, as HTML at /status (no script, no build step) and as
JSON at /status.json, served on the metrics port next to /metrics.

Two threads meet here. The core's state belongs to the event loop, so `StatusBoard.publish`
copies what the page shows into an immutable `StatusSnapshot` on the loop once per
interval, and the HTTP server's threads only render the latest snapshot: a request never
touches the core nor waits for the loop, and a stuck loop shows up as an old snapshot
(the page says so) rather than as a page that hangs. Tables are capped
(failed and waiting rooms first), so a farm of 10,000 rooms answers as fast as one of ten.

Security: who may see the pages (operators, under a host name served) is decided before
any page is built, by ``scheduler.api.status_access``. The pages hold no secrets: no tokens or key hashes, no input endpoints, and a room's output only
as its kind (an RTMP URL carries the stream key; any RTMP URL in a reason is cut to its
host). Tenant and room ids and reasons come from users, so every value is escaped, and
the page's Content-Security-Policy forbids scripts altogether.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import html
import json
import logging
import operator
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from avatarfarm.domain import Output, OutputKind, SessionState
from avatarfarm.serving import Page, PageHandler
from scheduler.autoscale.controller import PoolRow as PoolRow  # the autoscaler's view of its pools
from scheduler.core import Scheduler
from scheduler.state.sessions import Session
from scheduler.state.snapshot import ClusterSnapshot

log = logging.getLogger(__name__)
_admitted = operator.attrgetter("seq")

ROOM_ROWS = 200
WORKER_ROWS = 200
QUEUE_ROWS = 20
RECENT_SECONDS = 600.0  # ended and failed rooms stay listed this long
REFRESH_SECONDS = 5  # the browser reloads the page this often
PUBLISH_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class RoomRow:
    session_id: str
    tenant: str
    room_id: str
    tier: str
    state: str
    worker_id: str
    quality: str  # as asked
    rendering: str  # what it renders at now when stepped down the ladder, else ""
    step: int  # degradation step
    output: str  # the output's kind only
    frames: int
    late_frames: int
    stream_seconds: float
    reason: str
    av_offset_ms: float = 0.0  # the last conclusive lip-sync check (> 0: the video lags)
    sync_checks: int = 0


@dataclass(frozen=True, slots=True)
class WorkerRow:
    worker_id: str
    device_type: str
    provider: str
    utilisation: float  # the fullest of device time, CPU encode time and memory
    load: float  # device-seconds per second placed on it
    capacity: float
    rooms: int
    accepting: bool  # takes new rooms
    seen_seconds_ago: float
    draining: bool = False  # marked for removal: its rooms are being handed over
    drain_reason: str = ""
    drain_seconds_left: float = 0.0  # until it is stopped, rooms or not


@dataclass(frozen=True, slots=True)
class QueueRow:
    position: int
    session_id: str
    tenant: str
    room_id: str
    tier: str
    quality: str
    units: float
    waiting_seconds: float  # since admission
    reason: str


@dataclass(frozen=True, slots=True)
class CostRow:
    tier: str
    device_type: str
    price_per_device_hour: float
    stream_hours: float
    device_hours: float
    cost: float
    cost_per_stream_hour: float


@dataclass(frozen=True, slots=True)
class Totals:
    rooms_running: int
    rooms_placed: int
    rooms_pending: int
    rooms_failed_recently: int
    rooms_ended_recently: int
    workers: int
    workers_accepting: int
    workers_draining: int
    capacity: float  # device-seconds per second, all workers
    load: float
    queue_length: int
    stream_hours: float  # since the scheduler started
    cost: float
    cost_per_stream_hour: float


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    taken_at: float  # the core's clock (seconds since the epoch)
    totals: Totals
    rooms: tuple[RoomRow, ...]  # the first of rooms_listed, failed and waiting first
    rooms_listed: int  # live rooms and those ended within recent_seconds
    workers: tuple[WorkerRow, ...]
    queue: tuple[QueueRow, ...]  # the head of the queue, in service order
    costs: tuple[CostRow, ...]
    pools: tuple[PoolRow, ...] = ()
    recent_seconds: float = RECENT_SECONDS


# -- the snapshot, taken on the event loop ------------------------------------------

_RTMP_URL = re.compile(r"(?i)\b(rtmps?)://(?:[^\s/@'\"]*@)?([^\s/'\"]+)[^\s'\"]*")


def _redact(text: str, output: Output) -> str:
    """A reason as shown: the room's own RTMP URL and any other cut to scheme and host
    (the path holds the stream key)."""
    if output.kind is OutputKind.RTMP and output.target:
        text = text.replace(output.target, "(the room's RTMP output)")
    return _RTMP_URL.sub(r"\1://\2/…", text)


def _room(s: Session) -> RoomRow:
    return RoomRow(s.session_id, s.spec.tenant, s.spec.room_id, s.spec.tier.value, s.state.value,
                   s.worker_id, str(s.spec.quality), "" if s.rendering is None else str(s.rendering),
                   s.step, s.spec.output.kind.value, s.progress.frames_rendered,
                   s.progress.late_frames, s.progress.stream_seconds, _redact(s.reason, s.spec.output),
                   round(s.progress.av_offset_seconds * 1000, 1), s.progress.sync_checks)


def snapshot(cluster: ClusterSnapshot, pools: Sequence[PoolRow] = (), *,
             room_limit: int = ROOM_ROWS, worker_limit: int = WORKER_ROWS,
             queue_limit: int = QUEUE_ROWS, recent_seconds: float = RECENT_SECONDS
             ) -> StatusSnapshot:
    """What the page shows, from the core's read model. Rooms listed: live ones and those
    ended within `recent_seconds` (at most the cluster snapshot's own window), failed,
    pending, placed, running, ended, each in admission order; rows are built only for
    the first `room_limit`."""
    now = cluster.at
    since = now - recent_seconds
    failed = [s for s in cluster.sessions(SessionState.FAILED) if s.updated_at >= since]
    pending = list(cluster.sessions(SessionState.PENDING))
    placed = list(cluster.sessions(SessionState.PLACED))
    running = list(cluster.sessions(SessionState.RUNNING))
    ended = [s for s in cluster.sessions(SessionState.ENDED) if s.updated_at >= since]
    # Rooms that need a look first, so a capped table still shows every problem; within
    # a group the earliest admitted (the cluster snapshot keeps its own order).
    top: list[Session] = []
    for group in (failed, pending, placed, running, ended):
        top += heapq.nsmallest(room_limit - len(top), group, key=_admitted)

    workers: list[WorkerRow] = []
    capacity = load = 0.0
    for w in cluster.workers.values():
        capacity += w.compute_capacity
        load += w.compute_load
        if len(workers) < worker_limit:
            until = w.draining_until
            workers.append(WorkerRow(
                w.worker_id, w.device_type, w.provider, w.utilisation, w.compute_load,
                w.compute_capacity, len(w.rooms), w.accepting, max(0.0, now - w.last_seen),
                until is not None, w.drain_reason,
                max(0.0, until - now) if until is not None else 0.0))

    waiting = {s.session_id: s for s in pending}
    queue: list[QueueRow] = []
    for sid in cluster.queue:
        s = waiting.get(sid)
        if s is not None and len(queue) < queue_limit:
            queue.append(QueueRow(len(queue) + 1, sid, s.spec.tenant, s.spec.room_id,
                                  s.spec.tier.value, str(s.quality), s.units,
                                  max(0.0, now - s.created_at), _redact(s.reason, s.spec.output)))

    book = cluster.costs
    costs: list[CostRow] = []
    for tier, dev in sorted(book.stream_seconds.keys() | book.device_seconds.keys(),
                            key=lambda k: (k[0].priority, k[1])):
        costs.append(CostRow(tier.value, dev, book.price(dev), book.stream_hours(tier, dev),
                             book.device_seconds.get((tier, dev), 0.0) / 3600.0,
                             book.money(tier, dev), book.per_stream_hour(tier, dev)))

    totals = Totals(
        rooms_running=len(running), rooms_placed=len(placed), rooms_pending=len(pending),
        rooms_failed_recently=len(failed), rooms_ended_recently=len(ended),
        workers=len(cluster.workers),
        workers_accepting=sum(w.accepting for w in cluster.workers.values()),
        workers_draining=sum(w.draining for w in cluster.workers.values()), capacity=capacity, load=load,
        queue_length=cluster.queue_length, stream_hours=book.stream_hours(), cost=book.money(),
        cost_per_stream_hour=book.per_stream_hour())
    listed = len(failed) + len(pending) + len(placed) + len(running) + len(ended)
    return StatusSnapshot(now, totals, tuple(_room(s) for s in top), listed,
                          tuple(workers), tuple(queue), tuple(costs), tuple(pools),
                          recent_seconds)


# -- rendering, in the HTTP thread ---------------------------------------------------------

def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _amount(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) < 0.01:
        return f"{x:.4f}"
    return f"{x:,.2f}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    h, m = s // 3600, s // 60 % 60
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _span(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def _label(value: str) -> str:
    return value.replace("_", " ")


def _badge(kind: str, value: str) -> str:
    # Class names come from a fixed set, never from the value itself.
    cls = kind if kind in _BADGES else "other"
    return f'<span class="badge b-{cls}">{_e(_label(value))}</span>'


_BADGES = frozenset({"running", "pending", "placed", "failed", "ended", "accepting", "draining"})

_CSS = """
:root{color-scheme:light}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
color:#1e293b;background:#f8fafc}
header{background:#0f172a;color:#f8fafc;padding:14px 24px}
header h1{margin:0;font-size:20px;font-weight:600}
header p{margin:4px 0 0;color:#cbd5e1;font-size:12px}
header a{color:#93c5fd}
main{padding:16px 24px 32px}
.tiles{display:flex;flex-wrap:wrap;gap:12px}
.tile{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:8px 14px;min-width:120px}
.tile b{display:block;font-size:22px;font-weight:600}
.tile span{color:#64748b;font-size:12px}
h2{margin:22px 0 8px;font-size:16px}
h2 small{color:#64748b;font-weight:400}
table{width:100%;border-collapse:collapse;background:#fff;border:1px solid #e2e8f0}
th,td{padding:4px 8px;border-bottom:1px solid #eef2f7;text-align:left;white-space:nowrap}
th{background:#f1f5f9;color:#475569;font-size:12px;font-weight:600}
.n{text-align:right;font-variant-numeric:tabular-nums}
td.why{white-space:normal;color:#475569;min-width:200px}
td.id{white-space:normal;overflow-wrap:anywhere;max-width:240px}
.scroll{overflow-x:auto}
td.none,p.more{color:#64748b;font-style:italic}
code{font-size:12px;color:#475569}
.badge{display:inline-block;padding:1px 9px;border-radius:9px;color:#fff;font-size:12px;font-weight:600}
.b-running{background:#16a34a}.b-pending{background:#d97706}.b-failed{background:#dc2626}
.b-placed{background:#2563eb}.b-ended{background:#6b7280}.b-other{background:#334155}
.b-accepting{background:#0e7490}.b-draining{background:#7c3aed}
.bar{display:inline-block;width:90px;height:8px;margin-right:6px;background:#e2e8f0;
border-radius:4px;vertical-align:middle;overflow:hidden}
.bar i{display:block;height:100%;background:#475569}
.stale{margin:0 0 12px;padding:8px 12px;border:1px solid #fecaca;border-radius:6px;
background:#fef2f2;color:#991b1b}
"""


def _table(head: Sequence[tuple[str, bool]], rows: Sequence[str], empty: str) -> str:
    """A table from (title, numeric) columns and already escaped rows."""
    ths = "".join(f'<th class="n">{_e(t)}</th>' if num else f"<th>{_e(t)}</th>"
                  for t, num in head)
    body = "".join(rows) or f'<tr><td class="none" colspan="{len(head)}">{_e(empty)}</td></tr>'
    return (f'<div class="scroll"><table><thead><tr>{ths}</tr></thead><tbody>{body}</tbody>'
            "</table></div>")


def _td(value: object, cls: str = "") -> str:
    return f'<td class="{cls}">{_e(value)}</td>' if cls else f"<td>{_e(value)}</td>"


def _more(hidden: int, what: str, why: str) -> str:
    if hidden <= 0:
        return ""
    return f'<p class="more">{_e(f"{hidden:,} more {what} not shown; {why}.")}</p>'


def _tile(value: str, label: str) -> str:
    return f'<div class="tile"><b>{_e(value)}</b><span>{_e(label)}</span></div>'


def render_html(snap: StatusSnapshot, *, age_seconds: float = 0.0,
                stale_after: float = 10.0) -> str:
    """The page, from a snapshot alone; every value escaped."""
    t = snap.totals
    taken = datetime.fromtimestamp(snap.taken_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    recent = _span(snap.recent_seconds)
    out = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>avatarfarm scheduler status</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header><h1>avatarfarm scheduler</h1>",
        f"<p>Status as of {_e(taken)}; this page reloads every {REFRESH_SECONDS} s. "
        '<a href="status.json">JSON</a> · <a href="metrics">metrics</a></p></header><main>',
    ]
    if age_seconds > stale_after:
        out.append(f'<p class="stale">{_e(f"This status is {age_seconds:.0f} s old: the scheduler loop is not refreshing it (busy or stuck).")}</p>')
    util = f"{t.load / t.capacity:.0%}" if t.capacity > 0 else "-"
    out += [
        '<section class="tiles">',
        _tile(f"{t.rooms_running:,}", "rooms running"),
        _tile(f"{t.rooms_placed:,}", "rooms starting"),
        _tile(f"{t.rooms_pending:,}", "rooms pending"),
        _tile(f"{t.rooms_failed_recently:,}", f"failed, last {recent}"),
        _tile(f"{t.workers_accepting:,} / {t.workers:,}", "workers accepting / all"),
        _tile(f"{t.workers_draining:,}", "workers draining") if t.workers_draining else "",
        _tile(util, "fleet device load"),
        _tile(_amount(t.cost_per_stream_hour), "cost per stream-hour"),
        "</section>",
    ]

    shown = snap.rooms[:ROOM_ROWS]
    rows = []
    for r in shown:
        quality = r.quality if not r.rendering else f"{r.quality} → {r.rendering} (step {r.step})"
        rows.append(
            f'<tr class="room"><td>{_badge(r.state, r.state)}</td>{_td(r.tenant, "id")}{_td(r.room_id, "id")}'
            f'<td><code title="{_e(r.session_id)}">{_e(r.session_id[:8])}</code></td>'
            f"{_td(_label(r.tier))}{_td(r.worker_id or '-', 'id')}{_td(quality, 'id')}{_td(r.output)}"
            f'{_td(f"{r.frames:,}", "n")}{_td(f"{r.late_frames:,}", "n")}'
            f'{_td(f"{r.av_offset_ms:+.0f} ms" if r.sync_checks else "-", "n")}'
            f'{_td(_duration(r.stream_seconds), "n")}{_td(r.reason, "why")}</tr>')
    out.append(f"<h2>Rooms <small>{_e(f'{snap.rooms_listed:,} live or ended in the last {recent}')}"
               "</small></h2>")
    out.append(_table([("State", False), ("Tenant", False), ("Room", False), ("Session", False),
                       ("Tier", False), ("Worker", False), ("Quality", False), ("Output", False),
                       ("Frames", True), ("Late", True), ("A/V offset", True), ("Streamed", True),
                       ("Reason", False)],
                      rows, "No rooms."))
    out.append(_more(max(snap.rooms_listed, len(snap.rooms)) - len(shown), "rooms",
                     f"the page lists {len(shown):,}, failed and waiting rooms first"))

    rows = [f"<tr>{_td(q.position, 'n')}{_td(q.tenant, 'id')}{_td(q.room_id, 'id')}{_td(_label(q.tier))}"
            f"{_td(q.quality)}{_td(f'{q.units:.2f}', 'n')}{_td(_duration(q.waiting_seconds), 'n')}"
            f"{_td(q.reason, 'why')}</tr>" for q in snap.queue[:QUEUE_ROWS]]
    out.append(f"<h2>Admission queue <small>{_e(f'{t.queue_length:,} waiting')}</small></h2>")
    out.append(_table([("#", True), ("Tenant", False), ("Room", False), ("Tier", False),
                       ("Quality", False), ("Units", True), ("Waiting", True), ("Why", False)],
                      rows, "No room is waiting."))
    out.append(_more(t.queue_length - len(rows), "waiting rooms", "this is the head of the queue"))

    rows = []
    for w in snap.workers[:WORKER_ROWS]:
        pct = min(max(w.utilisation, 0.0), 1.0) * 100
        state = "draining" if w.draining or not w.accepting else "accepting"
        note = f"{w.drain_reason}; stopped in {w.drain_seconds_left:.0f} s" if w.draining else ""
        rows.append(
            f"<tr><td>{_badge(state, state)}</td>{_td(w.worker_id, 'id')}{_td(w.device_type)}"
            f"{_td(w.provider)}"
            f'<td><span class="bar"><i style="width:{pct:.0f}%"></i></span>'
            f"{_e(f'{w.utilisation:.0%}')}</td>"
            f"{_td(f'{w.load:.2f} / {w.capacity:.2f}', 'n')}{_td(w.rooms, 'n')}"
            f"{_td(f'{w.seen_seconds_ago:.0f} s ago', 'n')}{_td(note, 'why')}</tr>")
    out.append(f"<h2>Workers <small>{_e(f'{t.workers:,} connected')}</small></h2>")
    out.append(_table([("State", False), ("Worker", False), ("Device", False), ("Provider", False),
                       ("Utilisation", False), ("Load / capacity", True), ("Rooms", True),
                       ("Last heard", True), ("Note", False)], rows, "No worker is connected."))
    out.append(_more(t.workers - len(rows), "workers", f"the page lists {len(rows):,}, by id"))

    if snap.pools:
        rows = [f"<tr>{_td(p.name)}{_td(p.device_type)}{_td(p.desired, 'n')}{_td(p.ready, 'n')}"
                f"{_td(p.booting, 'n')}{_td(p.draining, 'n')}{_td(p.reason, 'why')}</tr>"
                for p in snap.pools]
        out.append("<h2>Worker pools <small>sized by the autoscaler</small></h2>")
        out.append(_table([("Pool", False), ("Device", False), ("Desired", True), ("Ready", True),
                           ("Booting", True), ("Draining", True), ("Why", False)], rows, ""))

    rows = [f"<tr>{_td(_label(c.tier))}{_td(c.device_type)}"
            f"{_td(_amount(c.price_per_device_hour), 'n')}{_td(_amount(c.stream_hours), 'n')}"
            f"{_td(_amount(c.device_hours), 'n')}{_td(_amount(c.cost), 'n')}"
            f"{_td(_amount(c.cost_per_stream_hour), 'n')}</tr>" for c in snap.costs]
    if rows:
        rows.append(f"<tr><th>All</th><th></th><th></th>"
                    f'<th class="n">{_e(_amount(t.stream_hours))}</th><th></th>'
                    f'<th class="n">{_e(_amount(t.cost))}</th>'
                    f'<th class="n">{_e(_amount(t.cost_per_stream_hour))}</th></tr>')
    out.append("<h2>Cost per stream-hour <small>device time attributed to rooms' frames, "
               "since the scheduler started</small></h2>")
    out.append(_table([("Tier", False), ("Device", False), ("Price per device-hour", True),
                       ("Stream hours", True), ("Device hours", True), ("Cost", True),
                       ("Per stream-hour", True)], rows, "No stream time recorded yet."))
    out.append("</main></body></html>\n")
    return "".join(out)


def to_json(snap: StatusSnapshot, *, age_seconds: float = 0.0) -> str:
    return json.dumps({"age_seconds": round(age_seconds, 3), **dataclasses.asdict(snap)},
                      separators=(",", ":"))


# -- publishing ---------------------------------------------------------------------

_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'")


def _no_pools(cluster: ClusterSnapshot) -> Sequence[PoolRow]:
    return ()


class StatusBoard:
    """The latest snapshot, published from the event loop and read by the HTTP threads.
    Publishing replaces one reference, so a reader sees the old snapshot or the new one,
    never a mix, and needs no lock."""

    def __init__(self, *, interval: float = PUBLISH_SECONDS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._monotonic = monotonic
        self._latest: tuple[StatusSnapshot, float] | None = None

    def put(self, snap: StatusSnapshot) -> None:
        self._latest = (snap, self._monotonic())

    def latest(self) -> tuple[StatusSnapshot, float] | None:
        """The latest snapshot and its age in seconds; None before the first."""
        latest = self._latest
        if latest is None:
            return None
        return latest[0], max(0.0, self._monotonic() - latest[1])

    async def publish(self, core: Scheduler,
                      pools: Callable[[ClusterSnapshot], Sequence[PoolRow]] = _no_pools) -> None:
        """On the core's loop, until cancelled: a fresh snapshot every interval."""
        while True:
            try:
                cluster = core.latest or core.snapshot()  # the last tick's read model
                self.put(snapshot(cluster, pools(cluster)))
            except Exception:  # the page shows its age; the next pass retries
                log.exception("status snapshot failed")
            await asyncio.sleep(self.interval)

    @property
    def stale_after(self) -> float:
        return max(5.0, 5 * self.interval)

    def pages(self) -> dict[str, PageHandler]:
        return {"/": self._index, "/status": self._html, "/status.json": self._json}

    def _index(self) -> Page:
        return Page(b'<!doctype html><a href="status">status</a>\n', "text/html; charset=utf-8",
                    "302 Found", (("Location", "status"),))

    def _starting(self) -> Page:
        return Page(b"the scheduler is starting; no status yet\n", "text/plain; charset=utf-8",
                    "503 Service Unavailable", (("Retry-After", "1"),))

    def _html(self) -> Page:
        latest = self.latest()
        if latest is None:
            return self._starting()
        snap, age = latest
        body = render_html(snap, age_seconds=age, stale_after=self.stale_after).encode()
        return Page(body, "text/html; charset=utf-8",
                    headers=(("Content-Security-Policy", _CSP), ("Referrer-Policy", "no-referrer")))

    def _json(self) -> Page:
        latest = self.latest()
        if latest is None:
            return self._starting()
        snap, age = latest
        return Page(to_json(snap, age_seconds=age).encode(), "application/json")
