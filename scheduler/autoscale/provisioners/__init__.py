"""Provisioners: what starts and stops GPU workers for the autoscaler.

One small interface, three engines, chosen by configuration
(``[autoscaler] provisioner``):

- ``local`` — worker processes on this machine (the embedded default);
- ``ray`` — workers as Ray actors holding ``num_gpus`` (fractions allowed) on an
  existing Ray cluster (``scheduler.autoscale.provisioners.ray_cluster``);
- ``kubernetes`` — the pool's Deployment or StatefulSet scaled through the API
  server; drained pods are marked with the lowest pod-deletion-cost before the
  replica count goes down, so the ReplicaSet removes exactly those
  (``scheduler.autoscale.provisioners.kubernetes_api``).

The autoscaler decides *how many* workers a pool needs and *which* ones leave
(only workers the scheduler has drained); a provisioner only carries that out.
Its calls may block (a process spawn, a Ray or Kubernetes API call): the
autoscaler runs them off the scheduler's event loop.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class ProvisionerKind(enum.Enum):
    NONE = "none"  # workers come and go by themselves; no autoscaling
    LOCAL = "local"
    RAY = "ray"
    KUBERNETES = "kubernetes"


class WorkloadKind(enum.Enum):
    DEPLOYMENT = "Deployment"
    STATEFULSET = "StatefulSet"


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """One pool of interchangeable workers (an ``[autoscaler.pools.NAME]`` table).

    A pool has one device type; the autoscaler keeps between ``min_workers`` and
    ``max_workers`` of them. The engine settings below are read only by the
    provisioner in use."""

    device_type: str = "cpu"
    min_workers: int = 0
    max_workers: int = 8
    # Compute units one worker carries at the utilisation target (0: measured
    # from the pool's connected workers; set it to scale a pool up from zero).
    units_per_worker: float = 0.0
    # local: extra `avatarfarm worker` flags for this pool's processes.
    worker_args: list[str] = field(default_factory=list)
    # ray: the fraction (or number) of GPUs each worker actor holds, and its CPUs
    # (0: the actor takes no CPU slot, so GPU actors are not limited by CPUs).
    ray_num_gpus: float = 1.0
    ray_num_cpus: float = 0.0
    # kubernetes: the workload that runs this pool's workers.
    namespace: str = "avatarfarm"
    workload: WorkloadKind = WorkloadKind.DEPLOYMENT
    workload_name: str = "avatarfarm-worker"

    def __post_init__(self) -> None:
        if self.min_workers < 0 or self.max_workers < self.min_workers:
            raise ValueError("need 0 <= min_workers <= max_workers")
        if self.units_per_worker < 0:
            raise ValueError("units_per_worker must not be negative")
        if self.ray_num_gpus < 0 or self.ray_num_cpus < 0:
            raise ValueError("ray_num_gpus and ray_num_cpus must not be negative")


@dataclass(frozen=True, slots=True)
class Instance:
    """A worker the provisioner started (and has not stopped). ``worker_id`` is the
    id the worker registers with: the scheduler matches the two by it."""

    worker_id: str
    pool: str


class Provisioner(Protocol):
    """Starts and stops a pool's workers. Implementations are thread-safe enough to
    be called from one worker thread at a time."""

    kind: ProvisionerKind

    def instances(self, pool: str) -> list[Instance]:
        """The pool's workers as the engine sees them: booting and running alike."""
        ...

    def scale(self, pool: str, replicas: int, remove: Sequence[str] = ()) -> None:
        """Make the pool ``replicas`` workers. Going down, exactly the workers named
        in ``remove`` leave (the scheduler drained them first); going up, new workers
        are started. ``remove`` names at least ``len(instances) - replicas`` workers
        when the pool shrinks."""
        ...

    def removable(self, pool: str, preferred: Sequence[str]) -> list[str]:
        """The workers of ``preferred`` (the scheduler's order: fewest rooms first) this
        engine can remove, in the order to remove them. Processes, Ray actors and a
        Deployment's pods take the order as it is; a StatefulSet removes its highest
        ordinals first, so only those are offered."""
        ...

    def close(self) -> None:
        """Releases the engine's client. Ray actors and Kubernetes pods keep running (a
        scheduler restart is not a scale-down); local worker processes, children of
        the scheduler, are stopped."""
        ...
