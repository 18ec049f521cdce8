"""A child process of this one that prints when it is ready: started with its output
to a log file, waited for until it prints "ready on port N", stopped with SIGTERM
(then SIGKILL after a grace period). Used by the local farm and the local
provisioner, which start `avatarfarm scheduler` and `avatarfarm worker` this way.
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
    append: bool = False  # add to the log (a process started again) rather than replace it
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    metrics_port: int = 0
    _lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a" if self.append else "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "farm.cli", *self.args], stdout=subprocess.PIPE,
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

    def poll_ready(self) -> bool:
        """Whether it has said it is ready, looking only at what it printed so far (a
        replicated scheduler says so once it leads)."""
        while self.port == 0:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return False
            m = _READY.search(line)
            if m:
                self.port = int(m.group(1))
                self.metrics_port = int(m.group(2) or 0)
        return True

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

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
