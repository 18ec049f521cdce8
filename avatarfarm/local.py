"""A local farm: the scheduler and workers as child processes of this one.

Used by ``avatarfarm demo`` and the end-to-end tests; it starts the real
processes with the real CLI, waits for each to say it is ready, and stops
them with SIGTERM (then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_READY = re.compile(r"ready on port (\d+)(?: \(metrics port (\d+)\))?")


class ProcessFailed(RuntimeError):
    pass


@dataclass
class ManagedProcess:
    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    metrics_port: int = 0
    _lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "avatarfarm.cli", *self.args], stdout=subprocess.PIPE,
            stderr=log, text=True, env=self.env, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True, name=f"{self.name}-stdout").start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if self.proc is not None and self.proc.poll() is not None and self._lines.empty():
                raise ProcessFailed(f"{self.name} exited with {self.proc.returncode}; "
                                    f"see {self.log_path}:\n{self.tail()}")
            if left <= 0:
                raise ProcessFailed(f"{self.name} not ready after {timeout:.0f}s; see {self.log_path}")
            try:
                line = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            m = _READY.search(line)
            if m:
                self.port = int(m.group(1))
                self.metrics_port = int(m.group(2) or 0)
                return

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


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
