"""The system under test: a TOML config for the real scheduler (device prices of the
simulated fleet, the trace's tenants with their budgets and reservations) and
``avatarfarm scheduler`` started on it as a child process, watched and stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.trace import Tenant
from loadtests.worker_specs import DEVICES


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + "}"
    return repr(float(v)) if isinstance(v, float) else str(v)


def write_config(path: Path, state: Path, avatar_dir: Path, tenants: Sequence[Tenant] | None,
                 extra: dict[str, Any]) -> None:
    top: dict[str, Any] = {
        "listen": "127.0.0.1:0", "metrics_port": -1, "database": str(state / "scheduler.db"),
        "avatar_dir": str(avatar_dir), "heartbeat_interval": 1.0, "worker_timeout": 30.0,
        "device_prices": {dev: spec[4] for dev, spec in DEVICES.items()}, **extra}
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for t in tenants or ():
        lines += ["", f'[tenants."{t.name}"]']
        for f in ("concurrency_units", "spend_budget", "spend_period_seconds", "on_budget_exhausted",
                  "grace_seconds", "reserved_units", "weight"):
            lines.append(f"{f} = {_toml_value(getattr(t, f))}")
    path.write_text("\n".join(lines) + "\n")


class SchedulerProcess:
    """``avatarfarm scheduler`` as a child process: started, watched, stopped (TERM, then KILL)."""

    def __init__(self, config: Path, log_path: Path, log_level: str, root: Path) -> None:
        # `python -m farm.cli` with the code root first on the path: the same as the
        # `avatarfarm` command, and --scheduler-root can point at another checkout to compare.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "farm.cli", "--log-level", log_level, "scheduler",
             "--config", str(config)],
            stdout=subprocess.PIPE, stderr=self._log, cwd=str(root), env=env, start_new_session=True)
        self.port = self.metrics_port = 0

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Parses 'avatarfarm scheduler ready on port N (metrics port M)'; False if it exited."""
        found: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace")
                if "ready on port" in line and not found:
                    found.append(line)
            # keep draining until EOF so the pipe never fills

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not found and self.proc.poll() is None:
            time.sleep(0.05)
        if not found:
            return False
        words = found[0].replace("(", " ").replace(")", " ").split()
        self.port = int(words[words.index("port") + 1])
        self.metrics_port = int(words[words.index("metrics") + 2])
        return True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
