"""Client helpers for the AvatarService: a licence read from a TOML file, registering
an avatar with its image, and usage per avatar as CSV. The ``avatarfarm
register-avatar`` and ``avatarfarm avatar-usage`` commands are built on them; a
tenant's own code can call them the same way.

A licence file holds the fields of the API's Licence::

    person_ref = "talent-0042"              # a contract or talent id, never personal data
    consent_record_id = "consent-2025-117"
    allowed_platforms = ["douyin", "taobao-live"]   # empty or absent: any platform
    allowed_categories = ["cosmetics", "skincare"]
    forbidden_categories = ["alcohol"]
    allowed_languages = ["zh"]                       # BCP 47; "zh" allows "zh-CN"
    valid_from = 2025-01-01T00:00:00Z               # TOML date-times; no offset: UTC
    valid_until = 2026-01-01T00:00:00Z
    live_voice_conversion = false
"""

from __future__ import annotations

import csv
import datetime as dt
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from google.protobuf.timestamp_pb2 import Timestamp

from avatarfarm.client import ClientAuth, open_channel
from avatarfarm.v1 import avatars_pb2, avatars_pb2_grpc

_LISTS = ("allowed_platforms", "allowed_categories", "forbidden_categories", "allowed_languages")
_TEXTS = ("person_ref", "consent_record_id")
_TIMES = ("valid_from", "valid_until")
LICENCE_KEYS = frozenset((*_LISTS, *_TEXTS, *_TIMES, "live_voice_conversion"))
USAGE_COLUMNS = ("avatar_id", "voice", "platform", "tenant", "sessions", "stream_hours", "cost")
CALL_TIMEOUT = 60.0


def timestamp_of(value: object, name: str = "time") -> Timestamp:
    """A Timestamp from a TOML date-time or date, or an ISO 8601 string; a time without
    an offset is UTC."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError as e:
            raise ValueError(f"{name}: {value!r} is not an ISO 8601 date or time "
                             "(e.g. 2025-01-01T00:00:00Z)") from e
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if not isinstance(value, dt.datetime):
        raise ValueError(f"{name}: expected a date-time, got {value!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(dt.UTC))
    return ts


def licence_from_mapping(data: Mapping[str, Any], source: str = "licence") -> avatars_pb2.Licence:
    unknown = set(data) - LICENCE_KEYS
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; known: {sorted(LICENCE_KEYS)}")
    lic = avatars_pb2.Licence()
    for key in _TEXTS:
        if key in data:
            if not isinstance(data[key], str):
                raise ValueError(f"{source}: {key} must be a string")
            setattr(lic, key, data[key])
    for key in _LISTS:
        values = data.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{source}: {key} must be a list of strings")
        getattr(lic, key).extend(values)
    for key in _TIMES:
        if key in data:
            getattr(lic, key).CopyFrom(timestamp_of(data[key], f"{source}: {key}"))
    if "live_voice_conversion" in data:
        if not isinstance(data["live_voice_conversion"], bool):
            raise ValueError(f"{source}: live_voice_conversion must be true or false")
        lic.live_voice_conversion = data["live_voice_conversion"]
    return lic


def licence_from_toml(path: Path) -> avatars_pb2.Licence:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise ValueError(f"cannot read the licence file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: {e}") from e
    return licence_from_mapping(data, str(path))


async def register_avatar(address: str, *, avatar_id: str, image: bytes,
                          licence: avatars_pb2.Licence, tenant: str = "",
                          voice: avatars_pb2.VoiceSettings | None = None,
                          auth: ClientAuth | None = None) -> avatars_pb2.Avatar:
    """Registers (or, for its owner, replaces) an avatar; raises grpc.aio.AioRpcError
    with the scheduler's reason when refused."""
    async with open_channel(address, auth) as ch:
        return await avatars_pb2_grpc.AvatarServiceStub(ch).RegisterAvatar(
            avatars_pb2.RegisterAvatarRequest(avatar_id=avatar_id, tenant=tenant,
                                              reference_image=image, licence=licence,
                                              voice=voice),
            timeout=CALL_TIMEOUT)


async def avatar_usage(address: str, *, avatar_id: str = "", start: Timestamp | None = None,
                       end: Timestamp | None = None,
                       auth: ClientAuth | None = None) -> avatars_pb2.GetAvatarUsageResponse:
    async with open_channel(address, auth) as ch:
        return await avatars_pb2_grpc.AvatarServiceStub(ch).GetAvatarUsage(
            avatars_pb2.GetAvatarUsageRequest(avatar_id=avatar_id, start=start, end=end),
            timeout=CALL_TIMEOUT)


def write_usage_csv(rows: Iterable[avatars_pb2.AvatarUsageRow], out: TextIO) -> None:
    """One line per avatar, registered voice, platform and tenant: what a royalty statement
    is made from (for the person whose face it is, and the one whose voice it is)."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(USAGE_COLUMNS)
    for r in rows:
        w.writerow((r.avatar_id, r.voice, r.platform, r.tenant, r.sessions, f"{r.stream_hours:.6f}",
                    f"{r.cost:.6f}"))
