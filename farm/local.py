"""A local farm: the scheduler and workers as child processes of this one.

Used by ``avatarfarm demo``, the end-to-end tests and the chaos load test; it starts
the real processes with the real CLI, waits for each to say it is ready, and stops
them with SIGTERM (then SIGKILL after a grace period). With `replicas` > 1 the
schedulers share a PostgreSQL database (`database_url`): one leads, the others follow,
and the workers are given every replica's address.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from avatarfarm.processes import ManagedProcess
from workers.output.targets import tenant_root


@dataclass
class LocalFarm:
    home: Path
    workers: int = 2
    pacing: str = "fast"
    worker_threads: int = 1
    overcommit: float = 1.0
    scheduler_port: int = 0  # 0: any free port (fix it to restart the scheduler in place)
    scheduler_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    scheduler: ManagedProcess | None = None  # the leading scheduler, once known
    worker_procs: list[ManagedProcess] = field(default_factory=list)
    replicas: int = 1  # schedulers; more than one share `database_url` (PostgreSQL)
    database_url: str = ""
    replica_urls: dict[int, str] = field(default_factory=dict)  # a replica's own way there
    lease_seconds: float = 5.0
    schedulers: list[ManagedProcess | None] = field(default_factory=list)
    _ports: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.replicas > 1 and not self.database_url:
            raise ValueError("replicated schedulers need a database_url (PostgreSQL)")
        # Fixed ports: workers are told every replica's address before any starts.
        self._ports = [self.scheduler_port or (_free_port() if self.replicas > 1 else 0)] + \
            [_free_port() for _ in range(self.replicas - 1)]
        self.schedulers = [None] * self.replicas

    @property
    def model_dir(self) -> Path:
        return self.home / "models"

    @property
    def output_dir(self) -> Path:
        return self.home / "out"

    def output_of(self, tenant: str, path: str) -> Path:
        """Where a tenant's file or HLS output named `path` is written."""
        return tenant_root(self.output_dir, tenant) / path

    @property
    def address(self) -> str:
        """The leading scheduler's address."""
        assert self.scheduler is not None
        return f"127.0.0.1:{self.scheduler.port}"

    @property
    def worker_address(self) -> str:
        """What workers are given: the scheduler, or every replica."""
        if self.replicas == 1:
            return self.address
        return ",".join(f"127.0.0.1:{p}" for p in self._ports)

    def start_scheduler(self, timeout: float = 60.0, index: int = 0,
                        wait: bool = True) -> ManagedProcess:
        """Starts replica `index`; `wait`: until it is ready (leads)."""
        store = ["--database", str(self.home / "state" / "scheduler.db")]
        if self.database_url:
            store = ["--database-url", self.replica_urls.get(index, self.database_url),
                     "--input-secret-file",
                     str(self.home / "state" / "input-secret"), "--lease-seconds",
                     str(self.lease_seconds)]
        name = "scheduler" if self.replicas == 1 else f"scheduler-{index}"
        p = ManagedProcess(name, [
            "scheduler", "--listen", f"127.0.0.1:{self._ports[index]}", "--metrics-port", "-1",
            *store, "--avatar-dir", str(self.model_dir / "avatars"),
            "--overcommit", str(self.overcommit), *self.scheduler_args,
        ], self.home / "logs" / f"{name}.log", append=self.schedulers[index] is not None)
        p.start()
        self.schedulers[index] = p
        if wait:
            p.wait_ready(timeout)
            self.scheduler = p
        return p

    def wait_leader(self, timeout: float = 60.0) -> ManagedProcess:
        """Until one of the running replicas leads; it becomes `scheduler`."""
        deadline = time.monotonic() + timeout
        while True:
            for p in self.schedulers:
                if p is not None and p is not self.scheduler and p.running() and p.poll_ready():
                    self.scheduler = p
                    return p
            if time.monotonic() > deadline:
                raise TimeoutError(f"no scheduler took the lead within {timeout:.0f} s")
            time.sleep(0.05)

    def start_worker(self, index: int, timeout: float = 120.0, wait: bool = True) -> ManagedProcess:
        w = ManagedProcess(f"worker-{index}", [
            "worker", "--scheduler", self.worker_address, "--listen", "127.0.0.1:0",
            "--worker-id", f"worker-{index}", "--model-dir", str(self.model_dir),
            "--output-dir", str(self.output_dir), "--pacing", self.pacing,
            "--intra-op-threads", str(self.worker_threads), "--metrics-port", "0",
            *self.worker_args,
        ], self.home / "logs" / f"worker-{index}.log",
            env={**os.environ, "OMP_NUM_THREADS": str(max(self.worker_threads, 1))})
        w.start()
        self.worker_procs.append(w)
        if wait:
            w.wait_ready(timeout)
        return w

    def start(self) -> LocalFarm:
        self.start_scheduler()
        for i in range(1, self.replicas):
            self.start_scheduler(index=i, wait=False)  # they follow
        try:
            started = [self.start_worker(i, wait=False) for i in range(self.workers)]
            for w in started:
                w.wait_ready(120.0)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for w in self.worker_procs:
            w.stop()
        for p in self.schedulers:
            if p is not None:
                p.stop()

    def __enter__(self) -> LocalFarm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
