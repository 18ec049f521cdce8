"""Durable scheduler state behind a small interface; SQLite by default.

Every change is committed before the API call that made it returns, so a
restarted scheduler sees every session it ever acknowledged. A server database
can replace SQLite by implementing the same Protocol.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Protocol

from avatarfarm import convert
from avatarfarm.domain import ScriptSegment, SessionState
from avatarfarm.v1 import types_pb2
from scheduler.state import Session


class Store(Protocol):
    def load_sessions(self) -> list[Session]: ...
    def put_session(self, s: Session) -> None: ...
    def find_request(self, tenant: str, request_id: str) -> str | None: ...
    def append_script(self, session_id: str, segments: list[ScriptSegment]) -> None: ...
    def script(self, session_id: str) -> list[ScriptSegment]: ...
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
    load REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS sessions_request
    ON sessions (tenant, request_id) WHERE request_id != '';
CREATE TABLE IF NOT EXISTS script_segments (
    session_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    pause_after REAL NOT NULL,
    PRIMARY KEY (session_id, idx)
);
"""


class SqliteStore:
    def __init__(self, path: Path) -> None:
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def load_sessions(self) -> list[Session]:
        rows = self._db.execute(
            "SELECT session_id, seq, request_id, spec, state, reason, worker_id, input_endpoint,"
            " created_at, updated_at, progress, provider, device_type, load"
            " FROM sessions ORDER BY seq").fetchall()
        out = []
        for (sid, seq, rid, spec, state, reason, worker, endpoint, created, updated, progress,
             provider, device_type, load) in rows:
            spec_pb = types_pb2.SessionSpec.FromString(spec)
            prog = convert.progress_from_pb(types_pb2.SessionProgress.FromString(progress))
            out.append(Session(sid, convert.spec_from_pb(spec_pb), SessionState(state), seq, created,
                               updated, rid, reason, worker, endpoint, prog, provider, device_type,
                               load))
        return out

    def put_session(self, s: Session) -> None:
        self._db.execute(
            "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(session_id) DO UPDATE SET state=excluded.state, reason=excluded.reason,"
            " worker_id=excluded.worker_id, input_endpoint=excluded.input_endpoint,"
            " updated_at=excluded.updated_at, progress=excluded.progress,"
            " provider=excluded.provider, device_type=excluded.device_type, load=excluded.load",
            (s.session_id, s.seq, s.spec.tenant, s.request_id,
             convert.spec_to_pb(s.spec).SerializeToString(), s.state.value, s.reason, s.worker_id,
             s.input_endpoint, s.created_at, s.updated_at,
             convert.progress_to_pb(s.progress).SerializeToString(), s.provider, s.device_type,
             s.load))

    def find_request(self, tenant: str, request_id: str) -> str | None:
        row = self._db.execute("SELECT session_id FROM sessions WHERE tenant=? AND request_id=?",
                               (tenant, request_id)).fetchone()
        return row[0] if row else None

    def append_script(self, session_id: str, segments: list[ScriptSegment]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            (start,) = self._db.execute(
                "SELECT COALESCE(MAX(idx) + 1, 0) FROM script_segments WHERE session_id=?",
                (session_id,)).fetchone()
            self._db.executemany(
                "INSERT INTO script_segments VALUES (?,?,?,?)",
                [(session_id, start + i, s.text, s.pause_after_seconds) for i, s in enumerate(segments)])

    def script(self, session_id: str) -> list[ScriptSegment]:
        rows = self._db.execute(
            "SELECT text, pause_after FROM script_segments WHERE session_id=? ORDER BY idx",
            (session_id,)).fetchall()
        return [ScriptSegment(t, p) for t, p in rows]

    def close(self) -> None:
        self._db.close()


