"""The worker's one configuration object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from avatarfarm import egress
from avatarfarm.config import field
from avatarfarm.domain import Limits
from workers.device.onnx import ProviderChoice
from workers.rooms.room import MIN_RENDER_SIDE, Pacing


def _sizes(name: str, text: str, *, square: bool = False) -> list[tuple[int, int]]:
    """Comma-separated WIDTHxHEIGHT (or one side for a square; only sides where `square`),
    each side within what a room may ask for; a ValueError names the option and what to
    change."""
    what = "a side" if square else "WIDTHxHEIGHT"
    out = []
    low, high = MIN_RENDER_SIDE, max(Limits().max_width, Limits().max_height)
    for part in filter(None, (p.strip() for p in text.split(","))):
        w, sep, h = part.partition("x")
        if not (w.isdigit() and (not sep or (h.isdigit() and not square))):
            raise ValueError(f"{name}: {part!r} is not {what}")
        size = (int(w), int(h or w))
        if not all(low <= s <= high for s in size):
            raise ValueError(f"{name}: {part!r}: each side must be between {low} and {high} pixels")
        out.append(size)
    if not out:
        raise ValueError(f"{name}: give at least one size")
    return out


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    scheduler: str = field(
        "127.0.0.1:50051", "host:port of the scheduler; replicated schedulers may be listed "
                           "(host1:port,host2:port): the worker finds the one that leads")
    listen: str = field("127.0.0.1:0", "host:port for live inputs and health (port 0: any free)")
    advertise_host: str = field("", "host clients use to reach this worker (default: listen host)")
    driver_port: int = field(0, "port of the RTMP ingest camera rooms' drivers publish to, on the "
                                "listen host (0: any free port; -1: no ingest, no camera rooms)")
    whip_port: int = field(0, "port of the WHIP ingest (WebRTC over HTTP) camera rooms' drivers may "
                              "publish to from a browser or OBS, on the listen host (0: any free "
                              "port; -1: none)")
    worker_id: str = field("", "unique worker id (default: host name and process id)")
    model_dir: Path = field(Path("var/models"), "model folder (manifest.json, ONNX models, avatars/)")
    output_dir: Path = field(Path("var/out"), "folder that file and HLS outputs are written under")
    provider: ProviderChoice = field(ProviderChoice.AUTO, "onnxruntime provider: auto, cpu, cuda, tensorrt")
    intra_op_threads: int = field(0, "onnxruntime threads per call (0: all cores but a quarter, "
                                     "at least one, the rest left to encoders)")
    max_batch: int = field(8, "largest cross-room batch per model call; latency is measured "
                              "at powers of two up to it")
    batch_wait: float = field(0.02, "seconds a batch that is not full may wait for more rooms' "
                                    "frames (never past the frames' slack)")
    device_type: str = field("", "device type used for pricing, e.g. h200 (default: cpu or gpu)")
    device_memory: int = field(0, "bytes of device memory reported to the scheduler (0: the "
                                  "host's memory on CPU; unknown on a GPU, which onnxruntime "
                                  "does not report)")
    drain_timeout: float = field(
        30.0, "on SIGTERM, seconds to wait while the scheduler hands this worker's rooms over "
              "to other workers before ending the rest (0: end them at once; a second signal "
              "ends them at once)")
    pacing: Pacing = field(Pacing.REALTIME, "realtime (live streams) or fast (as fast as possible)")
    latency_budget: float = field(0.5, "seconds between a frame's capture time and its "
                                       "presentation (the stream's buffer)")
    output_margin: float = field(0.1, "seconds of the latency budget kept for encoding and output; "
                                      "a frame not rendered by then is replaced")
    sync_interval: float = field(10.0, "seconds between lip-sync checks of a room")
    inject_video_drift_ppm: float = field(
        0.0, "testing only: every room's video falls behind its audio by this many parts per "
             "million of stream time, for the lip-sync corrector to correct (0: off)")
    encoder_codec: str = field("auto", "video encoder: auto (h264_nvenc where the GPU has NVENC, "
                                       "else libx264), libx264, h264_nvenc")
    encoder_preset: str = field("veryfast", "libx264 preset")
    encoder_processes: int = field(
        -1, "processes that encode file and HLS outputs, each holding many rooms' encoders, "
            "off this process's interpreter lock (-1: one per core, up to 16; 0: encoder "
            "threads in this process); RTMP outputs always keep a thread of their own")
    profile_render_sides: str = field("256,512", "portrait sides the renderer is measured at")
    profile_encode_sizes: str = field("512x512,1280x720", "frame sizes the encoder is measured at")
    profile_iterations: int = field(5, "timed calls per measured size")
    metrics_port: int = field(-1, "Prometheus /metrics port (0: off, -1: any free port)")
    metrics_host: str = field("127.0.0.1", "address the metrics endpoint binds to")
    tts_voice: str = field("en", "voice of text-driven rooms: a neural voice in the model folder's "
                                 "voices/ (a Piper export NAME.onnx with NAME.onnx.json, run on "
                                 "the device and batched across rooms), else an espeak-ng voice")
    # Security: see the README's "Security" section.
    scheduler_tls: bool = field(False, "connect to the scheduler with TLS (implied by "
                                       "scheduler_ca_file and scheduler_cert_file)")
    scheduler_ca_file: Path | None = field(
        None, "PEM CA that signed the scheduler's certificate (default: the system's roots)")
    scheduler_cert_file: Path | None = field(
        None, "PEM client certificate for a scheduler that requires mTLS (URI SAN "
              "avatarfarm://worker/ID)")
    scheduler_key_file: Path | None = field(None, "PEM private key of scheduler_cert_file")
    token_file: Path | None = field(
        None, "file holding this worker's token (`avatarfarm token --worker ID`), re-read when "
              "it changes")
    tls_cert_file: Path | None = field(
        None, "PEM certificate of the live-input port (with tls_key_file: TLS)")
    tls_key_file: Path | None = field(None, "PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = field(
        None, "PEM CA of client certificates the live-input port requires (mTLS)")
    max_message_bytes: int = field(4 * 1024 * 1024, "largest gRPC message the live-input port "
                                                    "receives; a larger one is refused")
    rtmp_allowed_hosts: list[str] = field([], egress.ALLOWED_HOSTS_HELP)
    rtmp_forbidden_hosts: list[str] = field([], egress.FORBIDDEN_HOSTS_HELP)
    rtmp_allowed_ports: list[int] = field([], egress.ALLOWED_PORTS_HELP)

    def __post_init__(self) -> None:
        # Refused at start-up with the option's name, not half-way through profiling.
        self.render_sides()
        self.encode_sizes()
        if self.encoder_processes < -1:
            raise ValueError(f"encoder_processes: {self.encoder_processes} is not -1, 0 or a "
                             "number of processes")

    def render_sides(self) -> list[int]:
        return [w for w, _ in _sizes("profile_render_sides", self.profile_render_sides, square=True)]

    def encode_sizes(self) -> list[tuple[int, int]]:
        return _sizes("profile_encode_sizes", self.profile_encode_sizes)
