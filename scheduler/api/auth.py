"""Who is calling and what they may do. Pure policy: the gRPC edge (scheduler.api.gate)
hands over what a call carried, this module answers with a `Principal` or a typed
refusal, and decides which tenants' rooms and figures that principal may touch.

Three kinds of subject: a tenant (its own rooms, usage and budget), a worker (the
worker stream, under its own id) and an operator (`admin`: everything). A call
proves who it is with one of:

- a signed token (``authorization: Bearer af1.<claims>.<signature>``): HMAC-SHA256
  with the scheduler's signing key over base64url JSON claims (kind, name, issued
  at, expiry), so any process holding the key can mint one (``avatarfarm token``);
- an API key (``x-api-key``) of a tenant or operator, configured as its SHA-256, so
  the configuration holds nothing that lets a reader call the API;
- a client certificate (mTLS) whose URI SAN is ``avatarfarm://KIND/NAME``.

A token or key sent with the call is the identity; a certificate counts when the
call sends neither. Refusal messages never repeat what the caller sent.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.errors import PermissionDenied

TOKEN_PREFIX = "af1"
MIN_SIGNING_KEY_BYTES = 32
# Longer than any token this module mints; a bigger header is refused unread.
MAX_CREDENTIAL_CHARS = 2048
# Tolerated clock difference between the process that minted a token and this one.
CLOCK_LEEWAY_SECONDS = 60
CERT_URI_PREFIX = "avatarfarm://"
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class SubjectKind(enum.Enum):
    TENANT = "tenant"
    WORKER = "worker"
    ADMIN = "admin"


class Service(enum.Enum):
    SESSIONS = "sessions"
    WORKERS = "workers"
    AVATARS = "avatars"
    ADMIN = "admin"


class Unauthenticated(Exception):
    """No credential, or one that does not prove anything (maps to UNAUTHENTICATED)."""


@dataclass(frozen=True, slots=True)
class Principal:
    kind: SubjectKind
    name: str
    via: str  # token, api-key, certificate or open: for logs, never the credential
    # When the credential stops proving this (Unix seconds; a token's expiry). A call
    # that lasts (a stream) is ended then: see Gate.
    expires_at: float = field(default=math.inf, compare=False)

    @property
    def admin(self) -> bool:
        return self.kind is SubjectKind.ADMIN

    def __str__(self) -> str:
        return f"{self.kind.value} {self.name!r} ({self.via})"


# The caller when no authentication is configured: a loopback farm, as in the demo
# and the tests, where whoever can reach the port is the operator.
OPEN = Principal(SubjectKind.ADMIN, "", "open")


@dataclass(frozen=True, slots=True)
class Claims:
    kind: SubjectKind
    name: str
    issued_at: int
    expires_at: int

    def principal(self) -> Principal:
        return Principal(self.kind, self.name, "token", self.expires_at)


@dataclass(frozen=True, slots=True)
class Presented:
    """What one call carried, as the edge read it (empty: absent)."""

    bearer: str = ""
    api_key: str = ""
    certificate: bool = False  # a client certificate came with the call, verified by TLS
    certificate_uris: tuple[str, ...] = ()


# -- tokens --------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(key: bytes, signed_part: str) -> bytes:
    return hmac.new(key, signed_part.encode("ascii"), hashlib.sha256).digest()


def check_name(kind: SubjectKind, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"a {kind.value} name is 1 to 128 letters, digits or - _ . : (got {name!r})")
    return name


def mint_token(key: bytes, kind: SubjectKind, name: str, *, ttl_seconds: float, now: float) -> str:
    """A token for `kind` `name` valid for `ttl_seconds` from `now`."""
    check_signing_key(key)
    check_name(kind, name)
    if ttl_seconds <= 0:
        raise ValueError("a token's time to live must be positive")
    claims = {"kind": kind.value, "sub": name, "iat": int(now), "exp": int(now + ttl_seconds)}
    payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signed = f"{TOKEN_PREFIX}.{payload}"
    return f"{signed}.{_b64(_signature(key, signed))}"


def verify_token(key: bytes, token: str, *, now: float) -> Claims:
    """The token's claims if `key` signed it and it is current; Unauthenticated if not."""
    parts = token.split(".")
    if len(token) > MAX_CREDENTIAL_CHARS or len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise Unauthenticated(f"the bearer credential is not an avatarfarm token "
                              f"({TOKEN_PREFIX}.<claims>.<signature>)")
    try:
        given = _unb64(parts[2])
    except (binascii.Error, ValueError) as e:
        raise Unauthenticated("the token's signature is not base64url") from e
    # Signature first, in constant time: nothing in an unsigned payload is looked at.
    if not hmac.compare_digest(given, _signature(key, f"{parts[0]}.{parts[1]}")):
        raise Unauthenticated("the token's signature does not verify (forged, or signed with "
                              "another key)")
    try:
        raw = json.loads(_unb64(parts[1]))
        kind = SubjectKind(raw["kind"])
        name, iat, exp = raw["sub"], raw["iat"], raw["exp"]
        if not (isinstance(name, str) and _NAME.fullmatch(name)
                and all(type(v) is int for v in (iat, exp))):
            raise ValueError("bad claim types")
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        # Signed by our key yet unreadable: a minting bug, not an attack; still refused.
        raise Unauthenticated("the token's claims are malformed") from e
    if exp <= now:
        raise Unauthenticated(f"the token expired at {_utc(exp)}; ask for a new one")
    if iat > now + CLOCK_LEEWAY_SECONDS:
        raise Unauthenticated(f"the token is issued in the future ({_utc(iat)}); check the clocks")
    return Claims(kind, name, iat, exp)


def _utc(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def check_signing_key(key: bytes) -> bytes:
    if len(key) < MIN_SIGNING_KEY_BYTES:
        raise ValueError(f"the token signing key must be at least {MIN_SIGNING_KEY_BYTES} bytes "
                         f"(it has {len(key)})")
    return key


def read_signing_key(path: Path) -> bytes:
    """The signing key from its file; surrounding whitespace (a trailing newline) is
    not part of it, so `openssl rand -hex 32 > FILE` makes a good one."""
    try:
        key = path.read_bytes().strip()
    except OSError as e:
        raise ValueError(f"cannot read the token signing key file {path}: {e.strerror}") from e
    try:
        return check_signing_key(key)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


# -- API keys --------------------------------------------------------------------


def hash_api_key(key: str) -> str:
    """The form an API key is configured in (lowercase hex SHA-256 of its UTF-8 text)."""
    return hashlib.sha256(key.strip().encode()).hexdigest()


def check_key_hash(value: str) -> str:
    if not _SHA256_HEX.fullmatch(value):
        raise ValueError("an API key is configured as its SHA-256 in lowercase hex (64 characters; "
                         "`avatarfarm token --hash-api-key` prints it)")
    return value


# -- authentication --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authenticator:
    """The scheduler's credentials, as configured. With none configured every call is
    the `OPEN` principal (a loopback farm); with any, every call must prove itself."""

    signing_key: bytes | None = None
    api_keys: Mapping[str, Principal] = field(default_factory=dict)  # SHA-256 hex -> principal
    certificates: bool = False  # client certificates are verified (mTLS), so they identify

    @staticmethod
    def build(*, signing_key: bytes | None = None,
              tenant_keys: Mapping[str, Iterable[str]] | None = None,
              admin_keys: Iterable[str] = (), certificates: bool = False) -> Authenticator:
        keys: dict[str, Principal] = {}

        def add(digest: str, p: Principal) -> None:
            try:
                check_key_hash(digest)
            except ValueError as e:
                raise ValueError(f"API key of {p.kind.value} {p.name!r}: {e}") from e
            if digest in keys and keys[digest] != p:
                # One key for two identities would let either act as the other.
                raise ValueError(f"one API key hash is configured for both {keys[digest]} and {p}")
            keys[digest] = p

        for tenant, digests in (tenant_keys or {}).items():
            for d in digests:
                add(d, Principal(SubjectKind.TENANT, tenant, "api-key"))
        for d in admin_keys:
            add(d, Principal(SubjectKind.ADMIN, "operator", "api-key"))
        if signing_key is not None:
            check_signing_key(signing_key)
        return Authenticator(signing_key, keys, certificates)

    @property
    def enabled(self) -> bool:
        return self.signing_key is not None or bool(self.api_keys) or self.certificates

    def authenticate(self, presented: Presented, now: float) -> Principal:
        if not self.enabled:
            return OPEN
        if presented.bearer and presented.api_key:
            raise Unauthenticated("send either a bearer token or an API key, not both")
        if presented.bearer:
            if self.signing_key is None:
                raise Unauthenticated("this scheduler accepts no tokens; use an API key or a "
                                      "client certificate")
            return verify_token(self.signing_key, presented.bearer, now=now).principal()
        if presented.api_key:
            if len(presented.api_key) > MAX_CREDENTIAL_CHARS:
                raise Unauthenticated("unknown API key")
            # A dict lookup by the presented key's hash: its timing tells nothing about
            # the configured keys that finding a SHA-256 preimage would not.
            p = self.api_keys.get(hash_api_key(presented.api_key))
            if p is None:
                raise Unauthenticated("unknown API key")
            return p
        if self.certificates and presented.certificate:
            return principal_from_certificate(presented.certificate_uris)
        raise Unauthenticated("no credential: send `authorization: Bearer <token>` or "
                              "`x-api-key: <key>`" +
                              (", or a client certificate" if self.certificates else ""))


def principal_from_certificate(uris: Iterable[str]) -> Principal:
    """The identity in a verified client certificate: its one avatarfarm:// URI SAN."""
    found = set()
    for uri in uris:
        if not uri.startswith(CERT_URI_PREFIX):
            continue
        kind, _, name = uri[len(CERT_URI_PREFIX):].partition("/")
        try:
            found.add(Principal(SubjectKind(kind), check_name(SubjectKind(kind), name),
                                "certificate"))
        except ValueError as e:
            raise Unauthenticated(f"the client certificate's identity {uri!r} is not "
                                  f"{CERT_URI_PREFIX}tenant|worker|admin/NAME") from e
    if len(found) != 1:
        raise Unauthenticated(
            f"the client certificate names {'no' if not found else 'more than one'} avatarfarm "
            f"identity (exactly one URI SAN {CERT_URI_PREFIX}tenant|worker|admin/NAME)")
    return found.pop()


# -- authorisation ---------------------------------------------------------------


def check_service(p: Principal, service: Service) -> None:
    """Tenants and operators use the session and avatar APIs; workers and operators the
    worker stream; operators alone the admin API."""
    if service is Service.ADMIN and not p.admin:
        raise PermissionDenied(f"{p} cannot call the admin API; it takes an operator credential")
    allowed = SubjectKind.WORKER if service is Service.WORKERS else SubjectKind.TENANT
    if p.kind is not allowed and not p.admin:
        raise PermissionDenied(f"a {p.kind.value} credential cannot call the {service.value} "
                               f"API; it takes a {allowed.value} credential")


def may_see(p: Principal, tenant: str) -> bool:
    """Whether `p` may see and change the rooms of `tenant`. A caller that may not gets
    the same answer as for a room that does not exist (see the session service)."""
    return p.admin or (p.kind is SubjectKind.TENANT and p.name == tenant)


def check_create(p: Principal, tenant: str) -> None:
    if not may_see(p, tenant):
        raise PermissionDenied(f"{p} cannot create sessions for tenant {tenant!r}")


def tenant_scope(p: Principal, requested: str) -> str:
    """The tenant a listing or report covers: an operator's choice (empty: all), a
    tenant's own (asked for by name or left empty)."""
    if p.admin:
        return requested
    if requested and requested != p.name:
        raise PermissionDenied(f"{p} cannot read tenant {requested!r}")
    return p.name


def check_worker_id(p: Principal, worker_id: str) -> None:
    """A worker registers under the id its credential names (an operator under any)."""
    if not p.admin and not (p.kind is SubjectKind.WORKER and p.name == worker_id):
        raise PermissionDenied(f"{p} cannot register as worker {worker_id!r}")
