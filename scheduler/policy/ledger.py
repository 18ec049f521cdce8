"""The usage ledger: what each room used, on what, at what quality. Pure data;
the store persists it.

A room's life is a list of intervals, one per (tier, quality in force, worker,
device type, compute units): placing, moving, degrading or restoring a room
closes its interval and opens the next. Progress reports add stream-seconds and
attributed device-seconds to the open interval. Reports come from workers in
sequence-numbered batches per worker run (epoch): a batch whose sequence number
was already applied is ignored (a retry), a jump counts the batches lost in
between (progress being cumulative, what they carried arrives with the next).

Within a batch each room's progress is cumulative over its current assignment
(the room's assignment epoch; a worker counts from zero when it takes a room).
The interval keeps the mark: how much of that assignment's cumulative progress
is already in the ledger. Usage is the progress beyond the mark, so a report
applied twice, replayed after a crash of either side, or from an assignment
that is no longer the room's current one adds nothing. The marks, intervals and
report cursors are written in one transaction: the ledger is exactly-once on
its own, whatever else the store holds.

Reports group intervals by tenant, tier, avatar, its registered voice, platform and
device type; a window that
cuts an interval takes the share of it that falls in the window.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from avatarfarm.domain import Tier


@dataclass(slots=True)
class Interval:
    session_id: str
    idx: int
    tenant: str
    avatar_id: str
    tier: Tier
    quality: str
    worker_id: str
    device_type: str
    units: float
    start: float
    end: float = 0.0  # 0: still open
    stream_seconds: float = 0.0
    device_seconds: float = 0.0
    epoch: int = 0  # the room's assignment this interval belongs to
    mark_stream: float = 0.0  # the assignment's cumulative progress already counted
    mark_device: float = 0.0
    platform: str = ""  # where the stream was shown (the room's spec)
    voice: str = ""  # the registered voice it spoke with ("": none registered)

    def share(self, start: float | None, end: float | None, now: float) -> float:
        """Fraction of this interval inside [start, end)."""
        lo, hi = self.start, self.end or now
        if hi <= lo:
            inside = (start is None or lo >= start) and (end is None or lo < end)
            return 1.0 if inside else 0.0
        a = lo if start is None else max(lo, start)
        b = hi if end is None else min(hi, end)
        return max(0.0, b - a) / (hi - lo)


class Dimension(enum.Enum):
    TENANT = "tenant"
    TIER = "tier"
    AVATAR = "avatar"
    DEVICE_TYPE = "device_type"
    PLATFORM = "platform"
    VOICE = "voice"


@dataclass(slots=True)
class UsageRow:
    tenant: str = ""
    tier: Tier | None = None
    avatar_id: str = ""
    device_type: str = ""
    platform: str = ""
    voice: str = ""
    sessions: set[str] = field(default_factory=set)
    stream_seconds: float = 0.0
    device_seconds: float = 0.0
    compute_unit_seconds: float = 0.0
    cost: float = 0.0

    @property
    def cost_per_stream_hour(self) -> float:
        return self.cost * 3600.0 / self.stream_seconds if self.stream_seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class ReportVerdict:
    apply: bool
    lost: int = 0  # reports skipped between the last applied and this one


class Ledger:
    def __init__(self, price: Callable[[str], float]) -> None:
        self.price = price
        self.intervals: dict[str, list[Interval]] = {}
        self.dirty: dict[tuple[str, int], Interval] = {}
        self.cursors: dict[str, tuple[int, int]] = {}  # worker_id -> (epoch, last seq)
        self.dirty_cursors: set[str] = set()

    def load(self, intervals: Iterable[Interval], cursors: dict[str, tuple[int, int]]) -> None:
        for iv in sorted(intervals, key=lambda i: (i.session_id, i.idx)):
            self.intervals.setdefault(iv.session_id, []).append(iv)
        self.cursors.update(cursors)

    def current(self, session_id: str) -> Interval | None:
        ivs = self.intervals.get(session_id)
        return ivs[-1] if ivs and not ivs[-1].end else None

    def open(self, session_id: str, *, tenant: str, avatar_id: str, tier: Tier, quality: str,
             worker_id: str, device_type: str, units: float, now: float,
             epoch: int = 0, platform: str = "", voice: str = "") -> Interval:
        """Close the room's open interval (if any) and open one with these attributes.
        Within one assignment (a quality change) the mark carries over."""
        self.close(session_id, now)
        ivs = self.intervals.setdefault(session_id, [])
        last = ivs[-1] if ivs else None
        same = last is not None and last.epoch == epoch
        iv = Interval(session_id, len(ivs), tenant, avatar_id, tier, quality, worker_id,
                      device_type, units, now, epoch=epoch,
                      mark_stream=last.mark_stream if same and last else 0.0,
                      mark_device=last.mark_device if same and last else 0.0,
                      platform=platform, voice=voice)
        ivs.append(iv)
        self.dirty[(session_id, iv.idx)] = iv
        return iv

    def close(self, session_id: str, now: float) -> None:
        iv = self.current(session_id)
        if iv is not None:
            iv.end = max(now, iv.start + 1e-6)
            self.dirty[(session_id, iv.idx)] = iv

    def add(self, session_id: str, epoch: int, stream_seconds: float,
            device_seconds: float) -> tuple[float, float]:
        """Counts an assignment's cumulative progress into the room's open interval (or
        its last, for a final report); returns the usage it added: what lies beyond the
        mark, nothing for a repeat or for an assignment that is not the last one."""
        ivs = self.intervals.get(session_id)
        if not ivs or ivs[-1].epoch != epoch:
            return 0.0, 0.0
        iv = ivs[-1]
        ds = max(0.0, stream_seconds - iv.mark_stream)
        dd = max(0.0, device_seconds - iv.mark_device)
        if ds <= 0 and dd <= 0:
            return 0.0, 0.0
        iv.mark_stream = max(iv.mark_stream, stream_seconds)
        iv.mark_device = max(iv.mark_device, device_seconds)
        iv.stream_seconds += ds
        iv.device_seconds += dd
        self.dirty[(session_id, iv.idx)] = iv
        return ds, dd

    def accept_report(self, worker_id: str, epoch: int, seq: int) -> ReportVerdict:
        last_epoch, last_seq = self.cursors.get(worker_id, (epoch, 0))
        if epoch != last_epoch:
            last_seq = 0  # the worker restarted: a new run counts from 1
        if seq <= last_seq:
            return ReportVerdict(False)
        self.cursors[worker_id] = (epoch, seq)
        self.dirty_cursors.add(worker_id)
        return ReportVerdict(True, seq - last_seq - 1)

    def last_seq(self, worker_id: str, epoch: int) -> int:
        e, s = self.cursors.get(worker_id, (epoch, 0))
        return s if e == epoch else 0

    def take_dirty(self, worker: Callable[[str], bool] | None = None
                   ) -> tuple[list[Interval], dict[str, tuple[int, int]]]:
        """The intervals and report cursors changed since last taken (only the workers
        `worker` accepts, where given: a worker's cursor goes with its intervals)."""
        if worker is None:
            ivs = list(self.dirty.values())
            cursors = {w: self.cursors[w] for w in self.dirty_cursors}
            self.dirty.clear()
            self.dirty_cursors.clear()
            return ivs, cursors
        keys = [k for k, iv in self.dirty.items() if worker(iv.worker_id)]
        ivs = [self.dirty.pop(k) for k in keys]
        taken = [w for w in self.dirty_cursors if worker(w)]
        self.dirty_cursors.difference_update(taken)
        return ivs, {w: self.cursors[w] for w in taken}

    def spent(self, tenant: str, since: float, now: float) -> float:
        """Money the tenant's rooms used since `since` (intervals cut at it pro rata)."""
        total = 0.0
        for ivs in self.intervals.values():
            for iv in ivs:
                if iv.tenant == tenant and (iv.end == 0 or iv.end > since):
                    total += iv.device_seconds * self.price(iv.device_type) / 3600.0 * \
                        iv.share(since, None, now)
        return total

    def report(self, now: float, *, tenant: str = "", group_by: Sequence[Dimension] = (),
               start: float | None = None, end: float | None = None) -> list[UsageRow]:
        rows: dict[tuple[object, ...], UsageRow] = {}
        for ivs in self.intervals.values():
            for iv in ivs:
                if tenant and iv.tenant != tenant:
                    continue
                share = iv.share(start, end, now)
                if share <= 0:
                    continue
                key = tuple(_dim(iv, d) for d in group_by)
                row = rows.get(key)
                if row is None:
                    row = rows[key] = UsageRow(
                        tenant=iv.tenant if Dimension.TENANT in group_by else "",
                        tier=iv.tier if Dimension.TIER in group_by else None,
                        avatar_id=iv.avatar_id if Dimension.AVATAR in group_by else "",
                        device_type=iv.device_type if Dimension.DEVICE_TYPE in group_by else "",
                        platform=iv.platform if Dimension.PLATFORM in group_by else "",
                        voice=iv.voice if Dimension.VOICE in group_by else "")
                row.sessions.add(iv.session_id)
                row.stream_seconds += iv.stream_seconds * share
                row.device_seconds += iv.device_seconds * share
                lo = iv.start if start is None else max(iv.start, start)
                hi = (iv.end or now) if end is None else min(iv.end or now, end)
                row.compute_unit_seconds += iv.units * max(0.0, hi - lo)
                row.cost += iv.device_seconds * share * self.price(iv.device_type) / 3600.0
        return [rows[k] for k in sorted(rows, key=lambda k: tuple(str(x) for x in k))]


def _dim(iv: Interval, d: Dimension) -> object:
    match d:
        case Dimension.TENANT:
            return iv.tenant
        case Dimension.TIER:
            return iv.tier.value
        case Dimension.AVATAR:
            return iv.avatar_id
        case Dimension.DEVICE_TYPE:
            return iv.device_type
        case Dimension.PLATFORM:
            return iv.platform
        case Dimension.VOICE:
            return iv.voice
