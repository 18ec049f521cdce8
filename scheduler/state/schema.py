"""The store's schema as numbered migrations, each written for SQLite and PostgreSQL.

A database records the versions applied to it (`schema_migrations`); opening it applies
the missing ones in order, each in its own transaction, and refuses a database made by a
newer scheduler. A migration is never edited once released: a change of schema is a new
migration at the end of the list, in both dialects.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass


class Dialect(enum.Enum):
    SQLITE = "sqlite"
    POSTGRES = "postgresql"


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer scheduler than this one."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    what: str
    sqlite: str
    postgres: str

    def sql(self, dialect: Dialect) -> str:
        return self.sqlite if dialect is Dialect.SQLITE else self.postgres


_V1_SQLITE = """
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

# The same tables: REAL is single precision in PostgreSQL, so times and amounts are
# DOUBLE PRECISION; counters that only grow are BIGINT.
_V1_POSTGRES = """
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    spec BYTEA NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    input_endpoint TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    progress BYTEA NOT NULL,
    provider TEXT NOT NULL,
    device_type TEXT NOT NULL,
    load DOUBLE PRECISION NOT NULL,
    units DOUBLE PRECISION NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    rendering TEXT NOT NULL DEFAULT '',
    guaranteed INTEGER NOT NULL DEFAULT 0,
    step_changed_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    epoch BIGINT NOT NULL DEFAULT 0,
    base BYTEA NOT NULL DEFAULT '',
    assignments BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX sessions_request ON sessions (tenant, request_id) WHERE request_id != '';
CREATE TABLE usage_intervals (
    session_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    avatar_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    quality TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    device_type TEXT NOT NULL,
    units DOUBLE PRECISION NOT NULL,
    start DOUBLE PRECISION NOT NULL,
    "end" DOUBLE PRECISION NOT NULL,
    stream_seconds DOUBLE PRECISION NOT NULL,
    device_seconds DOUBLE PRECISION NOT NULL,
    epoch BIGINT NOT NULL DEFAULT 0,
    mark_stream DOUBLE PRECISION NOT NULL DEFAULT 0,
    mark_device DOUBLE PRECISION NOT NULL DEFAULT 0,
    platform TEXT NOT NULL DEFAULT '',
    voice TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (session_id, idx)
);
CREATE TABLE usage_cursors (
    worker_id TEXT PRIMARY KEY,
    epoch BIGINT NOT NULL,
    seq BIGINT NOT NULL
);
CREATE TABLE avatars (
    avatar_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    licence TEXT NOT NULL,
    voice TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    registered_at DOUBLE PRECISION NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    revoked_reason TEXT NOT NULL DEFAULT '',
    revoked_at DOUBLE PRECISION
);
CREATE TABLE voices (
    voice_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    licence TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    registered_at DOUBLE PRECISION NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    revoked_reason TEXT NOT NULL DEFAULT '',
    revoked_at DOUBLE PRECISION
);
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
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
CREATE INDEX audit_log_avatar ON audit_log (avatar_id, seq);
-- The audit log only grows: what was written stays as written.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
CREATE TABLE script_segments (
    session_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    pause_after DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (session_id, idx)
);
"""

# One row: which scheduler leads, under which epoch, until when (the database's clock).
_V2 = """
CREATE TABLE leadership (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    epoch {bigint} NOT NULL,
    address TEXT NOT NULL,
    expires_at {real} NOT NULL
);
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "sessions, usage, avatars, voices, the audit log and scripts",
              _V1_SQLITE, _V1_POSTGRES),
    Migration(2, "the leader's lease and epoch",
              _V2.format(bigint="INTEGER", real="REAL"),
              _V2.format(bigint="BIGINT", real="DOUBLE PRECISION")),
)

# Columns added to SQLite databases before the schema had versions; a database from
# then gets them when it is first opened by a versioned scheduler (see `adopt_sqlite`).
UNVERSIONED_SQLITE_COLUMNS = {
    "sessions": (("units", "REAL NOT NULL DEFAULT 0"), ("step", "INTEGER NOT NULL DEFAULT 0"),
                 ("rendering", "TEXT NOT NULL DEFAULT ''"),
                 ("guaranteed", "INTEGER NOT NULL DEFAULT 0"),
                 ("step_changed_at", "REAL NOT NULL DEFAULT 0"),
                 ("epoch", "INTEGER NOT NULL DEFAULT 0"), ("base", "BLOB NOT NULL DEFAULT x''"),
                 ("assignments", "INTEGER NOT NULL DEFAULT 0")),
    "usage_intervals": (("epoch", "INTEGER NOT NULL DEFAULT 0"),
                        ("mark_stream", "REAL NOT NULL DEFAULT 0"),
                        ("mark_device", "REAL NOT NULL DEFAULT 0"),
                        ("platform", "TEXT NOT NULL DEFAULT ''"),
                        ("voice", "TEXT NOT NULL DEFAULT ''")),
}

VERSIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations ("
                  "version INTEGER PRIMARY KEY, what TEXT NOT NULL, applied_at {real} NOT NULL)")


def pending(applied: set[int], migrations: tuple[Migration, ...] = MIGRATIONS) -> list[Migration]:
    """The migrations still to apply, in order; refuses a database ahead of this code."""
    known = max((m.version for m in migrations), default=0)
    ahead = sorted(v for v in applied if v > known)
    if ahead:
        raise SchemaTooNew(
            f"the database's schema is at version {ahead[-1]}, and this scheduler knows "
            f"versions up to {known}: run a scheduler at least as new as the one that "
            "migrated it")
    return [m for m in migrations if m.version not in applied]


def record(version: int, what: str) -> tuple[str, tuple[int, str, float]]:
    return ("INSERT INTO schema_migrations (version, what, applied_at) VALUES (?, ?, ?)",
            (version, what, time.time()))
