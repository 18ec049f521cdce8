"""The worker's Prometheus metrics, declared once; labels bounded to tier,
stage, model (with its input side), batch size, provider and device type
(never a room id)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
                            "Frames that missed their deadline and were replaced by the last good "
                            "frame", ["tier"], registry=r)
        # Of those, two ways a worker past its capacity sheds work it cannot show: a frame
        # whose deadline passed before its producer reached it, and a repeat held on a frame
        # still waiting for its encoder. Rising, they say the host (not the device) is behind.
        self.given_up = Counter("avatarfarm_worker_frames_given_up",
                                "Late frames a room behind real time gave up before any work",
                                ["tier"], registry=r)
        self.held = Counter("avatarfarm_worker_frames_held",
                            "Frames held on a repeat of them still waiting for the encoder, "
                            "not encoded apart (the encoder was behind)", ["tier"], registry=r)
        self.batches = Counter("avatarfarm_worker_batches",
                               "Inference calls by model and batch size (the batch-size histogram)",
                               ["model", "batch_size"], registry=r)
        self.batch_items = Counter("avatarfarm_worker_batch_items",
                                   "Items run on the device (frames, audio windows, sync checks)",
                                   ["model"], registry=r)
        self.dropped = Counter("avatarfarm_worker_items_dropped",
                               "Items the batcher dropped because they could not make their "
                               "deadline", ["model"], registry=r)
        self.shed = Counter("avatarfarm_worker_items_shed",
                            "Items the batcher gave up early because the device was overloaded "
                            "(lowest tier first)", ["model"], registry=r)
        self.capacity = Gauge("avatarfarm_worker_capacity_items_per_second",
                              "Items per second at the best batch size within the latency budget, "
                              "from the latency profile corrected by live timings", ["model"],
                              registry=r)
        self.av_offset = Histogram("avatarfarm_worker_av_offset_seconds",
                                   "Audio-video offset measured by lip-sync checks (> 0: video "
                                   "behind audio), before correction", ["tier"],
                                   buckets=(-0.32, -0.2, -0.12, -0.08, -0.04, -0.001, 0.001, 0.04,
                                            0.08, 0.12, 0.2, 0.32), registry=r)
        self.driver_latency = Histogram(
            "avatarfarm_worker_driver_latency_seconds",
            "Camera rooms: from a driver's frame arriving at the worker to the avatar frame that "
            "shows it going to the encoder", ["tier"],
            buckets=(0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0), registry=r)
        self.sync_corrections = Counter("avatarfarm_worker_av_corrections",
                                        "Lip-sync drift corrections applied", ["tier"], registry=r)
        self.stage_seconds = Counter("avatarfarm_worker_stage_seconds",
                                     "Device time spent per pipeline stage", ["stage"], registry=r)
        self.failures = Counter("avatarfarm_worker_room_failures", "Rooms that failed", ["tier"],
                                registry=r)
        self.degraded = Gauge("avatarfarm_worker_degraded_rooms",
                              "Rooms rendering below their spec's quality (a degradation step)",
                              ["tier"], registry=r)
        self.tts_service_requests = Counter(
            "avatarfarm_worker_tts_service_requests",
            "Requests to TTS services, by voice and outcome (ok, failed)", ["voice", "outcome"],
            registry=r)
        self.tts_service_open = Gauge(
            "avatarfarm_worker_tts_service_circuit_open",
            "1 while a TTS service's circuit breaker is open or probing (its rooms hold)",
            ["voice"], registry=r)
        self.reconfigurations = Counter("avatarfarm_worker_reconfigurations",
                                        "Live quality changes applied to running rooms", ["tier"],
                                        registry=r)

    def room_counts(self, counts: dict[Tier, int], degraded: dict[Tier, int] | None = None) -> None:
        for tier in Tier:
            self.rooms.labels(tier.value).set(counts.get(tier, 0))
            self.degraded.labels(tier.value).set((degraded or {}).get(tier, 0))
