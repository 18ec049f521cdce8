"""What a worker may say about itself when it registers.

The scheduler hands a worker's ``input_endpoint`` to tenants (their live audio goes
there) and places rooms by its profiles, so neither is taken as sent: ids are short
names, figures are finite and possible, and the endpoint is an address of the very
connection the worker registered on (by address, or by a name that resolves to it).
A worker behind a proxy that hides its address needs ``worker_endpoint_check = false``.
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

from avatarfarm.domain import LIMITS, InvalidRequest, IPAddress, validate_id, validate_voice
from avatarfarm.egress import Resolver, system_resolver

MAX_BATCH = 4096
MAX_CALL_SECONDS = 60.0  # no model call of a real-time worker takes a minute
MAX_CORES = 4096
MAX_MEMORY_BYTES = 64 * 2**40
MAX_NAME = 128
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_PROVIDER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_FAMILY = re.compile(r"[a-z0-9_-]{1,32}(?:/[a-z0-9_-]{1,32})?")
MAX_FAMILIES = 64
MAX_VOICES = 1024


def _finite(name: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidRequest(f"{name} {value!r} is not between {low:g} and {high:g}")


def check_profiles(profiles: Iterable[Any]) -> None:
    """Refuses a latency profile no device could have: a batch size outside 1..4096, a
    call that takes no time, a negative, endless or NaN time, or longer than a minute."""
    for p in profiles:
        if p.width > LIMITS.max_width or p.height > LIMITS.max_height:
            raise InvalidRequest(f"profile size {p.width}x{p.height} is beyond any room's")
        if len(p.model) > MAX_NAME:
            raise InvalidRequest("profile model name is longer than 128 characters")
        for lat in p.latencies:
            if not 1 <= lat.batch_size <= MAX_BATCH:
                raise InvalidRequest(f"profile batch size {lat.batch_size} is not 1..{MAX_BATCH}")
            if not (math.isfinite(lat.seconds) and 0 < lat.seconds <= MAX_CALL_SECONDS):
                raise InvalidRequest(f"profile latency {lat.seconds!r} s at batch {lat.batch_size} "
                                     f"is not a possible call time (over 0, at most "
                                     f"{MAX_CALL_SECONDS:g} s)")


def check_register(reg: Any) -> None:
    """Refuses a Register whose fields are malformed or impossible (InvalidRequest)."""
    validate_id("worker_id", reg.worker_id)
    d = reg.device
    if d.device_type:
        validate_id("device_type", d.device_type)
    if d.provider and not _PROVIDER.fullmatch(d.provider):
        raise InvalidRequest("device provider must be up to 64 letters, digits, '_', '.' or '-'")
    if len(d.name) > MAX_NAME:
        raise InvalidRequest("device name is longer than 128 characters")
    _finite("cpu_cores", d.cpu_cores, 0, MAX_CORES)
    _finite("memory_bytes", d.memory_bytes, 0, MAX_MEMORY_BYTES)
    _finite("latency_budget_seconds", d.latency_budget_seconds, 0, MAX_CALL_SECONDS)
    m = reg.memory
    _finite("models_bytes", m.models_bytes, 0, MAX_MEMORY_BYTES)
    _finite("avatar_bytes_per_pixel", m.avatar_bytes_per_pixel, 0, 2**20)
    _finite("room_bytes_per_pixel", m.room_bytes_per_pixel, 0, 2**20)
    check_profiles(reg.profiles)
    for avatar in (*reg.avatars, *reg.warm_avatars):
        validate_id("avatar", avatar)
    if len(reg.face_families) > MAX_FAMILIES:
        raise InvalidRequest(f"face_families lists more than {MAX_FAMILIES} families")
    for family in reg.face_families:
        if not _FAMILY.fullmatch(family):
            raise InvalidRequest(f"face family {family[:100]!r} is not a family name (letters, "
                                 "digits, '_', '-', one '/' before its variant)")
    if len(reg.voices) > MAX_VOICES:
        raise InvalidRequest(f"voices lists more than {MAX_VOICES} voices")
    for voice in reg.voices:
        validate_voice("a worker's voice", voice, required=True)
    for room in reg.active_rooms:
        validate_id("active room", room.session_id)
    endpoint_parts(reg.input_endpoint)
    if reg.driver_ingest:
        endpoint_parts(reg.driver_ingest, "driver_ingest")
    if reg.driver_whip:
        endpoint_parts(reg.driver_whip, "driver_whip")


def endpoint_parts(endpoint: str, name: str = "input_endpoint") -> tuple[str, int]:
    """host and port of ``host:port`` (``[v6]:port``), or InvalidRequest."""
    host, sep, port = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    elif not _HOST.fullmatch(host):
        host = ""
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidRequest(f"{name} {endpoint[:100]!r} is not host:port")
    return host, int(port)


def peer_address(peer: str) -> IPAddress | None:
    """The IP address of a gRPC peer (``ipv4:1.2.3.4:5``; ``ipv6:%5B::1%5D:5`` as grpc
    writes it, percent-encoded, or ``ipv6:[::1]:5``); None for a peer that is no IP
    connection (``unix:...``). An IP peer that does not parse is refused."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = urllib.parse.unquote(rest).rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError as e:
        raise InvalidRequest(f"cannot read the connection's address {peer[:80]!r}") from e


async def check_endpoint(endpoint: str, peer: str, resolve: Resolver = system_resolver) -> None:
    """Refuses an input_endpoint that is not an address of the connection's peer: an IP
    other than the peer's (loopback for a loopback peer), or a name that does not resolve
    to it. A peer that is no IP connection (a Unix socket) is not checked."""
    host, port = endpoint_parts(endpoint)
    seen = peer_address(peer)
    if seen is None:
        return
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = await resolve(host, port)
        except (OSError, UnicodeError) as e:
            raise InvalidRequest(f"input_endpoint host {host!r} does not resolve: {e}") from e
    for a in addresses:
        if a == seen or (a.is_loopback and seen.is_loopback):
            return
        mapped = getattr(seen, "ipv4_mapped", None)
        if mapped is not None and a == mapped:
            return
    raise InvalidRequest(f"input_endpoint {endpoint[:100]!r} is not an address of this worker "
                         f"(it connected from {seen}); set advertise_host to the address tenants "
                         "reach it at")
