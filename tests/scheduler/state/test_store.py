"""The store's contract, run against each store: the SQLite file and a real PostgreSQL
server. What one store keeps, the other keeps the same way."""

from __future__ import annotations

import concurrent.futures
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from avatarfarm import convert
from avatarfarm.domain import Progress, Quality, ScriptSegment, SessionState, Tier, Unavailable
from scheduler.policy.ledger import Interval
from scheduler.policy.licences import Licence
from scheduler.state import schema
from scheduler.state.avatars import (
    AuditAction,
    AuditEntry,
    RegisteredAvatar,
    RegisteredVoice,
    VoiceKind,
    VoiceSettings,
)
from scheduler.state.postgres import PostgresStore
from scheduler.state.sessions import InvalidTransition, Session
from scheduler.state.store import Fenced, SqliteStore, SqlStore
from tests.builders import make_spec

Opener = Callable[[], SqlStore]
T = TypeVar("T")
ALL = [(m.version,) for m in schema.MIGRATIONS]


def make_session(sid: str = "s1", seq: int = 1, request_id: str = "", tenant: str = "vendor") -> Session:
    return Session(sid, make_spec(f"room-{sid}", tenant=tenant), SessionState.PENDING, seq, 1.0, 1.0,
                   request_id)


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the test's database (again, on each call) in the store under test."""
    opened: list[SqlStore] = []
    if request.param == "sqlite":
        def open_() -> SqlStore:
            opened.append(SqliteStore(tmp_path / "s.db"))
            return opened[-1]
    else:
        url = request.getfixturevalue("postgres_url")

        def open_() -> SqlStore:
            opened.append(PostgresStore(url))
            return opened[-1]
    yield open_
    for store in opened:
        try:
            store.close()
        except Exception:  # noqa: BLE001 - a test may have closed it or broken its connection
            pass


def reconnecting(call: Callable[[], T]) -> T:
    """The call, again once if the store's connection had been ended under it."""
    try:
        return call()
    except psycopg.OperationalError:
        return call()


def raw(store: SqlStore, statement: str) -> list[tuple[object, ...]]:
    """A statement run past the store's own methods, on its connection."""
    return store._read(statement)


def test_sessions_survive_reopening_the_database(opener: Opener) -> None:
    store = opener()
    s = make_session(request_id="req-1")
    store.put_session(s)
    placed = s.moved(SessionState.PLACED, 2.0, worker_id="w1", load=0.4,
                     progress=Progress(10, 1, 0.4, 0.1, (("render", 0.08),), 0, 0.025, -0.04, 7))
    store.put_session(placed)
    store.append_script("s1", [ScriptSegment("hello", 0.5)])
    store.append_script("s1", [ScriptSegment("again")])
    store.close()

    reopened = opener()
    [got] = reopened.load_sessions()
    assert got == placed
    assert reopened.find_request("vendor", "req-1") == "s1"
    assert reopened.find_request("other-tenant", "req-1") is None
    assert reopened.script("s1") == [ScriptSegment("hello", 0.5), ScriptSegment("again", 0.0)]


def test_every_field_of_a_session_comes_back_exactly(opener: Opener) -> None:
    store = opener()
    t = 1_765_000_000.123456  # needs double precision: single would lose the seconds
    s = make_session("s2", seq=7)
    running = s.moved(SessionState.PLACED, t, worker_id="w9", load=0.333333333333,
                      units=1.75, device_type="h200", provider="cuda").moved(
        SessionState.RUNNING, t + 0.5)
    full = replace(running, step=2, rendering=Quality(960, 540, 25), guaranteed=True,
                   step_changed_at=t + 0.25, epoch=3,
                   base=Progress(100, 2, 4.0, 1.0, (("render", 0.8),)), assignments=4,
                   input_endpoint="10.0.0.9:7000")
    store.put_sessions([s, full])  # a new session and its update in one transaction
    store.commit()
    [got] = opener().load_sessions()
    assert got == full
    assert got.updated_at == t + 0.5


def test_a_request_id_is_unique_within_a_tenant_and_a_failed_commit_keeps_nothing(
        opener: Opener) -> None:
    store = opener()
    store.put_session(make_session("a", 1, request_id="req"))
    store.put_session(make_session("b", 2, request_id="req", tenant="rival"))  # another tenant
    store.commit()
    store.put_session(make_session("c", 3))
    store.put_session(make_session("d", 4, request_id="req"))  # same tenant, same request
    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.UniqueViolation)):
        store.commit()
    # The whole turn was refused, the good session in it too, and the store still works.
    assert [s.session_id for s in store.load_sessions()] == ["a", "b"]
    store.put_session(make_session("e", 5))
    store.commit()
    assert [s.session_id for s in opener().load_sessions()] == ["a", "b", "e"]
    assert store.find_request("rival", "req") == "b"


def test_commits_on_the_writer_thread_land_in_order(opener: Opener) -> None:
    store = opener()
    s = make_session()
    futures = []
    for i in range(40):
        s = s.moved(SessionState.PLACED if i == 0 else s.state, float(i + 2), worker_id=f"w{i}")
        store.put_session(s)
        store.append_script(s.session_id, [ScriptSegment(f"line {i}")])
        futures.append(store.commit_async())
    concurrent.futures.wait(futures)
    assert all(f.exception() is None for f in futures)
    again = opener()
    [got] = again.load_sessions()
    assert got.worker_id == "w39" and got.updated_at == 41.0
    assert [seg.text for seg in again.script(s.session_id)] == [f"line {i}" for i in range(40)]


def test_usage_intervals_and_cursors_are_replaced_by_their_keys(opener: Opener) -> None:
    store = opener()
    first = Interval("s1", 0, "vendor", "presenter", Tier.PREMIUM, "512x512@25", "w1", "h200",
                     0.5, 100.25, 160.5, 60.25, 12.125, 1, 0.0, 0.0, "douyin", "joe")
    second = replace(first, idx=1, worker_id="w2")
    store.put_usage([first, second], {"w1": (1, 10), "w2": (4, 2)})
    store.commit()
    grown = replace(first, end=220.5, stream_seconds=120.25)
    store.put_usage([grown], {"w1": (2, 0)})
    store.commit()
    intervals, cursors = opener().load_usage()
    assert sorted(intervals, key=lambda i: i.idx) == [grown, second]
    assert cursors == {"w1": (2, 0), "w2": (4, 2)}


def test_avatars_and_voices_round_trip_and_revocation_replaces_them(opener: Opener) -> None:
    store = opener()
    lic = Licence("person-1", "consent-9", ("douyin",), ("beauty",), ("tobacco",), ("zh",),
                  1_700_000_000.0, 1_800_000_000.5, False)
    avatar = RegisteredAvatar("anna", "vendor", lic, 1_750_000_000.25, VoiceSettings("joe", 1.1, 0.9),
                              "ab" * 32, 512, 512)
    voice = RegisteredVoice("joe", "vendor", lic, 1_750_000_000.5, VoiceKind.PIPER, "cd" * 32)
    store.put_avatar(avatar)
    store.put_voice(voice)
    store.commit()
    assert opener().load_avatars() == [avatar] and opener().load_voices() == [voice]
    revoked = replace(avatar, revoked=True, revoked_reason="consent withdrawn",
                      revoked_at=1_760_000_000.0)
    store.put_avatar(revoked)
    store.commit()
    assert opener().load_avatars() == [revoked]


def test_the_audit_log_pages_by_sequence_and_refuses_changes(opener: Opener) -> None:
    store = opener()
    for seq in range(1, 8):
        store.append_audit(AuditEntry(seq, 1000.0 + seq, "anna" if seq % 2 else "bob", "vendor",
                                      AuditAction.ROOM_STARTED, f"s{seq}", "room", "douyin", "w1", "", ""))
    store.commit()
    again = opener()
    assert again.last_audit_seq() == 7
    assert [e.seq for e in again.audit_entries("anna", 1, 2)] == [3, 5]
    assert [e.seq for e in again.audit_entries("anna", 5, 10)] == [7]
    for statement in ("UPDATE audit_log SET detail = 'edited'", "DELETE FROM audit_log"):
        with pytest.raises((sqlite3.IntegrityError, psycopg.errors.RaiseException),
                           match="append-only"):
            again._queue_one(statement, ())
            again.commit()
    assert len(again.audit_entries("anna", 0, 100)) == 4


def test_the_schema_is_migrated_once_and_a_newer_one_is_refused(opener: Opener) -> None:
    store = opener()
    assert raw(store, "SELECT version FROM schema_migrations ORDER BY version") == ALL
    store.close()
    store = opener()  # opening again applies nothing
    assert raw(store, "SELECT version FROM schema_migrations ORDER BY version") == ALL
    store._queue_one("INSERT INTO schema_migrations (version, what, applied_at) VALUES (?, ?, ?)",
                     (schema.MIGRATIONS[-1].version + 1, "from a newer scheduler", 0.0))
    store.close()
    with pytest.raises(schema.SchemaTooNew, match="run a scheduler at least as new"):
        opener()


def test_an_sqlite_database_from_before_schema_versions_is_adopted(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "s.db")
    # The first sessions table, before the columns added since.
    db.executescript("""
        CREATE TABLE sessions (session_id TEXT PRIMARY KEY, seq INTEGER NOT NULL,
            tenant TEXT NOT NULL, request_id TEXT NOT NULL, spec BLOB NOT NULL,
            state TEXT NOT NULL, reason TEXT NOT NULL, worker_id TEXT NOT NULL,
            input_endpoint TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
            progress BLOB NOT NULL, provider TEXT NOT NULL, device_type TEXT NOT NULL,
            load REAL NOT NULL);""")
    old = make_session()
    db.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
               (old.session_id, old.seq, "vendor", "", convert.spec_to_pb(old.spec).SerializeToString(),
                "pending", "", "", "", 1.0, 1.0, b"", "", "", 0.0))
    db.commit()
    db.close()
    store = SqliteStore(tmp_path / "s.db")
    assert store.load_sessions() == [old]
    assert raw(store, "SELECT version FROM schema_migrations ORDER BY version") == ALL
    store.put_session(old.moved(SessionState.PLACED, 2.0, worker_id="w1", units=0.5))
    store.commit()
    store.close()
    assert SqliteStore(tmp_path / "s.db").load_sessions()[0].units == 0.5


def test_replicas_opening_one_postgres_database_at_once_migrate_it_once(postgres_url: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: PostgresStore(postgres_url), range(4)))
    assert raw(stores[0], "SELECT version FROM schema_migrations ORDER BY version") == ALL
    stores[0].put_session(make_session())
    stores[0].commit()
    assert [s.session_id for s in stores[3].load_sessions()] == ["s1"]
    for store in stores:
        store.close()


def test_a_postgres_store_reconnects_after_its_connection_is_cut(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    store.put_session(make_session("a", 1))
    store.commit()
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE application_name = 'avatarfarm-scheduler'")
    store.put_session(make_session("b", 2))
    # The commit that met the cut fails to its callers (who answer UNAVAILABLE and are
    # retried); the next one runs on a new connection.
    with pytest.raises(Unavailable, match="the database did not take the commit"):
        store.commit()
    store.put_session(make_session("c", 3))
    store.commit()
    assert [s.session_id for s in store.load_sessions()] == ["a", "c"]
    store.close()


def test_the_lead_is_held_by_one_scheduler_and_each_new_leader_raises_the_epoch(
        opener: Opener) -> None:
    a, b = opener(), opener()
    assert a.leader() is None
    assert a.claim_lead("a", "10.0.0.1:50051", 60.0) == 1
    assert b.claim_lead("b", "10.0.0.2:50051", 60.0) is None  # a holds it
    lease = b.leader()
    assert lease is not None and (lease.holder, lease.epoch, lease.address) == ("a", 1, "10.0.0.1:50051")
    assert 55.0 < lease.remaining <= 60.0 and lease.held
    assert a.renew_lead("a", 1, 60.0)
    a.release_lead("a", 1)  # a clean stop: nobody waits the lease out
    assert not b.leader().held  # type: ignore[union-attr]
    assert b.claim_lead("b", "10.0.0.2:50051", 60.0) == 2
    # a lost it (on PostgreSQL its sessions were ended by b's claim: it reconnects first).
    assert not reconnecting(lambda: a.renew_lead("a", 1, 60.0))
    assert a.claim_lead("a", "10.0.0.1:50051", 60.0) is None
    # A store only one scheduler may open is taken by force.
    assert a.claim_lead("a", "10.0.0.1:50051", 60.0, force=True) == 3


def test_a_scheduler_fenced_out_by_a_newer_leader_writes_nothing(opener: Opener) -> None:
    old, new = opener(), opener()
    epoch = old.claim_lead("old", "", 0.0)  # expires at once: as if the old leader paused
    assert epoch == 1
    old.fence(epoch)
    old.put_session(make_session("before", 1))
    old.commit()
    new.fence(new.claim_lead("new", "", 60.0))  # type: ignore[arg-type]
    old.put_session(make_session("stale", 2))
    old.put_usage([], {"w1": (9, 9)})
    # On PostgreSQL the new leader's claim ended the old one's sessions: its commit fails
    # on the cut connection, and on a new one, with the fence.
    with pytest.raises(Unavailable):
        old.commit()
    old.put_session(make_session("stale", 2))
    with pytest.raises(Fenced, match="a newer leader took over"):
        old.commit()
    new.put_session(make_session("after", 3))
    new.commit()
    assert [s.session_id for s in opener().load_sessions()] == ["before", "after"]
    assert opener().load_usage() == ([], {})


def test_terminal_states_are_final() -> None:
    ended = make_session().moved(SessionState.ENDED, 2.0)
    with pytest.raises(InvalidTransition):
        ended.moved(SessionState.RUNNING, 3.0)
    with pytest.raises(InvalidTransition):
        make_session().moved(SessionState.RUNNING, 2.0)  # pending must be placed first


def test_a_resumed_rooms_progress_adds_counters_and_keeps_the_latest_sync() -> None:
    from scheduler.state.sessions import plus

    before = Progress(100, 2, 4.0, 1.0, (("render", 0.8),), 1, 0.04, -0.04, 5)
    fresh = Progress(25, 0, 1.0, 0.25, (("render", 0.2),))  # the new worker has not checked yet
    assert plus(before, fresh) == Progress(125, 2, 5.0, 1.25, (("render", 1.0),), 1, 0.04, -0.04, 5)
    checked = Progress(50, 0, 2.0, 0.5, (), 0, 0.0, 0.0, 2)
    assert plus(before, checked).sync_checks == 7
    assert plus(before, checked).av_offset_seconds == 0.0

