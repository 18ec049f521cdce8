"""The worker's Prometheus metrics, declared once; labels bounded to tier,
stage, provider and device type (never a room id)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from avatarfarm.domain import Tier


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.info = Gauge("avatarfarm_worker_info", "Provider actually in use and device type",
                          ["provider", "device_type"], registry=r)
        self.rooms = Gauge("avatarfarm_worker_rooms", "Rooms rendering on this worker", ["tier"],
                           registry=r)
        self.frames = Counter("avatarfarm_worker_frames_rendered", "Frames rendered", ["tier"],
                              registry=r)
        self.late = Counter("avatarfarm_worker_late_frames",
                            "Frames finished after their presentation deadline", ["tier"], registry=r)
        self.stage_seconds = Counter("avatarfarm_worker_stage_seconds",
                                     "Device time spent per pipeline stage", ["stage"], registry=r)
        self.failures = Counter("avatarfarm_worker_room_failures", "Rooms that failed", ["tier"],
                                registry=r)

    def room_counts(self, counts: dict[Tier, int]) -> None:
        for tier in Tier:
            self.rooms.labels(tier.value).set(counts.get(tier, 0))
