"""The avatar registry: likenesses tenants registered with their licences, and the
append-only audit log of their use.

Registered avatars are held in memory (loaded from the store at start) and every
change is written through the store's queue, so it commits with the core's turn.
Audit entries go only to the store; each gets the next sequence number, so the
log's order is the order things happened in. Whether a room may use an avatar is
the pure `scheduler.policy.licences` policy; this module adds who owns which avatar.

Avatar ids are global (they name image files workers read); an id is owned by
the tenant that registered it, and one that exists only as a file (the built-in
`presenter`, or an image an operator placed in the avatar folder) is an
unlicensed local avatar: usable by every tenant unless `require_licence` is set,
and claimable by an operator only.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass
from typing import Protocol

from avatarfarm.domain import SessionSpec
from scheduler.errors import AlreadyExists, NotFound
from scheduler.policy import licences
from scheduler.policy.licences import Licence, Refusal

# Audit clauses besides the licence's own.
UNLICENSED = "unlicensed"  # a local avatar with no licence registered
REQUIRE_LICENCE = "require_licence"  # refused: the farm runs licensed avatars only
OWNER = "tenant"  # refused: the avatar is registered by another tenant
REFUSAL_CLAUSES = (*licences.CLAUSES, REQUIRE_LICENCE, OWNER)


class AuditAction(enum.Enum):
    REGISTERED = "registered"
    REVOKED = "revoked"
    REFUSED = "refused"
    ROOM_STARTED = "room_started"
    ROOM_ENDED = "room_ended"
    LICENCE_ENDED = "licence_ended"
    DRIVER_LIVE = "driver_live"  # a camera room's driver went live (who, from where)
    DRIVER_NOT_LIVE = "driver_not_live"  # ...left, or their feed stopped being live


@dataclass(frozen=True, slots=True)
class VoiceSettings:
    voice: str = ""  # TTS voice name; empty: the worker's default
    rate: float = 0.0  # words per minute; 0: the engine's default
    pitch: float = 0.0  # 0..99; 0: the engine's default


@dataclass(frozen=True, slots=True)
class RegisteredAvatar:
    avatar_id: str
    tenant: str
    licence: Licence
    registered_at: float
    voice: VoiceSettings = VoiceSettings()
    image_sha256: str = ""
    width: int = 0
    height: int = 0
    revoked: bool = False
    revoked_reason: str = ""
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: float
    avatar_id: str
    tenant: str  # the avatar's owner (registration, revocation) or the room's tenant
    action: AuditAction
    session_id: str = ""
    room_id: str = ""
    platform: str = ""
    worker_id: str = ""
    clause: str = ""  # what allowed or refused it
    detail: str = ""


class AvatarStore(Protocol):
    """The rows the registry keeps: avatars and their audit log (the scheduler's Store
    is one)."""

    def load_avatars(self) -> list[RegisteredAvatar]: ...
    def put_avatar(self, avatar: RegisteredAvatar) -> None: ...
    def append_audit(self, entry: AuditEntry) -> None: ...
    def last_audit_seq(self) -> int: ...
    def audit_entries(self, avatar_id: str, after_seq: int, limit: int) -> list[AuditEntry]:
        """Committed entries only, and safe to call from any thread (a read that may
        wait on the disk belongs off the event loop)."""


def taken_message(avatar_id: str) -> str:
    return f"avatar id {avatar_id!r} is taken on this farm; register under another id"


class AvatarRegistry:
    def __init__(self, store: AvatarStore) -> None:
        self.store = store
        self._avatars = {a.avatar_id: a for a in store.load_avatars()}
        self._seq = store.last_audit_seq()
        # Avatars whose rooms must be checked again on the next pass: all at start (a
        # licence may have ended while the scheduler was down), then those changed.
        self._changed: set[str] = set(self._avatars)
        self._ends: list[tuple[float, str]] = []  # (valid_until, avatar id), a heap
        for a in self._avatars.values():
            self._watch_end(a)

    def _watch_end(self, a: RegisteredAvatar) -> None:
        end = licences.ends_at(a.licence)
        if end is not None and not a.revoked:
            heapq.heappush(self._ends, (end, a.avatar_id))

    # -- registry ---------------------------------------------------------------

    def get(self, avatar_id: str) -> RegisteredAvatar | None:
        return self._avatars.get(avatar_id)

    def __contains__(self, avatar_id: str) -> bool:
        return avatar_id in self._avatars

    def of(self, tenant: str = "") -> list[RegisteredAvatar]:
        """The avatars `tenant` registered (empty: all), by id."""
        return sorted((a for a in self._avatars.values() if not tenant or a.tenant == tenant),
                      key=lambda a: a.avatar_id)

    def claim(self, avatar_id: str, tenant: str, *, local: frozenset[str], operator: bool) -> None:
        """Refuses (AlreadyExists) an id another tenant registered, or one that exists only
        as a local avatar file unless an operator claims it for `tenant`. A tenant may
        replace its own avatar. The answer is the same whoever holds the id."""
        a = self._avatars.get(avatar_id)
        if a is not None and a.tenant != tenant:
            raise AlreadyExists(taken_message(avatar_id))
        if a is None and avatar_id in local and not operator:
            raise AlreadyExists(taken_message(avatar_id))

    def register(self, avatar: RegisteredAvatar, now: float) -> RegisteredAvatar:
        self._avatars[avatar.avatar_id] = avatar
        self.store.put_avatar(avatar)
        self._changed.add(avatar.avatar_id)
        self._watch_end(avatar)
        self.audit(AuditAction.REGISTERED, avatar.avatar_id, avatar.tenant, now,
                   detail=f"image {avatar.image_sha256[:16]} {avatar.width}x{avatar.height}")
        return avatar

    def revoke(self, avatar_id: str, reason: str, now: float) -> RegisteredAvatar:
        a = self._avatars.get(avatar_id)
        if a is None:
            raise NotFound(f"avatar {avatar_id!r} is not registered")
        if a.revoked:
            return a  # once is enough: a retry changes nothing
        a = RegisteredAvatar(a.avatar_id, a.tenant, a.licence, a.registered_at, a.voice,
                             a.image_sha256, a.width, a.height, True, reason, now)
        self._avatars[avatar_id] = a
        self.store.put_avatar(a)
        self._changed.add(avatar_id)
        self.audit(AuditAction.REVOKED, avatar_id, a.tenant, now, clause=licences.REVOKED,
                   detail=reason)
        return a

    # -- licences ---------------------------------------------------------------

    def admit(self, spec: SessionSpec, now: float, *, require_licence: bool) -> tuple[Refusal | None, str]:
        """Whether a room of `spec` may use its avatar at `now`: the refusal, or None and
        the clause(s) that allow it (for the audit)."""
        a = self._avatars.get(spec.avatar_id)
        if a is None:
            if require_licence:
                return Refusal(REQUIRE_LICENCE,
                               "has no licence registered and this farm renders licensed avatars "
                               "only (require_licence); its owner must register it with "
                               "AvatarService.RegisterAvatar"), ""
            return None, UNLICENSED
        if a.tenant != spec.tenant:
            return Refusal(OWNER, f"is licensed to another tenant; tenant {spec.tenant!r} may not "
                                  f"use it"), ""
        refusal = licences.check(a.licence, platform=spec.platform,
                                 product_category=spec.product_category, language=spec.language,
                                 now=now, revoked=a.revoked)
        if refusal is not None:
            return refusal, ""
        return None, ",".join(licences.allowing(a.licence))

    def due(self, now: float) -> set[str]:
        """Avatars whose running rooms must be checked again: changed or revoked since the
        last call, or whose licence reached its end."""
        out, self._changed = self._changed, set()
        while self._ends and self._ends[0][0] <= now:
            out.add(heapq.heappop(self._ends)[1])
        return out

    # -- audit log --------------------------------------------------------------

    def audit(self, action: AuditAction, avatar_id: str, tenant: str, now: float, *,
              session_id: str = "", room_id: str = "", platform: str = "", worker_id: str = "",
              clause: str = "", detail: str = "") -> AuditEntry:
        self._seq += 1
        entry = AuditEntry(self._seq, now, avatar_id, tenant, action, session_id, room_id,
                           platform, worker_id, clause, detail)
        self.store.append_audit(entry)
        return entry

    def entries(self, avatar_id: str, after_seq: int = 0, limit: int = 100) -> list[AuditEntry]:
        """One avatar's entries after `after_seq`, oldest first: what is committed (await
        the core's `durable()` first). A blocking read: call it off the event loop."""
        return self.store.audit_entries(avatar_id, after_seq, limit)
