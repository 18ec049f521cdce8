"""The scheduler's one configuration object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from avatarfarm import egress
from avatarfarm.config import field
from scheduler.policy.autoscaler import AutoscalerConfig
from scheduler.policy.platforms import PlatformPolicy
from scheduler.policy.tenants import TenantConfig


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    listen: str = field("127.0.0.1:50051", "host:port of the gRPC API (sessions and workers)")
    metrics_port: int = field(9464, "port of the Prometheus /metrics endpoint (0: off, -1: any free port)")
    metrics_host: str = field("127.0.0.1", "address the metrics endpoint binds to")
    status_page_open: bool = field(
        False, "serve the status pages (/, /status, /status.json on the metrics port) without "
               "a login; by default they take an admin token or admin API key (HTTP Basic "
               "password, bearer token or x-api-key). For a proxy that authenticates operators")
    status_page_hosts: list[str] = field(
        [], "host names the status pages answer to, besides localhost, the loopback addresses "
            "and metrics_host (a request naming another host is refused: DNS rebinding)")
    database: Path = field(Path("var/state/scheduler.db"),
                           "SQLite file holding the scheduler's state (when database_url is empty)")
    database_url: str = field(
        "", "PostgreSQL connection URI (postgresql://USER@HOST:5432/DB) of a shared store for "
            "replicated schedulers; the password is best left out of it, in PGPASSWORD or a "
            "password file (PGPASSFILE). Needs the postgresql extra. Empty: the SQLite file "
            "`database`")
    lease_seconds: float = field(
        5.0, "seconds the lead of schedulers sharing a PostgreSQL store lasts unless renewed "
             "(renewed every fifth of it): a follower takes over about this long after the "
             "leader dies or is cut off")
    advertise_address: str = field(
        "", "host:port tenants and workers reach this scheduler at, which followers name as "
            "the leader's (default: the listen address, this host's name if that is a "
            "wildcard)")
    leader_pod: str = field(
        "", "NAMESPACE/NAME of this scheduler's Kubernetes pod (downward API): while it "
            "leads, the pod carries the label avatarfarm.io/leader=true, which the Service of "
            "tenants and workers selects (needs list and patch on pods); empty: no label")
    input_secret_file: Path | None = field(
        None, "file holding the secret (>= 32 bytes) each room's live-input key is derived "
              "from (default: DATABASE.input-secret beside the database, made on first start)")
    input_token_ttl: float = field(
        900.0, "seconds a room's live-input token is valid (tenants renew it by reading the "
               "session again; an input stream is checked when it opens)")
    sync_to_disk: bool = field(
        True, "fsync every commit before answering (false: a scheduler crash still loses "
              "nothing, a host crash may lose the last commits; lower latency)")
    avatar_dir: Path = field(Path("var/models/avatars"), "folder of known avatar images (the "
                                                         "workers' avatar folder: registered "
                                                         "avatars' images are written here)")
    require_licence: bool = field(
        False, "refuse rooms whose avatar has no licence registered (local avatar files, the "
               "built-in presenter included, then need RegisterAvatar too)")
    licence_end_grace: float = field(
        60.0, "seconds a worker has to end a room at its next script boundary once the avatar's "
              "licence is revoked or expires; then the scheduler ends the room")
    avatar_image_max_bytes: int = field(
        3 * 1024 * 1024, "largest reference image RegisterAvatar accepts (RESOURCE_EXHAUSTED "
                         "beyond; keep it below max_message_bytes, which bounds the whole request)")
    avatar_video_max_bytes: int = field(
        3 * 1024 * 1024, "largest reference video RegisterAvatar accepts (RESOURCE_EXHAUSTED "
                         "beyond): a clip is one message, so raise max_message_bytes with it "
                         "for longer or sharper clips")
    voice_model_max_bytes: int = field(
        128 * 1024 * 1024, "largest Piper voice model RegisterVoice accepts (RESOURCE_EXHAUSTED "
                           "beyond): the request is one message, so a medium voice (about 60 MB) "
                           "needs max_message_bytes raised too")
    avatar_crop_sides: list[int] = field(
        [96, 256], "face crop sides a video avatar is prepared at: the crop sides of the "
                   "workers' Wav2Lip-family models (96 for Wav2Lip, 256 or 384 for the larger "
                   "community variants)")
    face_detector: str = field(
        "", "ONNX face detector that prepares video avatars (one input [1, 3, H, W], outputs "
            "scores [1, N, 2] and boxes [1, N, 4], as UltraFace exports); empty: OpenCV's "
            "bundled cascade")
    device_prices: dict[str, float] = field(
        {"cpu": 0.10, "l4": 0.80, "h100": 4.00, "h200": 5.00},
        "price per device-hour by device type, in your currency")
    default_price_per_hour: float = field(1.00, "price per device-hour for unlisted device types")
    utilisation_target: float = field(0.9, "fraction of a worker's measured capacity to fill")
    overcommit: float = field(1.0, "capacity multiplier; >1 only for offline (non real-time) rendering")
    heartbeat_interval: float = field(
        1.0, "seconds between a worker's reports (heartbeat or usage) in a small fleet, and "
             "between the scheduler's passes over its state")
    worker_reports_per_second: float = field(
        500.0, "the worker reports a second the scheduler aims to receive at most: a larger "
               "fleet is told to report less often (up to a third of worker_timeout)")
    worker_endpoint_check: bool = field(
        True, "refuse a worker whose input_endpoint (handed to tenants for live inputs) is "
              "not an address of its own connection; turn off only where workers reach the "
              "scheduler through a proxy that hides their addresses")
    worker_timeout: float = field(5.0, "a worker silent this long is considered lost")
    orphan_grace: float = field(15.0, "after a restart, seconds to wait for a room's worker to return")
    list_page_size: int = field(100, "default page size of ListSessions")
    usage_flush_interval: float = field(
        5.0, "seconds between writes of rooms' progress and the usage ledger (workers resend "
             "unacknowledged usage reports after a restart, and progress is cumulative)")
    tenants: dict[str, TenantConfig] = field(
        {}, "per-tenant budgets and reservations, as [tenants.NAME] tables: concurrency_units, "
            "spend_budget, spend_period_seconds, on_budget_exhausted (degrade|stop), "
            "grace_seconds, reserved_units, reserved_hours (\"HH:MM-HH:MM\" in timezone), timezone, "
            "weight, api_keys_sha256, rate_limit_per_second, "
            "rate_limit_burst")
    platforms: dict[str, PlatformPolicy] = field(
        {}, "output platforms' policies, as [platforms.NAME] tables: label (burn a visible "
            "AI-generated label), label_text, label_position (top-left|top-right|bottom-left|"
            "bottom-right), label_size (fraction of the frame height), require_live_driver "
            "(refuse text-driven rooms; camera rooms drive only while their driver is live, "
            "not frozen, looped or faceless), end_when_driver_lost (end a camera room whose "
            "driver left or is not live for driver_grace_seconds, default 10; otherwise it "
            "holds on its idle loop), ban_voice_conversion (default true: refuse rooms that "
            "convert a live speaker's voice into another person's); unlisted platforms are "
            "labelled with the defaults")
    allow_unknown_tenants: bool = field(
        True, "admit rooms of tenants not listed in tenants (with no budget and no reservation)")
    degradation_ladder: list[str] = field(
        ["1.0@25", "0.75@25", "0.5@25"],
        "steps a standard room may go down when capacity is short, as scale@fps of its own "
        "quality (720p30 -> 720p25 -> 540p25 -> 360p25 with the default)")
    step_up_margin: float = field(0.15, "a degraded room steps back up only when its worker "
                                        "stays this far below the utilisation target")
    step_dwell: float = field(30.0, "seconds a room stays at a degradation step before stepping up")
    premium_spread: int = field(4, "at most this many premium rooms of one tenant per worker "
                                   "while other workers can take them")
    tenant_metrics: bool = field(False, "label cost metrics by tenant (configured tenants only)")
    rtmp_allowed_hosts: list[str] = field([], egress.ALLOWED_HOSTS_HELP)
    rtmp_forbidden_hosts: list[str] = field([], egress.FORBIDDEN_HOSTS_HELP)
    rtmp_allowed_ports: list[int] = field([], egress.ALLOWED_PORTS_HELP)
    # Security: see the README's "Security" section.
    tls_cert_file: Path | None = field(None, "PEM certificate of the gRPC port (with tls_key_file: TLS)")
    tls_key_file: Path | None = field(None, "PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = field(
        None, "PEM CA bundle of client certificates: set, every client must present a certificate "
              "it signed (mTLS), and a URI SAN avatarfarm://tenant|worker|admin/NAME identifies it")
    token_secret_file: Path | None = field(
        None, "file holding the key (at least 32 bytes) that signs and verifies bearer tokens "
              "(`avatarfarm token` mints them); set, tokens are accepted")
    admin_api_keys_sha256: list[str] = field(
        [], "SHA-256 (hex) of operator API keys, which may act on every tenant "
            "(tenants' keys: api_keys_sha256 in [tenants.NAME])")
    allow_insecure: bool = field(
        False, "listen on a non-loopback address with no authentication configured (anyone who "
               "reaches the port acts as the operator)")
    rate_limit_per_second: float = field(
        20.0, "session API calls per second each tenant may make on average (0: no limit; "
              "[tenants.NAME] rate_limit_per_second overrides it)")
    rate_limit_burst: float = field(
        40.0, "session API calls a tenant may make at once after a quiet spell "
              "([tenants.NAME] rate_limit_burst overrides it)")
    autoscaler: AutoscalerConfig = field(
        AutoscalerConfig(),
        "worker pools the autoscaler keeps sized to demand, as an [autoscaler] table: "
        "provisioner (none: recommend only | local | ray | kubernetes), interval_seconds, "
        "headroom, ramp_seconds (the demand's growth started ahead: a worker's boot time), "
        "ramp_window_seconds, scale_down_window_seconds, scale_down_step, scale_down_tolerance, "
        "reserved_spare (the share of unused premium reservations kept free, 1: all), "
        "drain_deadline_seconds, "
        "boot_timeout_seconds, scheduler_address (how started workers reach the scheduler), "
        "local_log_dir, "
        "ray_address, ray_namespace, and [autoscaler.pools.NAME] tables: "
        "device_type, min_workers, max_workers, units_per_worker, worker_args (local), "
        "ray_num_gpus, ray_num_cpus (ray), namespace, workload, workload_name (kubernetes)")
    max_message_bytes: int = field(4 * 1024 * 1024, "largest gRPC message received or sent; a "
                                                    "larger one is refused (RESOURCE_EXHAUSTED)")

    def price(self, device_type: str) -> float:
        return self.device_prices.get(device_type, self.default_price_per_hour)
