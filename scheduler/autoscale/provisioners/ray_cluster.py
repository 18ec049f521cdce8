"""The ``ray`` provisioner: workers as Ray actors on an existing Ray cluster.

Each worker is one named, detached actor in the configured namespace. The actor
holds the pool's ``ray_num_gpus`` (fractions allowed: Ray packs several workers on
one GPU and sets their ``CUDA_VISIBLE_DEVICES``) and ``ray_num_cpus`` (0 by
default, so GPU workers are not limited by CPU slots), and runs one real
avatarfarm worker (``workers.server.start``) on its own event loop thread, built
from the pool's ``worker_args`` exactly as ``avatarfarm worker`` builds its
configuration from flags and ``AVATARFARM_WORKER_*`` variables.

The actor's name is the worker's id, ``<pool>-<8 hex digits>``: the registry is
Ray's own list of named actors, so a restarted scheduler finds its workers again
with nothing stored on its side, and a random suffix never reuses the id of a
worker the scheduler still remembers. Every node of the Ray cluster needs
avatarfarm installed (the actor imports this module and the worker packages);
paths in ``worker_args`` are read on the node, so give them absolute.

Ray is imported only here and only on first use: a scheduler without Ray
installed never imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from scheduler.autoscale.provisioners import Instance, PoolConfig, ProvisionerKind
from scheduler.policy.autoscaler import AutoscalerConfig

if TYPE_CHECKING:
    from workers.config import WorkerConfig
    from workers.server import RunningWorker

log = logging.getLogger(__name__)

_SUFFIX = re.compile(r"-[0-9a-f]{8}")
ENV_PREFIX = "AVATARFARM_WORKER_"


class _ArgumentError(argparse.ArgumentParser):
    # argparse exits the process on a bad flag; a scheduler must report it instead.
    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def worker_config(argv: Sequence[str], env: dict[str, str] | None = None) -> WorkerConfig:
    """The WorkerConfig ``avatarfarm worker ARGV`` would run with (``env``: the
    variables read, default the process's)."""
    from avatarfarm import config as cfg
    from workers.config import WorkerConfig

    parser = _ArgumentError(prog="avatarfarm worker", add_help=False)
    cfg.add_arguments(parser, WorkerConfig)
    args = parser.parse_args(list(argv))
    return cfg.load(WorkerConfig, args=args, env_prefix=ENV_PREFIX, env=env)


def pool_of(worker_id: str) -> str | None:
    """The pool a worker id made by this provisioner belongs to (None: not ours)."""
    if len(worker_id) > 9 and _SUFFIX.fullmatch(worker_id, len(worker_id) - 9):
        return worker_id[:-9]
    return None


class _WorkerActor:
    """Lives in the actor's process: one avatarfarm worker on its own event loop.

    Ray calls the actor's methods on its own thread; the worker's grpc servers and
    agent need a loop that nothing else blocks, hence the dedicated thread."""

    def __init__(self, argv: list[str]) -> None:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._argv = argv
        self._loop = asyncio.new_event_loop()
        self._running: RunningWorker | None = None
        self._thread = threading.Thread(target=self._run, name="avatarfarm-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from workers import server

        asyncio.set_event_loop(self._loop)
        try:
            self._running = self._loop.run_until_complete(server.start(worker_config(self._argv)))
        except BaseException:
            log.exception("worker %s failed to start", self._argv[-1])
            logging.shutdown()
            # A worker that cannot start must not keep its GPU share or its name: the
            # process exits, Ray marks the actor dead (it is never restarted) and the
            # autoscaler sees one instance fewer.
            os._exit(1)
        self._loop.run_forever()

    def stop(self, grace: float) -> bool:
        """Stops the worker as SIGTERM would (rooms released, final states sent to the
        scheduler, ports closed). False: it was still starting, nothing to stop."""
        running = self._running
        if running is None:
            return False
        done = asyncio.run_coroutine_threadsafe(running.stop(grace), self._loop)
        try:
            done.result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
        return True


class RayProvisioner:
    """Starts and stops a pool's workers as detached Ray actors.

    The connection to Ray is made on first use, off the scheduler's event loop, so a
    scheduler starts while its Ray cluster is still coming up; ``close`` ends only
    this driver's connection, the actors keep running."""

    kind = ProvisionerKind.RAY

    def __init__(self, config: AutoscalerConfig, scheduler_address: str, *,
                 stop_timeout: float = 30.0, stop_grace: float = 2.0,
                 kill_timeout: float = 30.0) -> None:
        self.config = config
        self.scheduler_address = scheduler_address
        self.stop_timeout = stop_timeout  # for a worker's graceful stop, before ray.kill
        self.stop_grace = stop_grace  # the worker's grpc servers' grace within that
        self.kill_timeout = kill_timeout  # for Ray to free a killed actor's name
        for name, pool in config.pools.items():
            try:
                # Flags only (no environment): a typo fails at start, not in every actor.
                worker_config(self._argv(name, pool, f"{name}-00000000"), env={})
            except ValueError as e:
                raise ValueError(f"autoscaler pool {name!r}: worker_args: {e}") from e
        self._lock = threading.Lock()
        self._ray: Any = None
        self._actor_class: Any = None
        self._owns_connection = False

    def _argv(self, name: str, pool: PoolConfig, worker_id: str) -> list[str]:
        # The pool's device type first, so the worker reports the type the autoscaler
        # matches it to the pool by; the id and scheduler last, so they always win.
        return ["--device-type", pool.device_type, *pool.worker_args,
                "--scheduler", self.scheduler_address, "--worker-id", worker_id]

    def _connect(self) -> Any:
        with self._lock:
            if self._ray is None:
                import ray

                if not ray.is_initialized():
                    ray.init(address=self.config.ray_address, namespace=self.config.ray_namespace,
                             log_to_driver=False)
                    self._owns_connection = True
                # Actor options name the namespace each time, so a connection made by
                # someone else (in another namespace) still finds the same actors.
                self._actor_class = ray.remote(_WorkerActor)
                self._ray = ray
            return self._ray

    def _names(self) -> set[str]:
        ray = self._connect()
        ns = self.config.ray_namespace
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == ns}

    def instances(self, pool: str) -> list[Instance]:
        return [Instance(n, pool) for n in sorted(self._names()) if pool_of(n) == pool]

    def scale(self, pool: str, replicas: int, remove: Sequence[str] = ()) -> None:
        if pool not in self.config.pools:
            raise ValueError(f"unknown pool {pool!r}")
        current = {i.worker_id for i in self.instances(pool)}
        leaving = [w for w in dict.fromkeys(remove) if w in current]
        self._stop(leaving)
        left = len(current) - len(leaving)
        if left > replicas:
            # Only drained workers may leave, and the autoscaler names them: never pick more.
            log.warning("pool %s: %d workers remain for %d replicas (too few named to remove)",
                        pool, left, replicas)
        for _ in range(replicas - left):
            self._start(pool)

    def removable(self, pool: str, preferred: Sequence[str]) -> list[str]:
        return list(preferred)

    def close(self) -> None:
        with self._lock:
            if self._ray is not None and self._owns_connection:
                self._ray.shutdown()
            self._ray = None
            self._actor_class = None
            self._owns_connection = False

    def _start(self, pool: str) -> str:
        self._connect()
        cfg = self.config.pools[pool]
        worker_id = f"{pool}-{secrets.token_hex(4)}"
        # Creating a named actor registers its name before returning, so the new
        # worker is listed (booting) at once, before Ray has placed it.
        self._actor_class.options(
            name=worker_id, namespace=self.config.ray_namespace, lifetime="detached",
            num_gpus=cfg.ray_num_gpus, num_cpus=cfg.ray_num_cpus, max_restarts=0,
        ).remote(self._argv(pool, cfg, worker_id))
        log.info("pool %s: started worker actor %s (GPU %g, CPU %g)", pool, worker_id,
                 cfg.ray_num_gpus, cfg.ray_num_cpus)
        return worker_id

    def _stop(self, worker_ids: Sequence[str]) -> None:
        if not worker_ids:
            return
        ray = self._connect()
        handles = {}
        for w in worker_ids:
            try:
                handles[w] = ray.get_actor(w, namespace=self.config.ray_namespace)
            except ValueError:
                continue  # gone already
        calls = {w: h.stop.remote(self.stop_grace) for w, h in handles.items()}
        done, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=self.stop_timeout)
        for w, ref in calls.items():
            if ref not in done:
                log.warning("worker %s did not stop within %.0f s; killing it", w, self.stop_timeout)
                continue
            try:
                if not ray.get(ref):
                    log.info("worker %s was still starting; killing it", w)
            except ray.exceptions.RayError as e:
                log.warning("worker %s: graceful stop failed (%s); killing it", w, e)
        # The stopped worker's process still holds its GPU share and name: free both.
        for h in handles.values():
            ray.kill(h, no_restart=True)
        deadline = time.monotonic() + self.kill_timeout
        while (still := self._names() & set(handles)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if still:
            log.warning("Ray still lists %s after %.0f s", sorted(still), self.kill_timeout)
        log.info("stopped worker actors %s", sorted(handles))
