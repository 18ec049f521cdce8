"""The local provisioner (the embedded default): workers as processes on this
machine, children of the scheduler, started with the real `avatarfarm worker`
command and the pool's `worker_args`.

A removed worker gets SIGTERM (it has been drained: it exits at once; if not, it
asks for its own drain first) and SIGKILL after a grace period. Worker ids carry a
random suffix, so a worker left running by a scheduler that crashed never shares
an id with a new one.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path

from avatarfarm.processes import ManagedProcess
from scheduler.autoscale.provisioners import Instance, ProvisionerKind
from scheduler.policy.autoscaler import AutoscalerConfig

log = logging.getLogger(__name__)


class LocalProvisioner:
    kind = ProvisionerKind.LOCAL

    def __init__(self, config: AutoscalerConfig, scheduler_address: str,
                 log_dir: str | Path = "var/logs", stop_grace: float = 30.0) -> None:
        self.config = config
        self.scheduler_address = scheduler_address
        self.log_dir = Path(log_dir)
        self.stop_grace = stop_grace
        self._procs: dict[str, tuple[str, ManagedProcess]] = {}  # worker id -> (pool, process)
        self._lock = threading.Lock()

    def instances(self, pool: str) -> list[Instance]:
        with self._lock:
            for wid, (_, proc) in list(self._procs.items()):
                if proc.proc is None or proc.proc.poll() is not None:
                    log.warning("local worker %s exited (code %s); see %s", wid,
                                proc.proc.returncode if proc.proc else None, proc.log_path)
                    del self._procs[wid]
            return [Instance(wid, p) for wid, (p, _) in self._procs.items() if p == pool]

    def scale(self, pool: str, replicas: int, remove: Sequence[str] = ()) -> None:
        for wid in remove:
            with self._lock:
                entry = self._procs.pop(wid, None)
            if entry is not None:
                code = entry[1].stop(self.stop_grace)
                log.info("local worker %s stopped (exit code %s)", wid, code)
        cfg = self.config.pools[pool]
        for _ in range(max(0, replicas - len(self.instances(pool)))):
            wid = f"{pool}-{secrets.token_hex(3)}"
            # The pool's arguments first: the id and the scheduler are the provisioner's.
            proc = ManagedProcess(wid, [
                # Drained by the scheduler before they are stopped: no drain of their own.
                "worker", "--device-type", cfg.device_type, "--drain-timeout", "0",
                *cfg.worker_args,
                "--scheduler", self.scheduler_address, "--worker-id", wid,
            ], self.log_dir / f"{wid}.log")
            proc.start()
            with self._lock:
                self._procs[wid] = (pool, proc)
            log.info("local worker %s started for pool %s (log %s)", wid, pool, proc.log_path)

    def removable(self, pool: str, preferred: Sequence[str]) -> list[str]:
        return list(preferred)

    def close(self) -> None:
        """Stops every worker this provisioner started: they are this process's children."""
        with self._lock:
            procs = list(self._procs.values())
            self._procs.clear()
        for _, proc in procs:
            proc.stop(self.stop_grace)
