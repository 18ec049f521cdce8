"""Durable scheduler state behind a small interface; SQLite by default.

Every change is committed before the API call that made it returns, so a
restarted scheduler sees every session it ever acknowledged. SQLite is the embedded
default; PostgreSQL (`scheduler.state.postgres`) is the store of a replicated scheduler.
Both run the same statements, written once here, over the schema in `schema`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from avatarfarm import convert
from avatarfarm.domain import Progress, Quality, ScriptSegment, SessionState, Tier, Unavailable
from avatarfarm.v1 import types_pb2
from scheduler.policy.ledger import Interval
from scheduler.policy.licences import Licence
from scheduler.state import schema
from scheduler.state.avatars import (
    AuditAction,
    AuditEntry,
    AvatarStore,
    RegisteredAvatar,
    RegisteredVoice,
    VoiceKind,
    VoiceSettings,
)
from scheduler.state.schema import Dialect
from scheduler.state.sessions import Session


class LeaseStore(Protocol):
    """Leadership among schedulers sharing the store (see scheduler.state.leadership)."""

    def claim_lead(self, holder: str, address: str, ttl: float, *, force: bool = False) -> int | None: ...
    def renew_lead(self, holder: str, epoch: int, ttl: float) -> bool: ...
    def release_lead(self, holder: str, epoch: int) -> None: ...
    def leader(self) -> Lease | None: ...
    def fence(self, epoch: int) -> None: ...


class Store(AvatarStore, LeaseStore, Protocol):
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


SESSION_COLUMNS = ("session_id", "seq", "tenant", "request_id", "spec", "state", "reason",
                   "worker_id", "input_endpoint", "created_at", "updated_at", "progress",
                   "provider", "device_type", "load", "units", "step", "rendering", "guaranteed",
                   "step_changed_at", "epoch", "base", "assignments")
# What changes after a session is created (its spec, tenant and request id never do).
SESSION_CHANGES = SESSION_COLUMNS[5:9] + SESSION_COLUMNS[10:]
USAGE_COLUMNS = ("session_id", "idx", "tenant", "avatar_id", "tier", "quality", "worker_id",
                 "device_type", "units", "start", "end", "stream_seconds", "device_seconds",
                 "epoch", "mark_stream", "mark_device", "platform", "voice")
AVATAR_COLUMNS = ("avatar_id", "tenant", "licence", "voice", "image_sha256", "width", "height",
                  "registered_at", "revoked", "revoked_reason", "revoked_at")
VOICE_COLUMNS = ("voice_id", "tenant", "licence", "kind", "sha256", "registered_at", "revoked",
                 "revoked_reason", "revoked_at")
AUDIT_COLUMNS = ("seq", "at", "avatar_id", "tenant", "action", "session_id", "room_id",
                 "platform", "worker_id", "clause", "detail")


def _names(columns: tuple[str, ...]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


def _insert(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({_names(columns)}) VALUES ({', '.join('?' * len(columns))})"


def _upsert(table: str, columns: tuple[str, ...], keys: tuple[str, ...]) -> str:
    """Insert or replace by primary key, in the syntax SQLite and PostgreSQL share."""
    changes = ", ".join(f'"{c}" = excluded."{c}"' for c in columns if c not in keys)
    return f"{_insert(table, columns)} ON CONFLICT ({_names(keys)}) DO UPDATE SET {changes}"


_UPDATE_SESSION = (f"UPDATE sessions SET {', '.join(f'{c}=?' for c in SESSION_CHANGES)}"
                   " WHERE session_id=?")
_PUT_SESSION = _upsert("sessions", SESSION_COLUMNS, ("session_id",))
_PUT_USAGE = _upsert("usage_intervals", USAGE_COLUMNS, ("session_id", "idx"))
_PUT_CURSOR = _upsert("usage_cursors", ("worker_id", "epoch", "seq"), ("worker_id",))
_PUT_AVATAR = _upsert("avatars", AVATAR_COLUMNS, ("avatar_id",))
_PUT_VOICE = _upsert("voices", VOICE_COLUMNS, ("voice_id",))
_ADD_AUDIT = _insert("audit_log", AUDIT_COLUMNS)
_ADD_SEGMENT = _insert("script_segments", ("session_id", "idx", "text", "pause_after"))


class Connection(Protocol):
    """What the store uses of a DB-API connection (sqlite3's and psycopg's agree on it)."""

    def execute(self, sql: str, params: Any = ...) -> Any: ...
    def cursor(self) -> Any: ...
    def close(self) -> None: ...


Op = Callable[[Connection], None]


@dataclass(frozen=True, slots=True)
class _Done:
    """What a lease statement did: rows it changed, rows it read."""

    rowcount: int
    rows: list[Any]


class Fenced(Unavailable):
    """A newer leader holds the store: this scheduler may change nothing more (a caller
    of this scheduler gets UNAVAILABLE, and retries with the leader)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """The leadership row as read: who leads, under which epoch, for how much longer (by
    the database's clock), and where tenants and workers reach it."""

    holder: str
    epoch: int
    address: str
    remaining: float

    @property
    def held(self) -> bool:
        return self.remaining > 0


class SqlStore:
    """The store over one SQL connection, for any dialect whose subclass supplies the
    connection, its transactions and its placeholder. Statements are written with `?`."""

    dialect: Dialect
    # The database's clock in seconds since 1970: lease times are all read from one clock.
    NOW: str
    # Reads the lead's epoch in a transaction, and keeps a takeover waiting until it ends.
    LEAD_EPOCH: str

    def __init__(self, db: Connection) -> None:
        self._db = db
        self._fence: int | None = None
        self._ops: list[Op] = []
        self._audit: list[tuple[Any, ...]] | None = None  # this turn's audit entries
        self._known: set[str] = set()
        # One lock for the connection: the writer thread's transactions and the few
        # reads (start-up, scripts) never interleave.
        self._lock = threading.Lock()
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")

    # -- what a dialect supplies
    def _conn(self) -> Connection:
        return self._db

    def _sql(self, statement: str) -> str:
        return statement

    @contextlib.contextmanager
    def _transaction(self, pipelined: bool = False) -> Iterator[Connection]:
        """pipelined: the statements may go to a database server without waiting for each
        answer (a group commit's); in-process SQLite has no use for it."""
        # IMMEDIATE: the write lock from the start, so no other connection changes the
        # lease between the fence check and the writes.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- plumbing
    def _exec(self, db: Connection, statement: str, params: Any = ()) -> Any:
        return db.execute(self._sql(statement), params)

    def _many(self, db: Connection, statement: str, rows: list[Any]) -> None:
        if rows:
            db.cursor().executemany(self._sql(statement), rows)

    def _read(self, statement: str, params: Any = ()) -> list[Any]:
        with self._lock:
            return list(self._exec(self._conn(), statement, params).fetchall())

    def _queue(self, op: Op) -> None:
        self._ops.append(op)

    def _queue_one(self, statement: str, row: tuple[Any, ...]) -> None:
        def op(db: Connection) -> None:
            self._exec(db, statement, row)

        self._queue(op)

    def _run(self, ops: list[Op]) -> None:
        if not ops:
            return
        with self._lock, self._transaction(pipelined=True) as db:
            if self._fence is not None:
                row = self._exec(db, self.LEAD_EPOCH).fetchone()
                if row is None or int(row[0]) != self._fence:
                    raise Fenced(f"the store is led under epoch {row[0] if row else 'none'}, not "
                                 f"this scheduler's {self._fence}: a newer leader took over")
            for op in ops:
                op(db)

    # -- leadership: one lease row, its epoch raised by every new leader
    def _lease_conn(self) -> tuple[threading.Lock, Connection]:
        """The connection lease calls use (a renewal must not wait behind a commit)."""
        return self._lock, self._conn()

    def _lease_call(self, statement: str, params: tuple[Any, ...] = ()) -> _Done:
        """The statement on the lease's connection: what it changed and read."""
        lock, db = self._lease_conn()
        with lock:
            cur = self._exec(db, statement, params)
            return _Done(cur.rowcount, cur.fetchall() if cur.description else [])

    # No RETURNING in the statements both dialects run: SQLite has had it only since
    # 3.35, and older ones are still the system's on some distributions.
    def claim_lead(self, holder: str, address: str, ttl: float, *, force: bool = False) -> int | None:
        """Takes the lead for `ttl` seconds where nobody holds it (or `force`, for a store
        only one scheduler can open): the new epoch, or None while another leads."""
        with self._lock, self._transaction() as db:
            claimed = self._exec(db, self._claim_sql(), (holder, address, ttl, int(force)))
            if claimed.rowcount != 1:
                return None
            (epoch,) = self._exec(db, "SELECT epoch FROM leadership WHERE id = 1").fetchone()
        return int(epoch)

    def _claim_sql(self) -> str:
        return ("INSERT INTO leadership (id, holder, epoch, address, expires_at)"
                f" VALUES (1, ?, 1, ?, {self.NOW} + ?)"
                " ON CONFLICT (id) DO UPDATE SET holder = excluded.holder,"
                " epoch = leadership.epoch + 1, address = excluded.address,"
                f" expires_at = excluded.expires_at WHERE leadership.expires_at <= {self.NOW}"
                " OR ? = 1")

    def renew_lead(self, holder: str, epoch: int, ttl: float) -> bool:
        """Extends the lease this scheduler holds; False if it no longer holds it."""
        done = self._lease_call(
            f"UPDATE leadership SET expires_at = {self.NOW} + ? WHERE id = 1 AND holder = ?"
            " AND epoch = ?", (ttl, holder, epoch))
        return done.rowcount == 1

    def release_lead(self, holder: str, epoch: int) -> None:
        """Ends the lease now (a clean shutdown): a follower need not wait it out."""
        self._lease_call(f"UPDATE leadership SET expires_at = {self.NOW} WHERE id = 1"
                         " AND holder = ? AND epoch = ?", (holder, epoch))

    def leader(self) -> Lease | None:
        rows = self._lease_call(f"SELECT holder, epoch, address, expires_at - {self.NOW}"
                                " FROM leadership WHERE id = 1").rows
        return Lease(rows[0][0], int(rows[0][1]), rows[0][2], float(rows[0][3])) if rows else None

    def fence(self, epoch: int) -> None:
        """From now on every commit checks, in its transaction, that the store is still
        led under `epoch`, and fails with `Fenced` otherwise."""
        self._fence = epoch

    def migrate(self) -> None:
        """Applies the schema's missing migrations (`schema.MIGRATIONS`), in order."""
        with self._lock:
            self._migrate()

    def _migrate(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        """Everything queued so far, durable when this returns."""
        ops, self._ops, self._audit = self._ops, [], None
        self._writer.submit(self._run, ops).result()

    def commit_async(self) -> concurrent.futures.Future[None]:
        """Everything queued so far, in one transaction on the writer thread (in order)."""
        ops, self._ops, self._audit = self._ops, [], None
        return self._writer.submit(self._run, ops)

    def load_sessions(self) -> list[Session]:
        self.commit()
        rows = self._read(f"SELECT {', '.join(SESSION_COLUMNS)} FROM sessions ORDER BY seq")
        out = []
        for (sid, seq, _tenant, rid, spec, state, reason, worker, endpoint, created, updated,
             progress, provider, device_type, load, units, step, rendering, guaranteed, changed,
             epoch, base, assignments) in rows:
            spec_pb = types_pb2.SessionSpec.FromString(bytes(spec))
            prog = convert.progress_from_pb(types_pb2.SessionProgress.FromString(bytes(progress)))
            self._known.add(sid)
            out.append(Session(sid, convert.spec_from_trusted(spec_pb), SessionState(state), seq, created,
                               updated, rid, reason, worker, endpoint, prog, provider, device_type,
                               load, units, step, _quality(rendering), bool(guaranteed), changed,
                               epoch, _progress(bytes(base)), assignments))
        return out

    def put_session(self, s: Session) -> None:
        self.put_sessions([s])

    def put_sessions(self, sessions: list[Session]) -> None:
        # The spec never changes after creation: an update skips re-encoding it.
        updates = [s for s in sessions if s.session_id in self._known]
        inserts = [s for s in sessions if s.session_id not in self._known]
        self._known.update(s.session_id for s in inserts)
        changed = [(*_changes(s), s.session_id) for s in updates]
        added = [_row(s) for s in inserts]

        def op(db: Connection) -> None:
            self._many(db, _UPDATE_SESSION, changed)
            self._many(db, _PUT_SESSION, added)

        self._queue(op)

    def load_usage(self) -> tuple[list[Interval], dict[str, tuple[int, int]]]:
        self.commit()
        rows = self._read(f"SELECT {_names(USAGE_COLUMNS)} FROM usage_intervals")
        cursors = {w: (e, q) for w, e, q in
                   self._read("SELECT worker_id, epoch, seq FROM usage_cursors")}
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
        marks = [(w, e, q) for w, (e, q) in cursors.items()]

        def op(db: Connection) -> None:
            self._many(db, _PUT_USAGE, rows)
            self._many(db, _PUT_CURSOR, marks)

        self._queue(op)

    def find_request(self, tenant: str, request_id: str) -> str | None:
        self.commit()
        rows = self._read("SELECT session_id FROM sessions WHERE tenant=?"
                          " AND request_id=? AND request_id != ''", (tenant, request_id))
        return str(rows[0][0]) if rows else None

    def append_script(self, session_id: str, segments: list[ScriptSegment]) -> None:
        rows = [(s.text, s.pause_after_seconds) for s in segments]

        def op(db: Connection) -> None:
            (start,) = self._exec(
                db, "SELECT COALESCE(MAX(idx) + 1, 0) FROM script_segments WHERE session_id=?",
                (session_id,)).fetchone()
            self._many(db, _ADD_SEGMENT,
                       [(session_id, start + i, t, p) for i, (t, p) in enumerate(rows)])

        self._queue(op)

    def script(self, session_id: str) -> list[ScriptSegment]:
        self.commit()
        rows = self._read("SELECT text, pause_after FROM script_segments WHERE session_id=?"
                          " ORDER BY idx", (session_id,))
        return [ScriptSegment(t, p) for t, p in rows]

    def load_avatars(self) -> list[RegisteredAvatar]:
        self.commit()
        rows = self._read(f"SELECT {_names(AVATAR_COLUMNS)} FROM avatars ORDER BY avatar_id")
        return [RegisteredAvatar(aid, tenant, _licence(lic), registered, VoiceSettings(**json.loads(voice)),
                                 sha, width, height, bool(revoked), why, revoked_at)
                for (aid, tenant, lic, voice, sha, width, height, registered, revoked, why,
                     revoked_at) in rows]

    def load_voices(self) -> list[RegisteredVoice]:
        self.commit()
        rows = self._read(f"SELECT {_names(VOICE_COLUMNS)} FROM voices ORDER BY voice_id")
        return [RegisteredVoice(vid, tenant, _licence(lic), registered, VoiceKind(kind), sha,
                                bool(revoked), why, revoked_at)
                for (vid, tenant, lic, kind, sha, registered, revoked, why, revoked_at) in rows]

    def put_voice(self, voice: RegisteredVoice) -> None:
        v = voice
        row = (v.voice_id, v.tenant, _licence_json(v.licence), v.kind.value, v.sha256,
               v.registered_at, int(v.revoked), v.revoked_reason, v.revoked_at)
        self._queue_one(_PUT_VOICE, row)

    def put_avatar(self, avatar: RegisteredAvatar) -> None:
        a = avatar
        row = (a.avatar_id, a.tenant, _licence_json(a.licence),
               json.dumps({"voice": a.voice.voice, "rate": a.voice.rate, "pitch": a.voice.pitch}),
               a.image_sha256, a.width, a.height, a.registered_at, int(a.revoked),
               a.revoked_reason, a.revoked_at)
        self._queue_one(_PUT_AVATAR, row)

    def append_audit(self, entry: AuditEntry) -> None:
        e = entry
        row = (e.seq, e.at, e.avatar_id, e.tenant, e.action.value, e.session_id, e.room_id,
               e.platform, e.worker_id, e.clause, e.detail)
        # Every room is audited: a turn's entries go in one statement (one round trip to
        # a database server, not one per room).
        if self._audit is None:
            batch: list[tuple[Any, ...]] = []
            self._audit = batch

            def op(db: Connection) -> None:
                self._many(db, _ADD_AUDIT, batch)

            self._queue(op)
        self._audit.append(row)

    def last_audit_seq(self) -> int:
        self.commit()
        [(seq,)] = self._read("SELECT COALESCE(MAX(seq), 0) FROM audit_log")
        return int(seq)

    def audit_entries(self, avatar_id: str, after_seq: int, limit: int) -> list[AuditEntry]:
        rows = self._read(f"SELECT {_names(AUDIT_COLUMNS)} FROM audit_log WHERE avatar_id=?"
                          " AND seq>? ORDER BY seq LIMIT ?", (avatar_id, after_seq, limit))
        return [AuditEntry(seq, at, aid, tenant, AuditAction(action), sid, room, platform, worker,
                           clause, detail)
                for (seq, at, aid, tenant, action, sid, room, platform, worker, clause, detail)
                in rows]

    def close(self) -> None:
        self.commit()
        self._writer.shutdown()
        self._db.close()


class SqliteStore(SqlStore):
    """The embedded default: one SQLite file in WAL mode."""

    dialect = Dialect.SQLITE
    NOW = "((julianday('now') - 2440587.5) * 86400.0)"
    LEAD_EPOCH = "SELECT epoch FROM leadership WHERE id = 1"

    def __init__(self, path: Path, sync_to_disk: bool = True) -> None:
        """sync_to_disk=False keeps WAL commits out of fsync: a scheduler crash loses
        nothing, a host crash may lose the last commits (workers re-register their rooms)."""
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if sync_to_disk else 'NORMAL'}")
        super().__init__(db)
        self._sqlite = db
        self._adopt_unversioned()
        self.migrate()

    def _adopt_unversioned(self) -> None:
        """A database from before the schema had versions: its tables get the columns
        added since, and it is recorded at version 1, which it then matches."""
        db = self._sqlite
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "sessions" not in tables or "schema_migrations" in tables:
            return
        db.executescript(schema.MIGRATIONS[0].sqlite)  # the tables it may lack
        for table, added in schema.UNVERSIONED_SQLITE_COLUMNS.items():
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for column, decl in added:
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        db.execute(schema.VERSIONS_TABLE.format(real="REAL"))
        statement, row = schema.record(1, schema.MIGRATIONS[0].what)
        db.execute(statement, row)

    def _migrate(self) -> None:
        # sqlite3's execute takes one statement, and a migration is a script.
        db = self._sqlite
        db.execute(schema.VERSIONS_TABLE.format(real="REAL"))
        applied = {int(v) for (v,) in db.execute("SELECT version FROM schema_migrations")}
        for m in schema.pending(applied):
            statement, row = schema.record(m.version, m.what)
            try:
                db.executescript(f"BEGIN IMMEDIATE;\n{m.sqlite}\n")
                db.execute(statement, row)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise


def _row(s: Session) -> tuple[Any, ...]:
    """A new session's columns, in SESSION_COLUMNS order."""
    changes = _changes(s)
    return (s.session_id, s.seq, s.spec.tenant, s.request_id,
            convert.spec_to_pb(s.spec).SerializeToString(), *changes[:4], s.created_at,
            *changes[4:])


def _changes(s: Session) -> tuple[Any, ...]:
    """A session's columns that change, in SESSION_CHANGES order."""
    return (s.state.value, s.reason, s.worker_id, s.input_endpoint, s.updated_at,
            convert.progress_to_pb(s.progress).SerializeToString(), s.provider, s.device_type,
            s.load, s.units, s.step, str(s.rendering) if s.rendering else "", int(s.guaranteed),
            s.step_changed_at, s.epoch, _progress_blob(s.base), s.assignments)


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


def open_store(database: Path, database_url: str = "", sync_to_disk: bool = True) -> Store:
    """PostgreSQL where a database_url is configured, else the SQLite file."""
    if database_url:
        from scheduler.state.postgres import PostgresStore

        return PostgresStore(database_url)
    return SqliteStore(database, sync_to_disk)
