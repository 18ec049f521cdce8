"""PostgreSQL as the scheduler's store: the production store of a replicated scheduler.

The statements are the SQLite store's (`SqlStore`); what differs is the connection, its
placeholder, the migration lock and how a new leader takes the lease (it ends the old
leader's sessions). The connection runs in autocommit mode and every group commit is one
explicit, pipelined transaction; a connection that broke (the server restarted, the
network dropped) is replaced before the next transaction or read, and the commit that
met the break fails to its callers (UNAVAILABLE), who retry.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

from avatarfarm.domain import Unavailable
from scheduler.state import schema
from scheduler.state.schema import Dialect
from scheduler.state.store import Connection, SqlStore

# Milliseconds a transaction of this store may wait on it between statements, and a
# lease call on a lock.
IDLE_IN_TRANSACTION_MS = 2000
LEASE_LOCK_TIMEOUT_MS = 2000
# The sessions' application_name: a leader's carry its holder id (see claim_lead).
APPLICATION = "avatarfarm-scheduler"
# pg_advisory_xact_lock key serialising schedulers that migrate one database at once.
_MIGRATION_LOCK = 0x61766672  # "avfr"


def _application(holder: str) -> str:
    return f"{APPLICATION} {holder}"[:63]  # the server keeps 63 bytes


class StoreUnavailable(Unavailable):
    """The database could not be reached, or ended the connection."""


def _driver() -> Any:
    try:
        import psycopg
    except ImportError as e:  # the extra is not installed
        raise RuntimeError("a PostgreSQL database_url needs the psycopg driver: "
                           "pip install 'avatarfarm[postgresql]'") from e
    return psycopg


class PostgresStore(SqlStore):
    dialect = Dialect.POSTGRES
    NOW = "extract(epoch from clock_timestamp())::double precision"
    # FOR KEY SHARE: a takeover (which locks the row FOR UPDATE first) waits for this
    # transaction to end, so a commit checked under the old epoch lands before the new
    # leader's epoch, never after; the leader's own renewals (plain updates) do not wait.
    LEAD_EPOCH = "SELECT epoch FROM leadership WHERE id = 1 FOR KEY SHARE"

    def __init__(self, url: str, connect_timeout: float = 10.0) -> None:
        """url: a libpq connection string or URI (postgresql://user@host:5432/db); the
        password may come from PGPASSWORD or a password file rather than the URL."""
        self._url = url
        self._timeout = connect_timeout
        self._app = APPLICATION
        super().__init__(self._connect())
        self._lease_lock = threading.Lock()
        self._lease_db: Connection | None = None
        self.migrate()

    def _connect(self, lease: bool = False) -> Connection:
        # A scheduler cut off from the database in the middle of a transaction would
        # keep its locks (the lease row's among them) until the server noticed the dead
        # connection, hours later by TCP keepalive: its transactions never idle, so the
        # server ends any that does within seconds (and a new leader ends its sessions,
        # see claim_lead). Lease calls give up on a lock rather than wait past a lease.
        options = f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"
        if lease:
            options += f" -c lock_timeout={LEASE_LOCK_TIMEOUT_MS}"
        # TCP keepalives: a connection to a server that vanished (a half-open one) fails
        # in seconds instead of holding a commit, or a read, for the kernel's hours.
        conn: Connection = _driver().connect(
            self._url, autocommit=True, connect_timeout=max(1, round(self._timeout)),
            application_name=self._app, options=options, keepalives=1, keepalives_idle=5,
            keepalives_interval=2, keepalives_count=3, tcp_user_timeout=10000)
        return conn

    def _read(self, statement: str, params: Any = ()) -> list[Any]:
        try:
            return super()._read(statement, params)
        except _driver().OperationalError as e:
            raise StoreUnavailable(f"the database did not answer a read: {e}") from e

    def claim_lead(self, holder: str, address: str, ttl: float, *, force: bool = False) -> int | None:
        lock, db = self._lease_conn()
        with lock:
            old = self._exec(db, f"SELECT holder, expires_at <= {self.NOW} FROM leadership"
                                 " WHERE id = 1").fetchone()
            if old is not None and not (old[1] or force):
                return None  # held: a follower's poll takes no lock
            if old is not None and old[0] != holder:
                # The lease ran out: the sessions of the scheduler that held it go, and with
                # them any transaction it left half-done and the locks it holds. It may no
                # longer act, so nothing it would still do is lost.
                self._exec(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                               " WHERE application_name = ? AND pid <> pg_backend_pid()",
                           (_application(old[0]),))
            with db.transaction():  # type: ignore[attr-defined]
                # FOR UPDATE: the commits still in flight under the old epoch land first.
                self._exec(db, "SELECT epoch FROM leadership WHERE id = 1 FOR UPDATE")
                claimed = self._exec(db, self._claim_sql(), (holder, address, ttl, int(force)))
                row = self._exec(db, "SELECT epoch FROM leadership WHERE id = 1").fetchone() \
                    if claimed.rowcount == 1 else None
        if row is None:
            return None
        self._name_sessions(_application(holder))
        return int(row[0])

    def _name_sessions(self, app: str) -> None:
        """This store's sessions carry the leader's name, for a later leader to find."""
        self._app = app  # for the connections made from now on
        rename = "SELECT set_config('application_name', ?, false)"
        # A connection that was ended meanwhile is replaced, under the new name, when next used.
        with self._lock, contextlib.suppress(_driver().OperationalError):
            self._exec(self._conn(), rename, (app,))
        with self._lease_lock, contextlib.suppress(_driver().OperationalError):
            if self._lease_db is not None:
                self._exec(self._lease_db, rename, (app,))

    def _conn(self) -> Connection:
        db: Any = self._db
        if db.closed or db.broken:
            with contextlib.suppress(Exception):
                db.close()
            self._db = self._connect()
        return self._db

    def _lease_conn(self) -> tuple[threading.Lock, Connection]:
        # A connection of its own: a renewal never waits behind a large group commit.
        db: Any = self._lease_db
        if db is None or db.closed or db.broken:
            if db is not None:
                with contextlib.suppress(Exception):
                    db.close()
            db = self._lease_db = self._connect(lease=True)
        conn: Connection = db
        return self._lease_lock, conn

    def close(self) -> None:
        super().close()
        if self._lease_db is not None:
            self._lease_db.close()

    @staticmethod
    @functools.cache
    def _placeholders(statement: str) -> str:
        return statement.replace("?", "%s")

    def _sql(self, statement: str) -> str:
        return self._placeholders(statement)

    @contextlib.contextmanager
    def _transaction(self, pipelined: bool = False) -> Iterator[Connection]:
        db: Any = self._conn()
        try:
            # Pipelined, a group commit's statements go out back to back and the server's
            # answers are read where one is needed (the fence's epoch) and at the commit.
            with db.pipeline() if pipelined else contextlib.nullcontext(), db.transaction():
                yield db
        except _driver().OperationalError as e:
            # The server or the way to it failed: the callers retry (UNAVAILABLE), and the
            # next transaction runs on a new connection.
            raise StoreUnavailable(f"the database did not take the commit: {e}") from e

    def _migrate(self) -> None:
        # DDL is transactional here: the missing migrations go in one transaction, under
        # a lock, so replicas starting together migrate once and none sees half a schema.
        with self._transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            db.execute(schema.VERSIONS_TABLE.format(real="DOUBLE PRECISION"))
            applied = {int(v) for (v,) in db.execute(
                "SELECT version FROM schema_migrations").fetchall()}
            for m in schema.pending(applied):
                db.execute(m.postgres)
                statement, row = schema.record(m.version, m.what)
                self._exec(db, statement, row)
