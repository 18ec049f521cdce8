"""Live-input credentials: who may feed a room's audio and motion.

Each room has its own key, derived by the scheduler from its secret and the session id
(``room_key``) and sent to the worker with the room's assignment (the same key on every
worker the room moves to). The scheduler mints short-lived tokens with it for the room's
tenant (``Session.input_token``, renewed by reading the session again); the worker checks
them with the room's key alone, without asking the scheduler. A token names its room
and tenant and is signed with that room's key, so it opens that room and nothing else.

    afi1.<base64url claims JSON>.<base64url HMAC-SHA256 over "afi1.<claims>">
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass

PREFIX = "afi1"
INPUT_TOKEN_TTL = 900.0  # seconds a token opens its room's inputs; read the session again to renew
MAX_TOKEN_CHARS = 1024
_LABEL = b"avatarfarm live input v1\x00"


class InputRefused(Exception):
    """The token does not open this room (the caller gets one answer for every case)."""


class InputTokenExpired(InputRefused):
    """A token of this very room that expired: its holder may renew it."""


@dataclass(frozen=True, slots=True)
class InputToken:
    token: str
    expires_at: int  # Unix seconds


def room_key(secret: bytes, session_id: str) -> bytes:
    """The room's own key, from the scheduler's secret (at least 32 bytes)."""
    if len(secret) < 32:
        raise ValueError("the live-input secret must be at least 32 bytes")
    return hmac.new(secret, _LABEL + session_id.encode("utf-8"), hashlib.sha256).digest()


def driver_key(key: bytes) -> str:
    """The room's stream key for its camera driver (the last part of Session.driver_url),
    from the room's own key: secret, the same on every worker the room moves to, and
    not its session id."""
    return _b64(hmac.new(key, b"driver ingest v1", hashlib.sha256).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _sign(key: bytes, signed: str) -> str:
    return _b64(hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest())


def mint(key: bytes, session_id: str, tenant: str, *, ttl: float = INPUT_TOKEN_TTL,
         now: float) -> InputToken:
    expires = int(now + ttl)
    claims = _b64(json.dumps({"sid": session_id, "tenant": tenant, "exp": expires},
                             separators=(",", ":"), sort_keys=True).encode())
    signed = f"{PREFIX}.{claims}"
    return InputToken(f"{signed}.{_sign(key, signed)}", expires)


def verify(key: bytes, token: str, session_id: str, *, now: float) -> str:
    """The tenant a valid token of room `session_id` names; raises InputRefused (or
    InputTokenExpired for this room's own token past its time)."""
    if (not key or not token or len(token) > MAX_TOKEN_CHARS or not token.isascii()
            or token.count(".") != 2):
        raise InputRefused("no valid input token")
    prefix, claims, signature = token.split(".")
    if prefix != PREFIX or not hmac.compare_digest(_sign(key, f"{prefix}.{claims}"), signature):
        raise InputRefused("no valid input token")
    try:
        data = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
        sid, tenant, expires = str(data["sid"]), str(data["tenant"]), int(data["exp"])
    except (binascii.Error, ValueError, KeyError, TypeError) as e:
        raise InputRefused("no valid input token") from e
    if sid != session_id:
        raise InputRefused("no valid input token")
    if expires <= now:
        raise InputTokenExpired(f"the input token expired {now - expires:.0f} s ago; read the "
                                "session again (GetSession) for a fresh one")
    return tenant
