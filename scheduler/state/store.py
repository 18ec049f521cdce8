"""Durable scheduler state behind a small interface; SQLite by default.

Every change is committed before the API call that made it returns, so a
restarted scheduler sees every session it ever acknowledged. A server database
can replace SQLite by implementing the same Protocol.
"""

from __future__ import annotations

import concurrent.futures
import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from avatarfarm import convert
from avatarfarm.domain import Progress, Quality, ScriptSegment, SessionState, Tier
from avatarfarm.v1 import types_pb2
from scheduler.policy.ledger import Interval
from scheduler.policy.licences import Licence
from scheduler.state.avatars import (
    AuditAction,
    AuditEntry,
    AvatarStore,
    RegisteredAvatar,
    RegisteredVoice,
    VoiceKind,
    VoiceSettings,
)
from scheduler.state.sessions import Session


class Store(AvatarStore, Protocol):
    """Writes are queued in order; ``commit`` makes them durable in one transaction, and
    ``commit_async`` does so on the store's writer thread (the core commits once per
    event-loop turn, so concurrent calls share one sync, and the loop never waits on the
    disk)."""

    def load_sessions(self) -> list[Session]: ...
    def put_session(self, s: Session) -> None: ...
    def put_sessions(self, sessions: list[Session]) -> None: ...
    def find_request(self, tenant: str, request_id: str) -> str | None: ...
    def append_script(self, session_id: str, segments: list[ScriptSegment]) -> None: ...
    def script(self, session_id: str) -> list[ScriptSegment]: ...
    def load_usage(self) -> tuple[list[Interval], dict[str, tuple[int, int]]]: ...
    def put_usage(self, intervals: list[Interval], cursors: dict[str, tuple[int, int]]) -> None: ...
    def commit(self) -> None: ...
    def commit_async(self) -> concurrent.futures.Future[None]: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    spec BLOB NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    input_endpoint TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    progress BLOB NOT NULL,
    provider TEXT NOT NULL,
    device_type TEXT NOT NULL,
    load REAL NOT NULL,
    units REAL NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    rendering TEXT NOT NULL DEFAULT '',
    guaranteed INTEGER NOT NULL DEFAULT 0,
    step_changed_at REAL NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,
    base BLOB NOT NULL DEFAULT x'',
    assignments INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS sessions_request
    ON sessions (tenant, request_id) WHERE request_id != '';
CREATE TABLE IF NOT EXISTS usage_intervals (
    session_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    avatar_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    quality TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    device_type TEXT NOT NULL,
    units REAL NOT NULL,
    start REAL NOT NULL,
    "end" REAL NOT NULL,
    stream_seconds REAL NOT NULL,
    device_seconds REAL NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0,
    mark_stream REAL NOT NULL DEFAULT 0,
    mark_device REAL NOT NULL DEFAULT 0,
    platform TEXT NOT NULL DEFAULT '',
    voice TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (session_id, idx)
);
CREATE TABLE IF NOT EXISTS usage_cursors (
    worker_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS avatars (
    avatar_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    licence TEXT NOT NULL,
    voice TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    registered_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    revoked_reason TEXT NOT NULL DEFAULT '',
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS voices (
    voice_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    licence TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    registered_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    revoked_reason TEXT NOT NULL DEFAULT '',
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    avatar_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    action TEXT NOT NULL,
    session_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    platform TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    clause TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_avatar ON audit_log (avatar_id, seq);
-- The audit log only grows: what was written stays as written.
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS script_segments (
    session_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    pause_after REAL NOT NULL,
    PRIMARY KEY (session_id, idx)
);
"""


_ADDED_COLUMNS = (("units", "REAL NOT NULL DEFAULT 0"), ("step", "INTEGER NOT NULL DEFAULT 0"),
                  ("rendering", "TEXT NOT NULL DEFAULT ''"),
                  ("guaranteed", "INTEGER NOT NULL DEFAULT 0"),
                  ("step_changed_at", "REAL NOT NULL DEFAULT 0"),
                  ("epoch", "INTEGER NOT NULL DEFAULT 0"), ("base", "BLOB NOT NULL DEFAULT x''"),
                  ("assignments", "INTEGER NOT NULL DEFAULT 0"))

_ADDED_USAGE = (("epoch", "INTEGER NOT NULL DEFAULT 0"), ("mark_stream", "REAL NOT NULL DEFAULT 0"),
                ("mark_device", "REAL NOT NULL DEFAULT 0"), ("platform", "TEXT NOT NULL DEFAULT ''"),
                ("voice", "TEXT NOT NULL DEFAULT ''"))

Op = Callable[[sqlite3.Connection], None]


class SqliteStore:
    def __init__(self, path: Path, sync_to_disk: bool = True) -> None:
        """sync_to_disk=False keeps WAL commits out of fsync: a scheduler crash loses
        nothing, a host crash may lose the last commits (workers re-register their rooms)."""
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if sync_to_disk else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        for table, added in (("sessions", _ADDED_COLUMNS), ("usage_intervals", _ADDED_USAGE)):
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column, decl in added:
                if column not in have:  # a database from before the column existed
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        self._ops: list[Op] = []
        self._known: set[str] = set()
        # One lock for the connection: the writer thread's transactions and the few
        # reads (start-up, scripts) never interleave.
        self._lock = threading.Lock()
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")

    def _queue(self, op: Op) -> None:
        self._ops.append(op)

    def _run(self, ops: list[Op]) -> None:
        if not ops:
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for op in ops:
                    op(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def commit(self) -> None:
        """Everything queued so far, durable when this returns."""
        ops, self._ops = self._ops, []
        self._writer.submit(self._run, ops).result()

    def commit_async(self) -> concurrent.futures.Future[None]:
        """Everything queued so far, in one transaction on the writer thread (in order)."""
        ops, self._ops = self._ops, []
        return self._writer.submit(self._run, ops)

    def load_sessions(self) -> list[Session]:
        self.commit()
        with self._lock:
            rows = self._db.execute(
                "SELECT session_id, seq, request_id, spec, state, reason, worker_id,"
                " input_endpoint, created_at, updated_at, progress, provider, device_type, load,"
                " units, step, rendering, guaranteed, step_changed_at, epoch, base,"
                " assignments FROM sessions"
                " ORDER BY seq").fetchall()
        out = []
        for (sid, seq, rid, spec, state, reason, worker, endpoint, created, updated, progress,
             provider, device_type, load, units, step, rendering, guaranteed, changed, epoch,
             base, assignments) in rows:
            spec_pb = types_pb2.SessionSpec.FromString(spec)
            prog = convert.progress_from_pb(types_pb2.SessionProgress.FromString(progress))
            self._known.add(sid)
            out.append(Session(sid, convert.spec_from_trusted(spec_pb), SessionState(state), seq, created,
                               updated, rid, reason, worker, endpoint, prog, provider, device_type,
                               load, units, step, _quality(rendering), bool(guaranteed), changed,
                               epoch, _progress(base), assignments))
        return out

    def put_session(self, s: Session) -> None:
        self.put_sessions([s])

    def put_sessions(self, sessions: list[Session]) -> None:
        # The spec never changes after creation: an update skips re-encoding it.
        updates = [s for s in sessions if s.session_id in self._known]
        inserts = [s for s in sessions if s.session_id not in self._known]
        self._known.update(s.session_id for s in inserts)

        def op(db: sqlite3.Connection) -> None:
            if updates:
                db.executemany(
                    "UPDATE sessions SET state=?, reason=?, worker_id=?, input_endpoint=?,"
                    " updated_at=?, progress=?, provider=?, device_type=?, load=?, units=?,"
                    " step=?, rendering=?, guaranteed=?, step_changed_at=?, epoch=?, base=?,"
                    " assignments=?"
                    " WHERE session_id=?",
                    [(s.state.value, s.reason, s.worker_id, s.input_endpoint, s.updated_at,
                      convert.progress_to_pb(s.progress).SerializeToString(), s.provider,
                      s.device_type, s.load, s.units, s.step,
                      str(s.rendering) if s.rendering else "", int(s.guaranteed),
                      s.step_changed_at, s.epoch, _progress_blob(s.base), s.assignments,
                      s.session_id)
                     for s in updates])
            if inserts:
                db.executemany(
                    "INSERT OR REPLACE INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [(s.session_id, s.seq, s.spec.tenant, s.request_id,
                      convert.spec_to_pb(s.spec).SerializeToString(), s.state.value, s.reason,
                      s.worker_id, s.input_endpoint, s.created_at, s.updated_at,
                      convert.progress_to_pb(s.progress).SerializeToString(), s.provider,
                      s.device_type, s.load, s.units, s.step,
                      str(s.rendering) if s.rendering else "", int(s.guaranteed),
                      s.step_changed_at, s.epoch, _progress_blob(s.base), s.assignments)
                     for s in inserts])

        self._queue(op)

    def load_usage(self) -> tuple[list[Interval], dict[str, tuple[int, int]]]:
        self.commit()
        with self._lock:
            rows = self._db.execute(
                'SELECT session_id, idx, tenant, avatar_id, tier, quality, worker_id,'
                ' device_type, units, start, "end", stream_seconds, device_seconds, epoch,'
                ' mark_stream, mark_device, platform, voice FROM usage_intervals').fetchall()
            cursors = {w: (e, q) for w, e, q in
                       self._db.execute("SELECT worker_id, epoch, seq FROM usage_cursors")}
        ivs = [Interval(sid, idx, tenant, avatar, Tier(tier), quality, worker, dev, units, start,
                        end, stream, device, epoch, mark_s, mark_d, platform, voice)
               for (sid, idx, tenant, avatar, tier, quality, worker, dev, units, start, end, stream,
                    device, epoch, mark_s, mark_d, platform, voice) in rows]
        return ivs, cursors

    def put_usage(self, intervals: list[Interval], cursors: dict[str, tuple[int, int]]) -> None:
        rows = [(i.session_id, i.idx, i.tenant, i.avatar_id, i.tier.value, i.quality, i.worker_id,
                 i.device_type, i.units, i.start, i.end, i.stream_seconds, i.device_seconds,
                 i.epoch, i.mark_stream, i.mark_device, i.platform, i.voice)
                for i in intervals]  # a snapshot: the intervals change after this call

        def op(db: sqlite3.Connection) -> None:
            db.executemany("INSERT OR REPLACE INTO usage_intervals VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           rows)
            db.executemany("INSERT OR REPLACE INTO usage_cursors VALUES (?,?,?)",
                           [(w, e, q) for w, (e, q) in cursors.items()])

        self._queue(op)

    def find_request(self, tenant: str, request_id: str) -> str | None:
        self.commit()
        with self._lock:
            row = self._db.execute("SELECT session_id FROM sessions WHERE tenant=?"
                                   " AND request_id=? AND request_id != ''",
                                   (tenant, request_id)).fetchone()
        return row[0] if row else None

    def append_script(self, session_id: str, segments: list[ScriptSegment]) -> None:
        rows = [(s.text, s.pause_after_seconds) for s in segments]

        def op(db: sqlite3.Connection) -> None:
            (start,) = db.execute(
                "SELECT COALESCE(MAX(idx) + 1, 0) FROM script_segments WHERE session_id=?",
                (session_id,)).fetchone()
            db.executemany("INSERT INTO script_segments VALUES (?,?,?,?)",
                           [(session_id, start + i, t, p) for i, (t, p) in enumerate(rows)])

        self._queue(op)

    def script(self, session_id: str) -> list[ScriptSegment]:
        self.commit()
        with self._lock:
            rows = self._db.execute(
                "SELECT text, pause_after FROM script_segments WHERE session_id=? ORDER BY idx",
                (session_id,)).fetchall()
        return [ScriptSegment(t, p) for t, p in rows]

    def load_avatars(self) -> list[RegisteredAvatar]:
        self.commit()
        with self._lock:
            rows = self._db.execute(
                "SELECT avatar_id, tenant, licence, voice, image_sha256, width, height,"
                " registered_at, revoked, revoked_reason, revoked_at FROM avatars"
                " ORDER BY avatar_id").fetchall()
        return [RegisteredAvatar(aid, tenant, _licence(lic), registered, VoiceSettings(**json.loads(voice)),
                                 sha, width, height, bool(revoked), why, revoked_at)
                for (aid, tenant, lic, voice, sha, width, height, registered, revoked, why,
                     revoked_at) in rows]

    def load_voices(self) -> list[RegisteredVoice]:
        self.commit()
        with self._lock:
            rows = self._db.execute(
                "SELECT voice_id, tenant, licence, kind, sha256, registered_at, revoked,"
                " revoked_reason, revoked_at FROM voices ORDER BY voice_id").fetchall()
        return [RegisteredVoice(vid, tenant, _licence(lic), registered, VoiceKind(kind), sha,
                                bool(revoked), why, revoked_at)
                for (vid, tenant, lic, kind, sha, registered, revoked, why, revoked_at) in rows]

    def put_voice(self, voice: RegisteredVoice) -> None:
        v = voice
        row = (v.voice_id, v.tenant, _licence_json(v.licence), v.kind.value, v.sha256,
               v.registered_at, int(v.revoked), v.revoked_reason, v.revoked_at)

        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO voices VALUES (?,?,?,?,?,?,?,?,?)", row)

        self._queue(op)

    def put_avatar(self, avatar: RegisteredAvatar) -> None:
        a = avatar
        row = (a.avatar_id, a.tenant, _licence_json(a.licence),
               json.dumps({"voice": a.voice.voice, "rate": a.voice.rate, "pitch": a.voice.pitch}),
               a.image_sha256, a.width, a.height, a.registered_at, int(a.revoked),
               a.revoked_reason, a.revoked_at)

        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO avatars VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)

        self._queue(op)

    def append_audit(self, entry: AuditEntry) -> None:
        e = entry
        row = (e.seq, e.at, e.avatar_id, e.tenant, e.action.value, e.session_id, e.room_id,
               e.platform, e.worker_id, e.clause, e.detail)

        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO audit_log VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)

        self._queue(op)

    def last_audit_seq(self) -> int:
        self.commit()
        with self._lock:
            (seq,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM audit_log").fetchone()
        return int(seq)

    def audit_entries(self, avatar_id: str, after_seq: int, limit: int) -> list[AuditEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, at, avatar_id, tenant, action, session_id, room_id, platform,"
                " worker_id, clause, detail FROM audit_log WHERE avatar_id=? AND seq>?"
                " ORDER BY seq LIMIT ?", (avatar_id, after_seq, limit)).fetchall()
        return [AuditEntry(seq, at, aid, tenant, AuditAction(action), sid, room, platform, worker,
                           clause, detail)
                for (seq, at, aid, tenant, action, sid, room, platform, worker, clause, detail)
                in rows]

    def close(self) -> None:
        self.commit()
        self._writer.shutdown()
        self._db.close()


def _quality(text: str) -> Quality | None:
    if not text:
        return None
    size, fps = text.split("@")
    w, h = size.split("x")
    return Quality(int(w), int(h), int(fps))


def _licence_json(lic: Licence) -> str:
    return json.dumps({
        "person_ref": lic.person_ref, "consent_record_id": lic.consent_record_id,
        "allowed_platforms": list(lic.allowed_platforms),
        "allowed_categories": list(lic.allowed_categories),
        "forbidden_categories": list(lic.forbidden_categories),
        "allowed_languages": list(lic.allowed_languages),
        "valid_from": lic.valid_from, "valid_until": lic.valid_until,
        "live_voice_conversion": lic.live_voice_conversion}, sort_keys=True)


def _licence(text: str) -> Licence:
    d = json.loads(text)
    return Licence(d["person_ref"], d["consent_record_id"], tuple(d["allowed_platforms"]),
                   tuple(d["allowed_categories"]), tuple(d["forbidden_categories"]),
                   tuple(d["allowed_languages"]), d["valid_from"], d["valid_until"],
                   d["live_voice_conversion"])


def _progress(blob: bytes) -> Progress:
    return convert.progress_from_pb(types_pb2.SessionProgress.FromString(blob or b""))


def _progress_blob(p: Progress) -> bytes:
    if p == Progress():
        return b""
    return convert.progress_to_pb(p).SerializeToString()
