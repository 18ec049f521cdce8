"""A local PostgreSQL server for replicated schedulers on one machine (the tests, the
chaos load test): Debian's postgresql, initialised in a temporary folder and started on
a free loopback port, for this machine's processes alone (trust authentication, no
fsync: nothing in it outlives the run). PostgreSQL refuses to run as root, so under
root the server runs as the `postgres` user. `create_database` gives each user a
database of its own."""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def binaries() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, or where Debian keeps them."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


def available() -> str | None:
    """None if a PostgreSQL server can be started here, else why not."""
    if binaries() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run the server as"
    return None


class PostgresServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="avatarfarm-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self._bin = binaries()
        self._names = itertools.count(1)
        self._user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            self._user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        assert self._bin is not None
        subprocess.run([*self._user, str(self._bin / args[0]), *args[1:]], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

    def start(self, durable: bool = False) -> PostgresServer:
        """durable: commits reach the disk before they are acknowledged (PostgreSQL's
        defaults, for measuring); else no fsync at all (tests)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not durable:
            options += " -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "-t", "30", "start")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its connection URI."""
        import psycopg  # the postgresql extra

        name = f"t{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.port and self._bin is not None:
            subprocess.run([*self._user, str(self._bin / "pg_ctl"), "-D", str(self.data), "-m",
                            "immediate", "-w", "stop"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60, check=False)
            self.port = 0
        shutil.rmtree(self.root, ignore_errors=True)
