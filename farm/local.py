"""A local farm: the scheduler and workers as child processes of this one.

Used by ``avatarfarm demo`` and the end-to-end tests; it starts the real
processes with the real CLI, waits for each to say it is ready, and stops
them with SIGTERM (then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
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
    scheduler: ManagedProcess | None = None
    worker_procs: list[ManagedProcess] = field(default_factory=list)

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
        assert self.scheduler is not None
        return f"127.0.0.1:{self.scheduler.port}"

    def start_scheduler(self, timeout: float = 60.0) -> ManagedProcess:
        self.scheduler = ManagedProcess("scheduler", [
            "scheduler", "--listen", f"127.0.0.1:{self.scheduler_port}", "--metrics-port", "-1",
            "--database", str(self.home / "state" / "scheduler.db"),
            "--avatar-dir", str(self.model_dir / "avatars"),
            "--overcommit", str(self.overcommit), *self.scheduler_args,
        ], self.home / "logs" / "scheduler.log")
        self.scheduler.start()
        self.scheduler.wait_ready(timeout)
        return self.scheduler

    def start_worker(self, index: int, timeout: float = 120.0, wait: bool = True) -> ManagedProcess:
        w = ManagedProcess(f"worker-{index}", [
            "worker", "--scheduler", self.address, "--listen", "127.0.0.1:0",
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
        if self.scheduler is not None:
            self.scheduler.stop()

    def __enter__(self) -> LocalFarm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
